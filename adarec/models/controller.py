"""Adaptive Depth Controller (docs/method.md 2.1): a diffusion depth per user.

GRU over [E^0 ; v_len] -> mean over valid positions -> logits over depths 0..T_max. Training
draws a hard depth from Gumbel-softmax (tau 0.5) with straight-through gradients; evaluation
takes the argmax of the logits without noise.

The depth reads the whole input: it is one of T_max + 1 values per user, the one documented
whole-input decision of the model (docs/method.md, "Causality"); nothing else that feeds
position i reads positions after i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import masked_mean, prefix_mean


@dataclass
class DepthDecision:
    depths: torch.Tensor        # int64 [B], T_u
    probs: torch.Tensor         # [B, T_max + 1], p (Gumbel-softmax in training, softmax at eval)
    survival: torch.Tensor      # [B, T_max + 1], s_k = sum_{j >= k} p_j = P(depth >= k)
    exploration: torch.Tensor   # scalar, L_expl = -entropy(p) averaged over users

    def pair_masks(self, pair_user: torch.Tensor, pair_level: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """m [P] of packed pairs: value 1 for an active level (k <= T_u), 0 for a probe level,
        and in both cases the gradient of s_k (straight-through: m = value + s_k - stopgrad(s_k))."""
        s = self.survival[pair_user, pair_level]
        return active.to(s.dtype) + (s - s.detach())


class LengthAwareGRU(nn.Module):
    """logits = W pool(GRU([E^0 ; v_len])) + b, v_len an embedding of the history length.

    The summary both controllers read a sequence with: `forward` pools over the whole input
    (ADARec's depth controller, one decision per user); `per_position` pools the prefix up to
    each position and embeds the number of items seen so far, so its output at i reads only
    positions <= i (the dual model's weights over its noised copies, which train every position).
    """

    def __init__(self, hidden: int, max_len: int, outputs: int):
        super().__init__()
        self.max_len = max_len
        self.length_embedding = nn.Embedding(max_len + 1, hidden)
        self.gru = nn.GRU(2 * hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, outputs)

    def _states(self, e0: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """GRU states over [E^0 ; emb(lengths)], lengths [B, L] (per position)."""
        v_len = self.length_embedding(lengths.clamp(max=self.max_len))
        states, _ = self.gru(torch.cat([e0, v_len], dim=-1))
        return states

    def forward(self, e0: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, outputs] from the whole input."""
        lengths = (input_ids > 0).sum(1, keepdim=True).expand_as(input_ids)
        return self.head(masked_mean(self._states(e0, lengths), input_ids)).float()

    def per_position(self, e0: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L, outputs]; position i reads positions <= i only."""
        seen = (input_ids > 0).long().cumsum(1)
        return self.head(prefix_mean(self._states(e0, seen), input_ids)).float()


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
        survival = probs.flip(-1).cumsum(-1).flip(-1)
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)
        return DepthDecision(depths, probs, survival, -entropy.mean())
