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


def _element_weights(shared: tuple[bool, ...], sizes: tuple[int, ...], losses: int,
                     device: torch.device) -> torch.Tensor:
    """Per element of the flattened parameters: 1 / losses where every loss reached the parameter
    (their mean), 1 elsewhere (their sum). Cached per layout: one small tensor, built once."""
    key = (shared, sizes, losses, str(device))
    if key not in _WEIGHTS:
        per_param = torch.tensor([1.0 / losses if s else 1.0 for s in shared])
        _WEIGHTS[key] = torch.repeat_interleave(per_param, torch.tensor(sizes), output_size=sum(sizes)).to(device)
    return _WEIGHTS[key]


_WEIGHTS: dict[tuple, torch.Tensor] = {}


def _merged_flat(grads: Sequence[Sequence[torch.Tensor | None]], params: Sequence[torch.Tensor],
                 project: bool) -> torch.Tensor:
    """The merged gradient of every parameter, flattened in params order, float32 [P]. Whole-vector
    ops, not a loop over the parameters: a step costs a handful of launches, whatever the model."""
    if not grads:
        raise ValueError("no losses to merge")
    flat = torch.stack([torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                                   for g, p in zip(per_loss, params, strict=True)]) for per_loss in grads])
    if project:
        originals = flat.clone()
        for g_i in flat.unbind(0):                     # views: the projection updates flat in place
            # The public code shuffles the order of the g_j; with two losses the result does not
            # depend on it (after one projection g_i . g_j >= 0 for both), here it is the list order.
            for g_j in originals.unbind(0):
                dot = torch.dot(g_i, g_j)
                g_i -= torch.where(dot < 0, dot / g_j.pow(2).sum(), torch.zeros_like(dot)) * g_j
    shared = tuple(all(per_loss[i] is not None for per_loss in grads) for i in range(len(params)))
    weights = _element_weights(shared, tuple(p.numel() for p in params), len(grads), flat.device)
    return (flat * weights).sum(0)


def merge_gradients(grads: Sequence[Sequence[torch.Tensor | None]], params: Sequence[torch.Tensor],
                    project: bool) -> list[torch.Tensor]:
    """grads[i][p]: loss i's gradient of params[p] (None: not reached) -> merged gradient per param."""
    merged = _merged_flat(grads, params, project)
    return [m.view_as(p).to(p.dtype) for m, p in zip(merged.split([p.numel() for p in params]), params, strict=True)]


def merged_gradient_loss(module: nn.Module, losses: Sequence[torch.Tensor], mode: str) -> torch.Tensor:
    """A scalar whose gradient with respect to module's trainable parameters is the merged gradient
    of `losses` (module docstring). Consumes the losses' graphs."""
    if mode not in MODES:
        raise ValueError(f"unknown gradient merge {mode!r}; expected one of {', '.join(MODES)}")
    params = [p for p in module.parameters() if p.requires_grad]
    grads = [torch.autograd.grad(loss, params, retain_graph=i + 1 < len(losses), allow_unused=True)
             for i, loss in enumerate(losses)]
    merged = _merged_flat(grads, params, project=mode == "pcgrad-project").detach()
    # d/dp of <cat(p), merged> is merged's slice for p, exactly (in p's dtype).
    return torch.dot(torch.cat([p.reshape(-1) for p in params]).float(), merged)
