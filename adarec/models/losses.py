"""Losses shared by the recommenders (reference math, plain PyTorch)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from adarec.backends import linear_ce_function
from adarec.config import CE_ITEM_CHUNK
from adarec.parallel import gather_rows, global_mean, world_size


def per_target_scaled(loss: torch.Tensor, batch: dict) -> torch.Tensor:
    """A mean over a batch's targets (or item positions) times the batch's `target_share`, when
    the sampler gives one (length-grouped batches), so that every target weighs the same over an
    epoch whatever the length of the batch it lands in."""
    share = batch.get("target_share")
    return loss if share is None else loss * share


def bce_next_item_loss(hidden, item_embeddings, target_pos, target_neg) -> torch.Tensor:
    """SASRec's BCE with one sampled negative per position, averaged over real targets."""
    pos = (hidden * item_embeddings(target_pos)).sum(-1).float()
    neg = (hidden * item_embeddings(target_neg)).sum(-1).float()
    is_target = (target_pos > 0).float()
    per_position = -(F.logsigmoid(pos) + F.logsigmoid(-neg)) * is_target
    # Over the global batch's targets with several ranks (adarec/parallel.py).
    return global_mean(per_position.sum(), is_target.sum())


class ItemCrossEntropy:
    """Full-softmax cross-entropy of hidden rows against an item table, in the implementation
    kernels.backend and kernels.ce_item_chunk pick for the table's size and device
    (adarec/backends.py: eager logits, chunked PyTorch or the Triton kernels)."""

    def __init__(self, backend: str = "auto", item_chunk: int = CE_ITEM_CHUNK):
        self.backend, self.item_chunk = backend, item_chunk

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ignore_index: int,
                 reduction: str = "mean") -> torch.Tensor:
        impl = linear_ce_function(self.backend, hidden.device, weight.shape[0], self.item_chunk, weight.shape[1])
        device = hidden.device.type
        if not torch.is_autocast_enabled(device):
            return impl(hidden, weight, target, ignore_index=ignore_index, reduction=reduction,
                        item_chunk=self.item_chunk)
        # Under autocast (bf16 over fp32 weights) the products run in the autocast dtype, as the
        # logits matmul did; the custom autograd functions get that dtype explicitly, so their
        # backward recomputes exactly the logits their forward saw.
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return impl(hidden.to(dtype), weight.to(dtype), target, ignore_index=ignore_index, reduction=reduction,
                        item_chunk=self.item_chunk)

    def global_mean(self, hidden, weight, target, ignore_index: int) -> torch.Tensor:
        """The mean over the global batch's kept rows, whose count differs between ranks
        (adarec/parallel.py); the local mean with one process."""
        if world_size() == 1:
            return self(hidden, weight, target, ignore_index)
        return global_mean(self(hidden, weight, target, ignore_index, "sum"), (target != ignore_index).sum())


def scored_rows(hidden: torch.Tensor, target_pos: torch.Tensor, target_rows: torch.Tensor | None = None):
    """(hidden rows [R, D], their targets [R]) of the positions a CE scores: the flat positions
    target_rows lists (the sampler's; every target and some padding), or every position."""
    flat_hidden, flat_target = hidden.reshape(-1, hidden.shape[-1]), target_pos.reshape(-1)
    if target_rows is None:
        return flat_hidden, flat_target
    return flat_hidden.index_select(0, target_rows), flat_target.index_select(0, target_rows)


def ce_next_item_loss(hidden, item_weight, target_pos, target_rows: torch.Tensor | None = None,
                      item_ce: ItemCrossEntropy | None = None) -> torch.Tensor:
    """Full-softmax cross-entropy over items 1..N, averaged over the positions with a target.

    target_rows (flat indices into B * L, from the sampler) says which positions to score: every
    target and some padding, which ignore_index drops. Without it every position is scored.
    Either way nothing reads a count on the host (a boolean selection would), and most of a Beauty
    batch is padding, so target_rows is what keeps the logits small. A batch without any target
    would give 0 / 0; the sampler never makes one (every training row has a target), and a guard
    would cost launches in every step.
    """
    flat_hidden, flat_target = scored_rows(hidden, target_pos, target_rows)
    # Rows 1..N of the table are the items: item i is class i - 1, padding (0) becomes -1, ignored.
    return (item_ce or ItemCrossEntropy()).global_mean(flat_hidden, item_weight[1:-1], flat_target - 1, -1)


# Unbounded: one entry per shape, and a captured CUDA graph may hold pointers into them.
@functools.cache
def _pair_layout(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the 2n rows of NT-Xent: each row's positive, the self-pair mask and the not-positive
    mask. They depend on n only, so they are built once per batch size rather than every step."""
    rows = torch.arange(2 * n, device=device)
    positive = torch.remainder(rows + n, 2 * n)
    return positive, rows[:, None] == rows[None, :], positive[:, None] != rows[None, :]


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float = 1.0,
            groups: torch.Tensor | None = None) -> torch.Tensor:
    """SimCLR NT-Xent between paired rows of a and b with dot-product logits.

    Row i of a and row i of b are positives; all other rows of both are negatives. With groups
    (e.g. intent ids), rows of the same group are removed from each other's negatives, as ICLRec
    does for intent contrast.

    All 2n rows are scored against each other in one [2n, 2n] product of x = [a; b]: row i's
    positive is row (i + n) mod 2n, and what is not a candidate (the row itself, and with groups
    the rest of its group apart from its positive) is set to -inf. The cross-entropy does not
    depend on the order of a row's candidates, so this is SimCLR's loss in a handful of kernels.

    With several data-parallel ranks the candidates are the rows of the whole global batch
    (_nt_xent_global).
    """
    if world_size() > 1:
        return _nt_xent_global(a, b, temperature, groups)
    n = a.shape[0]
    x = torch.cat([a, b]).float()
    logits = (x @ x.t()) / temperature
    positive, self_pairs, not_positive = _pair_layout(n, a.device)
    if groups is None:
        excluded = self_pairs
    else:
        both = torch.cat([groups, groups])
        excluded = (both[:, None] == both[None, :]) & not_positive
    logits = torch.where(excluded, float("-inf"), logits)
    return F.cross_entropy(logits, positive)


def _nt_xent_global(a: torch.Tensor, b: torch.Tensor, temperature: float,
                    groups: torch.Tensor | None) -> torch.Tensor:
    """nt_xent over the global batch: this rank's 2n rows are the anchors, the 2m rows of every
    rank the candidates, so the ranks' losses average to the one-rank loss at batch m."""
    a_all, first = gather_rows(a)
    b_all, _ = gather_rows(b)
    n, m = a.shape[0], a_all.shape[0]
    x = torch.cat([a_all, b_all]).float()                                   # [2m, D]
    own = torch.arange(first, first + n, device=a.device)
    anchor_rows = torch.cat([own, own + m])                                 # this rank's rows of x
    # Anchors taken from the gathered tensor, so their gradient also returns through the gather.
    logits = (x.index_select(0, anchor_rows) @ x.t()) / temperature         # [2n, 2m]
    positive = torch.remainder(anchor_rows + m, 2 * m)
    cols = torch.arange(2 * m, device=a.device)[None, :]
    excluded = cols == anchor_rows[:, None]
    if groups is not None:
        both, _ = gather_rows(groups)
        both = torch.cat([both, both])
        excluded = (both[anchor_rows][:, None] == both[None, :]) & (cols != positive[:, None])
    logits = torch.where(excluded, float("-inf"), logits)
    # Every rank has 2n anchors, 2m in all: this rank's share of the mean needs no collective.
    return F.cross_entropy(logits, positive, reduction="sum") * world_size() / (2 * m)


def cluster_loss(samples: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """ELCRec's cluster term on unit vectors: mean sample-centre squared distance minus mean
    centre-centre squared distance, both over all pairs (the reference code's K x K mean keeps
    the zero diagonal).

    For unit vectors ||x - y||^2 = 2 - 2 x.y, so both means reduce to dot products with the sum
    of the centres c: (2 - 2 mean(x).c / K) - (2 - 2 c.c / K^2) = 2 (c.c / K - mean(x).c) / K,
    which costs O((B + K) D) instead of the B x K and K x K distance matrices.

    Linear in the mean of the samples, so with data-parallel ranks of equal batch sizes the
    ranks' values average to the global batch's (adarec/parallel.py).
    """
    k = centers.shape[0]
    center_sum = centers.sum(0)
    return 2.0 * (center_sum.dot(center_sum) / k - samples.mean(0).dot(center_sum)) / k
