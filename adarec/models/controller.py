"""Adaptive Depth Controller (METHOD.md 2.1): a diffusion depth per user.

GRU over [E^0 ; v_len] -> mean over valid positions -> logits over depths 0..T_max. Training
draws a hard depth from Gumbel-softmax (tau 0.5) with straight-through gradients; evaluation
takes the argmax of the logits without noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import masked_mean


@dataclass
class DepthDecision:
    depths: torch.Tensor        # int64 [B], T_u
    probs: torch.Tensor         # [B, T_max + 1], p (Gumbel-softmax in training, softmax at eval)
    level_masks: torch.Tensor   # [B, T_max + 1], m_k = 1 + s_k - stopgrad(s_k), s_k = P(depth >= k)
    exploration: torch.Tensor   # scalar, L_expl = -entropy(p) averaged over users


class LengthAwareGRU(nn.Module):
    """logits = W mean_valid(GRU([E^0 ; v_len])) + b, v_len an embedding of the history length.

    The summary both controllers read a sequence with (ADARec's depth controller here, the
    dual model's weights over its noised copies in dual.py).
    """

    def __init__(self, hidden: int, max_len: int, outputs: int):
        super().__init__()
        self.max_len = max_len
        self.length_embedding = nn.Embedding(max_len + 1, hidden)
        self.gru = nn.GRU(2 * hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, outputs)

    def forward(self, e0: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        lengths = (input_ids > 0).sum(1).clamp(max=self.max_len)
        v_len = self.length_embedding(lengths)[:, None, :].expand_as(e0)
        states, _ = self.gru(torch.cat([e0, v_len], dim=-1))
        return self.head(masked_mean(states, input_ids)).float()


class DepthController(LengthAwareGRU):
    def __init__(self, hidden: int, max_len: int, max_depth: int, tau: float = 0.5):
        super().__init__(hidden, max_len, max_depth + 1)
        self.max_depth = max_depth
        self.tau = tau

    def logits(self, e0: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(e0, input_ids)

    def forward(self, e0: torch.Tensor, input_ids: torch.Tensor,
                generator: torch.Generator | None = None) -> DepthDecision:
        logits = self.logits(e0, input_ids)
        if self.training:
            uniform = torch.rand(logits.shape, generator=generator, device=logits.device).clamp(1e-10, 1 - 1e-10)
            gumbel = -torch.log(-torch.log(uniform))
            probs = F.softmax((logits + gumbel) / self.tau, dim=-1)
        else:
            probs = F.softmax(logits, dim=-1)
        depths = probs.argmax(-1) if self.training else logits.argmax(-1)
        # s_k = sum_{j >= k} p_j; the mask has value 1 and the gradient of s_k.
        survival = probs.flip(-1).cumsum(-1).flip(-1)
        level_masks = 1.0 + (survival - survival.detach())  # exactly 1 in value
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)
        return DepthDecision(depths, probs, level_masks, -entropy.mean())
