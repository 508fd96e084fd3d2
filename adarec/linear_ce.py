"""Cross-entropy of a linear layer over a large item table, without the rows x items logits.

loss_r = logsumexp_j(h_r . w_j) - h_r . w_{t_r}, for rows whose target t_r is not ignore_index,
reduced by mean (over those rows) or sum, exactly what `F.cross_entropy(h @ W.T, t)` computes.

Three implementations with one signature (docs/catalogs.md):
- `linear_cross_entropy`: the eager twin and test oracle. It materialises the R x N logits
  (R x N x 4 bytes: 51 GB for 12,800 rows and a million items).
- `chunked_linear_cross_entropy` (here): plain PyTorch that walks the items in chunks. The
  forward keeps a running log-sum-exp per row; the backward recomputes each chunk's logits,
  turns them into softmax probabilities with the saved log-sum-exp and accumulates dH and dW
  chunk by chunk. Memory is R x item_chunk, whatever N is; the price is one more R x N x D
  matmul (the recomputation) than the eager path.
- `fused_linear_cross_entropy` (kernels/linear_ce.py): the same decomposition in Triton kernels
  that keep the logits tile in registers.

All three split the loss the same way: the log-sum-exp over the items is the custom part, and
the target's logit h_r . w_{t_r} is a gather and a dot product that autograd differentiates.
The softmax gradient of a row is (softmax_r - onehot_{t_r}) * g_r; the softmax part flows through
the log-sum-exp's backward and the onehot part through the gather, so no kernel needs the target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adarec.config import KernelsConfig

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


def compose_loss(lse: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                 ignore_index: int, reduction: str) -> torch.Tensor:
    """The loss from the rows' log-sum-exp [R] (float32): lse - target logit over the kept rows.

    Ignored rows read item 0's vector (any valid index) and are zeroed, so nothing depends on
    a host-side count; an all-ignored batch gives 0 for sum and NaN (0 / 0) for mean, as
    F.cross_entropy does."""
    keep = target != ignore_index
    safe = torch.where(keep, target, torch.zeros_like(target))
    # F.embedding rather than index_select: its backward sums repeated targets without atomics
    # on CUDA, so the weight gradient is reproducible run to run.
    target_logit = (hidden.float() * F.embedding(safe, weight).float()).sum(-1)
    per_row = torch.where(keep, lse - target_logit, torch.zeros_like(lse))
    total = per_row.sum()
    return total if reduction == "sum" else total / keep.sum()


class _ChunkedLogSumExp(torch.autograd.Function):
    """logsumexp_j(h_r . w_j) [R] (float32), computed item chunk by item chunk."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, item_chunk: int) -> torch.Tensor:
        lse = hidden.new_full((hidden.shape[0],), float("-inf"), dtype=torch.float32)
        for start in range(0, weight.shape[0], item_chunk):
            logits = (hidden @ weight[start:start + item_chunk].t()).float()
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
        ctx.save_for_backward(hidden, weight, lse)
        ctx.item_chunk = item_chunk
        return lse

    @staticmethod
    def backward(ctx, grad_lse: torch.Tensor):
        hidden, weight, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
        # A frozen table (ADRec's warm-up epochs) gets no gradient and costs no product.
        grad_weight = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        h32 = hidden.float()
        for start in range(0, weight.shape[0], ctx.item_chunk):
            chunk = weight[start:start + ctx.item_chunk]
            # d lse_r / d logit_rj = softmax_rj, recomputed from the saved log-sum-exp.
            probs = (hidden @ chunk.t()).float().sub_(lse[:, None]).exp_().mul_(grad_lse[:, None])
            if need_hidden:
                grad_hidden.addmm_(probs, chunk.float())
            if need_weight:
                torch.mm(probs.t(), h32, out=grad_weight[start:start + ctx.item_chunk])
        return (grad_hidden.to(hidden.dtype) if need_hidden else None,
                grad_weight.to(weight.dtype) if need_weight else None, None)


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                 ignore_index: int = -100, reduction: str = "mean",
                                 item_chunk: int = KernelsConfig.ce_item_chunk):
    """The loss of `linear_cross_entropy` with at most R x item_chunk logits alive at a time."""
    check_inputs(hidden, weight, target, reduction)
    if item_chunk < 1:
        raise ValueError(f"item_chunk must be >= 1, got {item_chunk}")
    lse = _ChunkedLogSumExp.apply(hidden, weight, item_chunk)
    return compose_loss(lse, hidden, weight, target, ignore_index, reduction)
