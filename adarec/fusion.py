"""Depth-masked gated aggregation of the two experts, reference (eager) implementation.

docs/method.md section 2.3. Training is causal, so everything is per position i; over the
packed (user, level) pairs k of user b:
  z_fin[b, i]  = sum_k m_k g_k[i]       fin_k[i]  / (sum_k m_k g_k[i]       + 1e-8)   [B, L, D]
  z_coar[b, i] = sum_k m_k (1 - g_k[i]) coar_k[i] / (sum_k m_k (1 - g_k[i]) + 1e-8)   [B, L, D]
  gate         = sigmoid(z_coar W_g^T + b_g)                                         [B, L, D]
  h            = gate * z_fin + (1 - gate) * z_coar                                  [B, L, D]
fin [P, L, D] is the fine expert's output, coar [P, L, D] the coarse expert's output on the
prefix pools, g [P, L] the router weight. m [P, L] is the depth mask, per position because the
depth is chosen per prefix: value 1 where the level is <= the depth at that position, 0 where it
is computed only for other positions or to give the controller a gradient (the "probe"), with
the controller's straight-through gradient where docs/method.md 2.1 gives one.

This is the test oracle of the C++/CUDA fused op; `gated_fusion` is the contract both share.
"""

from __future__ import annotations

import torch

EPS = 1e-8


def segment_owner(offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The segment of every row 0..num_rows-1 given offsets [B+1] (on device, no host sync)."""
    rows = torch.arange(num_rows, device=offsets.device)
    return torch.searchsorted(offsets[1:], rows, right=True)


def segment_sum(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Sum rows of values [P, ...] per segment given offsets [B+1] -> [B, ...]."""
    owner = segment_owner(offsets, values.shape[0])
    out = values.new_zeros((offsets.numel() - 1, *values.shape[1:]))
    return out.index_add(0, owner, values)


def gated_fusion(
    fin: torch.Tensor,
    coar: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    offsets: torch.Tensor,
    w_gate: torch.Tensor,
    b_gate: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (h [B, L, D], z_coar [B, L, D]); see the module docstring."""
    w_fin = m * g                          # [P, L]
    w_coar = m * (1.0 - g)
    z_fin = segment_sum(w_fin[..., None] * fin, offsets) / (segment_sum(w_fin, offsets)[..., None] + EPS)
    z_coar = segment_sum(w_coar[..., None] * coar, offsets) / (segment_sum(w_coar, offsets)[..., None] + EPS)
    gate = torch.sigmoid(torch.nn.functional.linear(z_coar, w_gate, b_gate))
    h = gate * z_fin + (1.0 - gate) * z_coar
    return h, z_coar


def mean_over_levels(fine: torch.Tensor, m: torch.Tensor, pair_user: torch.Tensor, batch: int) -> torch.Tensor:
    """h [B, L, D] = sum_k m_k[i] fin_k[i] / sum_k m_k[i] over each user's pairs: the aggregation
    that replaces HP-MoE in the `hpmoe` ablation (docs/method.md, "Ablations"). Level 0 is always
    active, so the denominator is at least 1 in value; m carries the controller's straight-through
    gradient as in gated_fusion."""
    weight = m.to(fine.dtype)
    total = fine.new_zeros((batch, *fine.shape[1:])).index_add(0, pair_user, fine * weight[..., None])
    count = weight.new_zeros((batch, fine.shape[1])).index_add(0, pair_user, weight)
    return total / count.clamp_min(EPS)[..., None]
