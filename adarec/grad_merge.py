"""Merging a model's loss gradients as ADRec's public PCGrad wrapper does (docs/peers.md, "ADRec").

The public trainer always wraps its optimizer in PCGrad. Per step it back-propagates each loss on
its own and, per parameter tensor, notes whether that loss reached it. With its projection switched
on (`pcgrad: true`, off in the public defaults) each loss's flattened gradient g_i is then projected,
in turn against every g_j (the original ones, g_i itself included), onto the normal plane of g_j
whenever g_i . g_j < 0:  g_i <- g_i - (g_i . g_j) / |g_j|^2 g_j. The merged gradient is the mean of
the (projected) gradients over the parameters that every loss reached and their sum over the rest
(where at most one loss is nonzero, or none). Every parameter gets that gradient, zero included, so
the optimizer's weight decay acts on parameters no loss reached.

With the projection off (the public default, which train.grad_merge = pcgrad reproduces), ADRec's
two losses reach the same parameters, so the merged gradient is that of (CE + MSE) / 2.

`merged_gradient_loss` returns a surrogate sum_p (p * g_p).sum() with g_p detached: its gradient is
exactly the merged one, so the engine's backward, all-reduce and ZeRO partitioning work unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MODES", "merge_gradients", "merged_gradient_loss"]

# pcgrad: the public default (per-loss gradients merged, no projection);
# pcgrad-project: the same with the projection of conflicting gradients (public `pcgrad: true`).
MODES = ("pcgrad", "pcgrad-project")


def merge_gradients(grads: Sequence[Sequence[torch.Tensor | None]], params: Sequence[torch.Tensor],
                    project: bool) -> list[torch.Tensor]:
    """grads[i][p]: loss i's gradient of params[p] (None: not reached) -> merged gradient per param."""
    if not grads:
        raise ValueError("no losses to merge")
    flat = [torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                       for g, p in zip(per_loss, params, strict=True)]) for per_loss in grads]
    if project:
        originals = [g.clone() for g in flat]
        for g_i in flat:
            # The public code shuffles the order of the g_j; with two losses the result does not
            # depend on it (after one projection g_i . g_j >= 0 for both), here it is the list order.
            for g_j in originals:
                dot = torch.dot(g_i, g_j)
                g_i -= torch.where(dot < 0, dot / g_j.pow(2).sum(), torch.zeros_like(dot)) * g_j
    merged, start = [], 0
    for index, p in enumerate(params):
        size = p.numel()
        parts = torch.stack([g[start:start + size] for g in flat])
        shared = all(per_loss[index] is not None for per_loss in grads)
        merged.append((parts.mean(0) if shared else parts.sum(0)).view_as(p).to(p.dtype))
        start += size
    return merged


def merged_gradient_loss(module: nn.Module, losses: Sequence[torch.Tensor], mode: str) -> torch.Tensor:
    """A scalar whose gradient with respect to module's trainable parameters is the merged gradient
    of `losses` (module docstring). Consumes the losses' graphs."""
    if mode not in MODES:
        raise ValueError(f"unknown gradient merge {mode!r}; expected one of {', '.join(MODES)}")
    params = [p for p in module.parameters() if p.requires_grad]
    grads = [torch.autograd.grad(loss, params, retain_graph=i + 1 < len(losses), allow_unused=True)
             for i, loss in enumerate(losses)]
    merged = merge_gradients(grads, params, project=mode == "pcgrad-project")
    return sum((p * g.detach()).sum() for p, g in zip(params, merged, strict=True))
