"""Losses over the global batch when it is split over data-parallel ranks.

`train.batch_size` is the global batch: N ranks each compute B / N of its rows, and DeepSpeed
averages the ranks' gradients. For that to be the gradient of the one-rank loss at batch B
(docs/method.md, "Data parallelism"), every batch statistic must be a global one:

- a mean over targets, positions or anchors, whose count differs between ranks, is each rank's
  sum times N over the global count (`global_mean`): the ranks' values then average to the
  global mean, and so do their gradients;
- a contrastive loss whose negatives are the other rows of the batch scores the local anchors
  against the candidates of every rank (`gather_rows`, which passes gradients back to the rank
  that owns each row);
- a mean over rows is already global: every rank has the same number of rows per step (the
  sampler pads the epoch to a multiple of N).

With one process (or none initialised) everything here is the plain single-batch computation,
with no communication.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["gather_rows", "global_mean", "world_size"]


def world_size() -> int:
    """Ranks of the default process group; 1 without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def global_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """total / count over the whole global batch, as this rank's share.

    One rank: total / max(count, 1). N ranks: N * total / max(sum of every rank's count, 1), so
    that the average over ranks (what DeepSpeed does to gradients) is the global mean.
    """
    count = count.detach().to(torch.float32)
    ranks = world_size()
    if ranks > 1:
        count = count.clone()
        dist.all_reduce(count)
        return total * ranks / count.clamp_min(1.0)
    return total / count.clamp_min(1.0)


class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0 whose backward hands each rank the summed gradient of its rows.

    Every rank's loss reads every row, so a row's gradient is the sum over ranks: an all_reduce
    of the gathered gradient, then this rank's slice (all_reduce works on every backend, gloo
    included, unlike reduce_scatter).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The rows of every rank, rank by rank [N * n, ...], and where this rank's rows start.

    Differentiable for floating tensors (see _GatherRows); integer tensors are gathered as data.
    Every rank must pass the same shape.
    """
    ranks = world_size()
    if ranks == 1:
        return x, 0
    start = dist.get_rank() * x.shape[0]
    if x.is_floating_point() and x.requires_grad:
        return _GatherRows.apply(x), start
    parts = [torch.empty_like(x) for _ in range(ranks)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts), start
