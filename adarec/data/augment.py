"""ELCRec / CoSeRec sequence augmentations (crop, mask, reorder), batched on the tensors' device.

Every function takes left-padded id tensors [B, L] (0 = padding, the n valid items of a row
contiguous at its right end) and the true lengths n [B], computed from the raw input *before*
any augmentation (after masking, ``ids > 0`` no longer counts the valid positions). All
randomness comes from ``draws``: a ``torch.Generator`` (which must live on the tensors' device)
or row-keyed draws (`adarec.keyed_random.KeyedDraws`, what training uses, so that a row's views
do not depend on where the row is computed). The amount drawn depends only on the shapes, so a
fixed generator state or fixed row keys give fixed views.
No Python loop over rows and no host synchronisation.

Lengths follow the reference code: ``int(ratio * n)`` in double precision (crop keeps at least
one item). Span starts are uniform over every valid start 0..n-k (CoSeRec draws 0..n-k-1).
"""

from __future__ import annotations

import torch

from adarec.keyed_random import as_draws

__all__ = ["crop", "mask", "random_views", "reorder"]


def _count(lengths: torch.Tensor, ratio: float) -> torch.Tensor:
    # Double precision so that floor(ratio * n) matches Python's int(ratio * n) of the reference.
    return torch.floor(lengths.to(torch.float64) * ratio).to(torch.int64)


def _rel_pos(ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Relative position r = column - (L - n): 0..n-1 on valid items, negative on padding."""
    cols = torch.arange(ids.shape[1], device=ids.device)
    return cols[None, :] - (ids.shape[1] - lengths)[:, None]


def _uniform_start(lengths: torch.Tensor, k: torch.Tensor, draws) -> torch.Tensor:
    """Start uniform over 0..n-k per row (0 when n-k < 0)."""
    span = (lengths - k + 1).clamp_min(1)
    u = as_draws(draws, lengths.shape[0], lengths.device).uniform((), torch.float64)
    return torch.minimum(torch.floor(u * span).to(torch.int64), span - 1)


def crop(ids: torch.Tensor, lengths: torch.Tensor, ratio: float, draws) -> torch.Tensor:
    """Keep a random contiguous window of max(1, floor(ratio*n)) items, right-aligned at L-1."""
    L = ids.shape[1]
    k = torch.minimum(_count(lengths, ratio).clamp_min(1), lengths)
    start = _uniform_start(lengths, k, draws)
    q = torch.arange(L, device=ids.device)[None, :] - (L - k)[:, None]  # position in the window
    src = (L - lengths + start)[:, None] + q
    out = torch.gather(ids, 1, src.clamp(0, L - 1))
    return torch.where(q >= 0, out, torch.zeros_like(out))


def mask(ids: torch.Tensor, lengths: torch.Tensor, ratio: float, draws,
         mask_id: int = 0) -> torch.Tensor:
    """Set exactly floor(ratio*n) randomly chosen valid positions to ``mask_id`` (default 0)."""
    r = _rel_pos(ids, lengths)
    keys = as_draws(draws, ids.shape[0], ids.device).uniform((ids.shape[1],), align_right=True)
    keys = torch.where(r >= 0, keys, torch.full_like(keys, 2.0))  # padding ranks last
    rank = torch.argsort(torch.argsort(keys, dim=1), dim=1)
    hit = rank < _count(lengths, ratio)[:, None]
    return torch.where(hit, torch.full_like(ids, mask_id), ids)


def reorder(ids: torch.Tensor, lengths: torch.Tensor, ratio: float, draws) -> torch.Tensor:
    """Shuffle a random contiguous span of floor(ratio*n) items; everything else stays put."""
    r = _rel_pos(ids, lengths)
    k = _count(lengths, ratio)
    draws = as_draws(draws, ids.shape[0], ids.device)
    start = _uniform_start(lengths, k, draws)[:, None]
    inside = (r >= start) & (r < start + k[:, None])
    # Outside the span a position keeps its own integer key; keys inside lie in [start, start+k),
    # between the neighbours' keys, so sorting only permutes the span.
    u = draws.uniform((ids.shape[1],), torch.float64, align_right=True)
    keys = torch.where(inside, start + u * k[:, None], r.to(torch.float64))
    perm = torch.argsort(keys, dim=1, stable=True)
    return torch.gather(ids, 1, perm)


def random_views(ids: torch.Tensor, draws, crop_ratio: float = 0.2,
                 mask_ratio: float = 0.7, reorder_ratio: float = 0.2,
                 mask_id: int = 0) -> torch.Tensor:
    """One augmented view per row: crop, mask or reorder, picked uniformly at random per row.

    ``ids`` must be raw (unaugmented) left-padded inputs, so ``(ids > 0).sum(1)`` is the length.
    All three augmentations are computed for every row and one is selected, which keeps the
    amount of randomness drawn (and so the generator stream) independent of the data.
    """
    lengths = (ids > 0).sum(1)
    draws = as_draws(draws, ids.shape[0], ids.device)
    choice = torch.floor(draws.uniform((1,)) * 3).clamp_max(2)
    c = crop(ids, lengths, crop_ratio, draws)
    m = mask(ids, lengths, mask_ratio, draws, mask_id=mask_id)
    o = reorder(ids, lengths, reorder_ratio, draws)
    return torch.where(choice == 0, c, torch.where(choice == 1, m, o))
