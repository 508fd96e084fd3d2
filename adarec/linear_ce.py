"""Cross-entropy of a linear layer over a large item table, without the rows x items logits.

loss_r = logsumexp_j(h_r . w_j) - h_r . w_{t_r}, for rows whose target t_r is not ignore_index,
reduced by mean (over those rows) or sum, exactly what `F.cross_entropy(h @ W.T, t)` computes.

Four implementations with one signature (docs/catalogs.md):
- `linear_cross_entropy`: the eager twin and test oracle. It materialises the R x N logits
  (R x N x 4 bytes: 51 GB for 12,800 rows and a million items).
- `kept_softmax_linear_cross_entropy` (here): the same full logits, turned in place into the
  softmax the backward needs, with the log-sum-exp and the target's logit read on the way. Its
  backward is one pass (softmax * g, minus g at the target) before the two products, where
  F.cross_entropy's log-softmax, its backward and the one-hot fill pass over the R x N logits
  about six times. What `auto` takes on a CPU for a catalogue that fits one item chunk: there the
  CE of a small model is memory-bound (docs/method.md, "Trimmed batches", the CPU numbers).
- `chunked_linear_cross_entropy` (here): plain PyTorch that walks the items in chunks. The
  forward keeps a running log-sum-exp per row; the backward recomputes each chunk's logits,
  turns them into softmax probabilities with the saved log-sum-exp and accumulates dH and dW
  chunk by chunk. Memory is R x item_chunk, whatever N is; the price is one more R x N x D
  matmul (the recomputation) than the eager path.
- `fused_linear_cross_entropy` (kernels/linear_ce.py): the same decomposition in Triton kernels
  that keep the logits tile in registers.

The custom implementations compute each row's loss inside one autograd function: the forward
keeps the running log-sum-exp and picks the target's logit out of the chunk (or tile) that holds
it, so both terms come from the same products; the backward forms (softmax_r - onehot_{t_r}) * g_r
chunk by chunk, subtracting g_r at the target's column before the two gradient products. The
only item-sized tensor is the weight gradient itself, and nothing is added with atomics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adarec.config import CE_ITEM_CHUNK

REDUCTIONS = ("mean", "sum")
# The Triton kernels hold a whole hidden row in registers (kernels/linear_ce.py).
FUSED_MAX_WIDTH = 256


def check_inputs(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, reduction: str) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [R, D] and weight [N, D]; got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if target.shape != (hidden.shape[0],):
        raise ValueError(f"target must be [R] = [{hidden.shape[0]}], got {tuple(target.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean", item_chunk: int | None = None):
    """The eager twin: F.cross_entropy of the full logits (hidden @ weight.T in the inputs' dtype,
    then float32). item_chunk is accepted for a common signature and unused."""
    check_inputs(hidden, weight, target, reduction)
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)


def target_mask(target: torch.Tensor, ignore_index: int, num_items: int) -> torch.Tensor:
    """Rows that count (target != ignore_index). A kept target outside 0..N-1 would silently
    score nothing, so it is asserted on the device (no host sync), as F.cross_entropy refuses it."""
    keep = target != ignore_index
    torch._assert_async((~keep | ((target >= 0) & (target < num_items))).all(),
                        f"cross-entropy targets must be ignore_index ({ignore_index}) or in 0..{num_items - 1}")
    return keep


def reduce_rows(per_row: torch.Tensor, keep: torch.Tensor, reduction: str) -> torch.Tensor:
    """Sum or mean over the kept rows of the per-row losses (0 on ignored rows), with no
    host-side count: an all-ignored batch gives 0 for sum and NaN (0 / 0) for mean, as
    F.cross_entropy does."""
    total = per_row.sum()
    return total if reduction == "sum" else total / keep.sum()


def _target_in_chunk(target: torch.Tensor, keep: torch.Tensor, start: int, width: int):
    """(column of each row's target within the chunk [start, start + width), clamped to it;
    whether the chunk holds a kept row's target)."""
    local = target - start
    held = keep & (local >= 0) & (local < width)
    return local.clamp(0, width - 1).unsqueeze(1), held


class _ChunkedRowLoss(torch.autograd.Function):
    """Per-row cross-entropy [R] (float32, 0 on ignored rows), item chunk by item chunk."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, keep: torch.Tensor,
                item_chunk: int) -> torch.Tensor:
        lse = hidden.new_full((hidden.shape[0],), float("-inf"), dtype=torch.float32)
        target_logit = torch.zeros_like(lse)
        for start in range(0, weight.shape[0], item_chunk):
            logits = (hidden @ weight[start:start + item_chunk].t()).float()
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
            column, held = _target_in_chunk(target, keep, start, logits.shape[1])
            target_logit = torch.where(held, logits.gather(1, column).squeeze(1), target_logit)
        ctx.save_for_backward(hidden, weight, target, keep, lse)
        ctx.item_chunk = item_chunk
        return torch.where(keep, lse - target_logit, torch.zeros_like(lse))

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        hidden, weight, target, keep, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
        # A frozen table (ADRec's warm-up epochs) gets no gradient and costs no product.
        grad_weight = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        g = torch.where(keep, grad_rows.float(), torch.zeros_like(lse))
        h32 = hidden.float()
        for start in range(0, weight.shape[0], ctx.item_chunk):
            chunk = weight[start:start + ctx.item_chunk]
            # (softmax - onehot) * g: the softmax recomputed from the saved log-sum-exp, the onehot
            # subtracted at the target's column (one element per row, so no two writes collide).
            probs = (hidden @ chunk.t()).float().sub_(lse[:, None]).exp_().mul_(g[:, None])
            column, held = _target_in_chunk(target, keep, start, probs.shape[1])
            probs.scatter_add_(1, column, torch.where(held, -g, torch.zeros_like(g)).unsqueeze(1))
            if need_hidden:
                grad_hidden.addmm_(probs, chunk.float())
            if need_weight:
                torch.mm(probs.t(), h32, out=grad_weight[start:start + ctx.item_chunk])
        return (grad_hidden.to(hidden.dtype) if need_hidden else None,
                grad_weight.to(weight.dtype) if need_weight else None, None, None, None)


class _KeptSoftmaxRowLoss(torch.autograd.Function):
    """Per-row cross-entropy [R] (float32, 0 on ignored rows) from the full logits, keeping their
    softmax (float32, R x N) for the backward instead of the logits."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                keep: torch.Tensor) -> torch.Tensor:
        # A fresh tensor in either dtype (.float() of a float32 product is the product itself),
        # so the in-place steps below touch nothing anyone else holds.
        logits = (hidden @ weight.t()).float()
        column = torch.where(keep, target, torch.zeros_like(target)).unsqueeze(1)
        target_logit = logits.gather(1, column).squeeze(1)
        peak = logits.amax(dim=1, keepdim=True)
        probs = logits.sub_(peak).exp_()
        total = probs.sum(dim=1, keepdim=True)
        probs.div_(total)
        lse = (peak + total.log()).squeeze(1)
        ctx.save_for_backward(hidden, weight, column, keep, probs)
        return torch.where(keep, lse - target_logit, torch.zeros_like(lse))

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        hidden, weight, column, keep, probs = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        g = torch.where(keep, grad_rows.float(), torch.zeros_like(grad_rows, dtype=torch.float32))
        # (softmax - onehot) * g in a new tensor: the kept softmax serves a second backward too.
        grad = (probs * g[:, None]).scatter_add_(1, column, -g[:, None]).to(hidden.dtype)
        return (grad @ weight if need_hidden else None, grad.t() @ hidden if need_weight else None, None, None)


def kept_softmax_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                      ignore_index: int = -100, reduction: str = "mean",
                                      item_chunk: int | None = None):
    """The loss of `linear_cross_entropy` with fewer passes over the logits (module docstring);
    item_chunk is accepted for a common signature and unused."""
    check_inputs(hidden, weight, target, reduction)
    keep = target_mask(target, ignore_index, weight.shape[0])
    return reduce_rows(_KeptSoftmaxRowLoss.apply(hidden, weight, target, keep), keep, reduction)


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                 ignore_index: int = -100, reduction: str = "mean",
                                 item_chunk: int = CE_ITEM_CHUNK):
    """The loss of `linear_cross_entropy` with at most R x item_chunk logits alive at a time."""
    check_inputs(hidden, weight, target, reduction)
    if item_chunk < 1:
        raise ValueError(f"item_chunk must be >= 1, got {item_chunk}")
    keep = target_mask(target, ignore_index, weight.shape[0])
    return reduce_rows(_ChunkedRowLoss.apply(hidden, weight, target, keep, item_chunk), keep, reduction)
