"""Depth-masked gated aggregation of the two experts, reference (eager) implementation.

METHOD.md 2.3, over the packed (user, level) pairs of a batch:
  z_fin  = sum_k m_k g_k       fin_k  / (sum_k m_k g_k       + 1e-8)     [B, L, D]
  z_coar = sum_k m_k (1 - g_k) coar_k / (sum_k m_k (1 - g_k) + 1e-8)     [B, D]
  gate   = sigmoid(z_coar W_g^T + b_g)                                   [B, D]
  h      = gate * z_fin + (1 - gate) * z_coar                            [B, L, D]
Only the pairs that exist (levels <= T_u) are summed: depth masking is the packed layout itself;
m carries the controller's straight-through gradient (value 1).

This is the test oracle of the C++/CUDA fused op; `gated_fusion` is the contract both share.
"""

from __future__ import annotations

import torch

EPS = 1e-8


def segment_sum(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Sum rows of values [P, ...] per segment given offsets [B+1] -> [B, ...]."""
    counts = offsets[1:] - offsets[:-1]
    owner = torch.repeat_interleave(torch.arange(counts.numel(), device=values.device), counts)
    out = values.new_zeros((counts.numel(), *values.shape[1:]))
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
    """Returns (h [B, L, D], z_coar [B, D]); see the module docstring."""
    w_fin = m * g
    w_coar = m * (1.0 - g)
    z_fin = segment_sum(w_fin[:, None, None] * fin, offsets) / (segment_sum(w_fin, offsets)[:, None, None] + EPS)
    z_coar = segment_sum(w_coar[:, None] * coar, offsets) / (segment_sum(w_coar, offsets)[:, None] + EPS)
    gate = torch.sigmoid(torch.nn.functional.linear(z_coar, w_gate, b_gate))
    h = gate[:, None, :] * z_fin + (1.0 - gate[:, None, :]) * z_coar[:, None, :]
    return h, z_coar
