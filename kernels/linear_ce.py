"""Fused linear cross-entropy: per-row losses over an item table in Triton kernels.

The eager twin and the definition is `adarec.linear_ce.linear_cross_entropy`; this op has the same
signature and results, and follows the chunked PyTorch path's scheme (adarec/linear_ce.py): the
target's logit is read from the tile that computes it and the onehot is subtracted inside the
backward. Inputs may be float32 or bfloat16; products are accumulated in float32 and no
rows x items tensor is ever written to memory.

Kernels (each keeps a [BLOCK_R, BLOCK_N] logits tile in registers, computed by one tl.dot over
the whole hidden width, D <= 256):
1. forward: program (row block, item split) walks the item blocks of its split with an online
   log-sum-exp (running max m and sum s of exp(z - m)), picks up the target's logit when a block
   holds it, and stores (m, s, target logit); the splits are then combined in PyTorch:
   lse = M + log(sum_s s * exp(m - M)). Splitting the items keeps the GPU busy when there are
   few rows.
2. backward, rows: program (row block, item split) recomputes its logits tiles, forms
   p = (exp(z - lse) - onehot) * g and accumulates p @ W into a [BLOCK_R, D] partial dH per split.
3. backward, items: program (item block, row split) recomputes the transposed tiles and
   accumulates p^T @ H into a partial dW per split.
The per-split partials are summed afterwards (a deterministic reduction, no atomics), at the cost
of recomputing the logits twice in the backward: 5 R x N x D products per step against 3 for the
eager path, but no R x N tensor read or written (docs/catalogs.md has the measured trade-off).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from adarec.profiling.opcount import TRITON_LAUNCH
from torch.profiler import record_function

from adarec.linear_ce import FUSED_MAX_WIDTH, check_inputs, linear_cross_entropy, reduce_rows, target_mask

BLOCK_R, BLOCK_N = 64, 64


@triton.jit
def _logits_tile(a, b_ptrs, b_mask, FP32_EXACT: tl.constexpr):
    """(a [X, BD] @ b.T in float32, b): b is the [Y, BD] tile at b_ptrs, returned for reuse."""
    b = tl.load(b_ptrs, mask=b_mask, other=0.0)
    if FP32_EXACT:
        return tl.dot(a, tl.trans(b), input_precision="ieee"), b
    return tl.dot(a, tl.trans(b)), b


@triton.jit
def _forward_kernel(h_ptr, w_ptr, t_ptr, part_max_ptr, part_sum_ptr, part_tgt_ptr, R, N, D, stride_h, stride_w,
                    items_per_split, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    FP32_EXACT: tl.constexpr):
    pid_r, split = tl.program_id(0), tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    dims = tl.arange(0, BLOCK_D)
    row_ok, dim_ok = rows < R, dims < D
    h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    run_max = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_R,), tl.float32)
    tgt_logit = tl.zeros((BLOCK_R,), tl.float32)
    first = split * items_per_split
    last = tl.minimum(first + items_per_split, N)
    for start in range(first, last, BLOCK_N):
        items = start + tl.arange(0, BLOCK_N)
        item_ok = items < last
        z, _ = _logits_tile(h, w_ptr + items[:, None].to(tl.int64) * stride_w + dims[None, :],
                            item_ok[:, None] & dim_ok[None, :], FP32_EXACT)
        z = tl.where(item_ok[None, :], z, float("-inf"))
        tgt_logit += tl.sum(tl.where(items[None, :] == tgt[:, None], z, 0.0), axis=1)
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
    tl.store(part_max_ptr + split * R + rows, run_max, mask=row_ok)
    tl.store(part_sum_ptr + split * R + rows, run_sum, mask=row_ok)
    tl.store(part_tgt_ptr + split * R + rows, tgt_logit, mask=row_ok)


@triton.jit
def _grad_hidden_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, g_ptr, part_ptr, R, N, D, stride_h, stride_w, items_per_split,
                        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        FP32_EXACT: tl.constexpr):
    pid_r, split = tl.program_id(0), tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    dims = tl.arange(0, BLOCK_D)
    row_ok, dim_ok = rows < R, dims < D
    h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    first = split * items_per_split
    last = tl.minimum(first + items_per_split, N)
    for start in range(first, last, BLOCK_N):
        items = start + tl.arange(0, BLOCK_N)
        item_ok = items < last
        w_ptrs = w_ptr + items[:, None].to(tl.int64) * stride_w + dims[None, :]
        w_mask = item_ok[:, None] & dim_ok[None, :]
        z, w = _logits_tile(h, w_ptrs, w_mask, FP32_EXACT)
        onehot = (items[None, :] == tgt[:, None]).to(tl.float32)
        p = tl.where(item_ok[None, :], (tl.exp(z - lse[:, None]) - onehot) * g[:, None], 0.0)
        if FP32_EXACT:
            acc += tl.dot(p, w, input_precision="ieee")
        else:
            acc += tl.dot(p.to(w.dtype), w)
    out = part_ptr + (split * R + rows[:, None]).to(tl.int64) * D + dims[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def _grad_weight_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, g_ptr, part_ptr, R, N, D, stride_h, stride_w, rows_per_split,
                        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        FP32_EXACT: tl.constexpr):
    pid_n, split = tl.program_id(0), tl.program_id(1)
    items = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    item_ok, dim_ok = items < N, dims < D
    w = tl.load(w_ptr + items[:, None].to(tl.int64) * stride_w + dims[None, :],
                mask=item_ok[:, None] & dim_ok[None, :], other=0.0)
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    first = split * rows_per_split
    last = tl.minimum(first + rows_per_split, R)
    for start in range(first, last, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        row_ok = rows < last
        h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_h + dims[None, :]
        h_mask = row_ok[:, None] & dim_ok[None, :]
        z, h = _logits_tile(w, h_ptrs, h_mask, FP32_EXACT)              # z: [BLOCK_N, BLOCK_R]
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
        onehot = (items[:, None] == tgt[None, :]).to(tl.float32)
        p = tl.where(row_ok[None, :], (tl.exp(z - lse[None, :]) - onehot) * g[None, :], 0.0)
        if FP32_EXACT:
            acc += tl.dot(p, h, input_precision="ieee")
        else:
            acc += tl.dot(p.to(h.dtype), h)
    out = part_ptr + (split * N + items[:, None]).to(tl.int64) * D + dims[None, :]
    tl.store(out, acc, mask=item_ok[:, None] & dim_ok[None, :])


def _split_plan(blocks: int, length: int, block: int, device: torch.device,
                requested: int | None) -> tuple[int, int]:
    """(splits, length per split) for the looped dimension: enough programs to fill the GPU
    (about 4 per SM), each split a whole number of blocks, so splits never share a block and
    none is empty; `requested` overrides the count (tests)."""
    if requested is not None:
        wanted = requested
    elif device.type != "cuda":
        wanted = 1
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        wanted = min(triton.cdiv(4 * sms, max(blocks, 1)), 64)
    wanted = max(1, min(wanted, triton.cdiv(length, block)))
    per_split = triton.cdiv(triton.cdiv(length, wanted), block) * block
    return triton.cdiv(length, per_split), per_split


class _FusedRowLoss(torch.autograd.Function):
    """Per-row cross-entropy [R] (float32, 0 on ignored rows) from the Triton kernels."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, keep: torch.Tensor,
                splits: int | None) -> torch.Tensor:
        exact = hidden.dtype == torch.float32
        hidden, weight = _interpreted_copies(hidden.contiguous(), weight.contiguous())
        # Ignored rows get target -1, which no item column matches: they pick up no logit and no onehot.
        target = torch.where(keep, target, torch.full_like(target, -1)).contiguous()
        rows, width = hidden.shape
        items = weight.shape[0]
        block_d = max(16, triton.next_power_of_2(width))
        row_blocks = triton.cdiv(rows, BLOCK_R)
        item_splits, per_split = _split_plan(row_blocks, items, BLOCK_N, hidden.device, splits)
        parts = torch.empty((3, item_splits, rows), dtype=torch.float32, device=hidden.device)
        with record_function(TRITON_LAUNCH + "linear_ce_fwd"):
            _forward_kernel[(row_blocks, item_splits)](
                hidden, weight, target, parts[0], parts[1], parts[2], rows, items, width, hidden.stride(0),
                weight.stride(0), per_split, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, BLOCK_D=block_d, FP32_EXACT=exact)
        part_max, part_sum, part_tgt = parts
        top = part_max.max(dim=0).values
        lse = top + torch.log((part_sum * torch.exp(part_max - top)).sum(dim=0))
        ctx.save_for_backward(hidden, weight, target, keep, lse)
        ctx.config = (block_d, exact, splits)
        return torch.where(keep, lse - part_tgt.sum(dim=0), torch.zeros_like(lse))

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        hidden, weight, target, keep, lse = ctx.saved_tensors
        block_d, exact, splits = ctx.config
        rows, width = hidden.shape
        items = weight.shape[0]
        g = torch.where(keep, grad_rows.float(), torch.zeros_like(lse)).contiguous()
        grad_hidden = grad_weight = None
        consts = {"BLOCK_R": BLOCK_R, "BLOCK_N": BLOCK_N, "BLOCK_D": block_d, "FP32_EXACT": exact}
        if ctx.needs_input_grad[0]:
            row_blocks = triton.cdiv(rows, BLOCK_R)
            item_splits, per_split = _split_plan(row_blocks, items, BLOCK_N, hidden.device, splits)
            part = torch.empty((item_splits, rows, width), dtype=torch.float32, device=hidden.device)
            with record_function(TRITON_LAUNCH + "linear_ce_bwd_hidden"):
                _grad_hidden_kernel[(row_blocks, item_splits)](
                    hidden, weight, target, lse, g, part, rows, items, width, hidden.stride(0), weight.stride(0),
                    per_split, **consts)
            grad_hidden = part.sum(dim=0).to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            item_blocks = triton.cdiv(items, BLOCK_N)
            row_splits, per_split = _split_plan(item_blocks, rows, BLOCK_R, hidden.device, splits)
            part = torch.empty((row_splits, items, width), dtype=torch.float32, device=hidden.device)
            with record_function(TRITON_LAUNCH + "linear_ce_bwd_weight"):
                _grad_weight_kernel[(item_blocks, row_splits)](
                    hidden, weight, target, lse, g, part, rows, items, width, hidden.stride(0), weight.stride(0),
                    per_split, **consts)
            grad_weight = part.sum(dim=0).to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                               ignore_index: int = -100, reduction: str = "mean", item_chunk: int | None = None,
                               splits: int | None = None) -> torch.Tensor:
    """The loss of `adarec.linear_ce.linear_cross_entropy` from the Triton kernels.

    item_chunk is accepted for a common signature (the kernels walk the items in blocks of
    BLOCK_N whatever it is); splits fixes the number of item and row splits (tests)."""
    check_inputs(hidden, weight, target, reduction)
    if hidden.shape[1] > FUSED_MAX_WIDTH:
        raise ValueError(f"the fused linear cross-entropy supports hidden sizes up to {FUSED_MAX_WIDTH}, "
                         f"got {hidden.shape[1]}; use kernels.backend=eager or auto")
    if hidden.dtype != weight.dtype or hidden.dtype not in (torch.float32, torch.bfloat16):
        # float16 is left out: p * g is rounded to the input dtype before the tile products, and
        # at R ~ 10^4 rows and 10^6 items it falls below float16's smallest subnormal.
        raise ValueError(f"hidden and weight must both be float32 or both bfloat16, got {hidden.dtype} and "
                         f"{weight.dtype}")
    if hidden.shape[0] == 0:                       # no rows, no grid to launch: nothing to compute
        return linear_cross_entropy(hidden, weight, target, ignore_index, reduction)
    keep = target_mask(target, ignore_index, weight.shape[0])
    return reduce_rows(_FusedRowLoss.apply(hidden, weight, target, keep, splits), keep, reduction)


def _interpreted_copies(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The interpreter's tl.dot mishandles bf16; products of bf16 values are exact in float32, so
    under the interpreter the kernels run on float32 copies of bf16 inputs (autograd casts the
    gradients back). The kernels' FP32_EXACT stays what the GPU would use (False for bf16)."""
    if hidden.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return hidden.float(), weight.float()
    return hidden, weight
