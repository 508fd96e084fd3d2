"""Adaptive Depth Controller (docs/method.md 2.1): a diffusion depth per user and prefix.

GRU over [E^0 ; v_len] -> mean of its states over the item positions <= i -> logits over
depths 0..T_max at every position i. Training draws a hard depth per position from
Gumbel-softmax (tau 0.5) with straight-through gradients; evaluation takes the argmax of the
logits without noise.

Training position i stands for the sequence that ends at i, so it gets the depth the controller
chooses for that prefix, and reads nothing after i (docs/method.md, "Causality"). At the last
position the prefix is the whole input: depths[:, -1] is the per-sequence decision T_u that
evaluation uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adarec.keyed_random import as_draws

from .encoder import masked_mean, prefix_mean


@dataclass
class DepthDecision:
    depths: torch.Tensor        # int64 [B, L], the depth of the prefix ending at each item position (0 on padding)
    probs: torch.Tensor         # [B, L, T_max + 1], p (Gumbel-softmax in training, softmax at eval)
    survival: torch.Tensor      # [B, L, T_max + 1], s_k = sum_{j >= k} p_j = P(depth >= k)
    exploration: torch.Tensor   # scalar, L_expl = -entropy(p) averaged over item positions
    items: torch.Tensor | None = None   # bool [B, L], the item positions (None: every position)

    @property
    def sequence_depths(self) -> torch.Tensor:
        """T_u [B]: the depth of the whole input (the last position's prefix)."""
        return self.depths[:, -1]

    def top_depths(self) -> torch.Tensor:
        """[B]: the deepest level any position of the user needs."""
        return self.depths.amax(1)

    def pair_masks(self, pair_user: torch.Tensor, pair_level: torch.Tensor, mode: str) -> torch.Tensor:
        """m [P, L] of packed pairs per position i: value 1 where the level is <= depths[u, i], else
        0, plus the straight-through gradient of s_k[u, i] where `mode` gives one (docs/method.md
        2.1): none on the active levels, probe also on level depths[u, i] + 1, all everywhere;
        never on padding positions, which have depth 0 and no prefix to decide on."""
        level = pair_level[:, None]
        depth = self.depths[pair_user]                                   # [P, L]
        s = self.survival[pair_user, :, pair_level]                      # [P, L]: s_k[u, i] of each pair
        value = (level <= depth).to(s.dtype)
        reach = {"none": 0, "probe": 1}.get(mode)
        grad = torch.ones_like(value) if reach is None else (level <= depth + reach).to(s.dtype)
        if self.items is not None:
            grad = grad * self.items[pair_user]
        return value + grad * (s - s.detach())


def gumbel_from_uniform(uniform: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise -log(-log(u)) of uniforms in the open interval (0, 1).

    Finite only inside it: u = 1 gives +inf and a NaN softmax, u = 0 gives -inf. The draws
    guarantee it in their dtype (adarec.keyed_random.open_unit); a clamp to 1 - 1e-10 would not,
    since that constant is 1.0 in float32."""
    return -torch.log(-torch.log(uniform))


def gru_from_first_item(gru: nn.GRU, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The states [B, W, H] of a batch-first GRU run over each left-padded row of x [B, W, F]
    starting at its first item (state 0 there), zero on the padding.

    Running the GRU over the left padding would make the state at the first item depend on how
    many padding columns precede it, so on the batch's width. Each row is rotated left by its
    padding (items first), run, and rotated back; the rotated-in padding lies after the last item
    and only changes states that are never read. Two gathers, no host sync, no packed sequence.
    `lengths` [B]: the items per row (they are the last `lengths` columns)."""
    width = x.shape[1]
    pad = (width - lengths)[:, None]
    cols = torch.arange(width, device=x.device)[None, :]
    items_first = ((cols + pad) % width)[..., None]
    states, _ = gru(x.gather(1, items_first.expand(-1, -1, x.shape[2])))
    back = ((cols - pad) % width)[..., None]
    out = states.gather(1, back.expand(-1, -1, states.shape[2]))
    return out * (cols >= pad)[..., None].to(out.dtype)


def fixed_decision(input_ids: torch.Tensor, depth: int, max_depth: int) -> DepthDecision:
    """The depth decision without the controller (the `adc` ablation, docs/method.md
    "Ablations"): every item position gets `depth`, padding 0; probs and survival are the one-hot
    and step functions of that depth, with no gradient, and there is no exploration term."""
    items = input_ids > 0
    depths = torch.where(items, depth, 0)
    probs = F.one_hot(depths, max_depth + 1).float()
    levels = torch.arange(max_depth + 1, device=input_ids.device)
    survival = (levels <= depths[..., None]).float()
    return DepthDecision(depths, probs, survival, probs.new_zeros(()), items)


class LengthAwareGRU(nn.Module):
    """logits[i] = W prefix_mean(GRU([E^0 ; v_len]))[i] + b, v_len[i] an embedding of the number
    of items seen up to i: [B, L, outputs], position i reads positions <= i only. The GRU starts at
    each row's first item (gru_from_first_item), so nothing depends on the padding before it.

    The summary both controllers read a sequence with (ADARec's depth controller here, the dual
    model's weights over its noised copies in dual.py).
    """

    def __init__(self, hidden: int, max_len: int, outputs: int):
        super().__init__()
        self.max_len = max_len
        self.length_embedding = nn.Embedding(max_len + 1, hidden)
        self.gru = nn.GRU(2 * hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, outputs)

    def forward(self, e0: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        items = (input_ids > 0).long()
        seen = items.cumsum(1).clamp(max=self.max_len)
        inputs = torch.cat([e0, self.length_embedding(seen)], dim=-1)
        states = gru_from_first_item(self.gru, inputs, items.sum(1))
        return self.head(prefix_mean(states, input_ids)).float()


class DepthController(LengthAwareGRU):
    def __init__(self, hidden: int, max_len: int, max_depth: int, tau: float = 0.5):
        super().__init__(hidden, max_len, max_depth + 1)
        self.max_depth = max_depth
        self.tau = tau

    def logits(self, e0: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L, T_max + 1]."""
        return super().forward(e0, input_ids)

    def forward(self, e0: torch.Tensor, input_ids: torch.Tensor, generator=None) -> DepthDecision:
        """`generator`: where the Gumbel noise comes from: a torch.Generator, row-keyed draws
        (adarec.keyed_random.KeyedDraws, what training uses) or None (torch's global RNG)."""
        logits = self.logits(e0, input_ids)
        if self.training:
            draws = as_draws(generator, logits.shape[0], logits.device)
            gumbel = gumbel_from_uniform(draws.uniform(tuple(logits.shape[1:]), align_right=True))
            probs = F.softmax((logits + gumbel) / self.tau, dim=-1)
        else:
            probs = F.softmax(logits, dim=-1)
        items = input_ids > 0
        depths = torch.where(items, probs.argmax(-1) if self.training else logits.argmax(-1), 0)
        survival = probs.flip(-1).cumsum(-1).flip(-1)
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1, keepdim=True)     # [B, L, 1]
        return DepthDecision(depths, probs, survival, -masked_mean(entropy, input_ids).mean(), items)
