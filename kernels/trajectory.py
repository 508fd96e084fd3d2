"""Fused diffusion trajectory: in-kernel noise, per-position MLP denoiser, variable depth.

The eager twin and the definition of every quantity is `adarec.diffusion.diffusion_trajectory`;
this op has the same signature and results (plus a `seed`).

Custom ops. The forward and the backward are registered custom ops,
`torch.ops.adarec.trajectory_forward` and `torch.ops.adarec.trajectory_backward` (tensors,
bools and optional tensors in, tensors out; the seed is an int64 tensor [1], the optional row
keys an int64 tensor [B]), each with a fake implementation that gives the outputs' shapes and
dtypes without launching a kernel, and the forward carries an autograd formula that calls the
backward op. So `torch.compile` traces through `fused_diffusion_trajectory` without a graph
break, each op one opaque node of the graph, and both ops pass `torch.library.opcheck`. The
row map below is not an op argument: each op rebuilds it from its tensor inputs (cheap, and
free of host synchronisation).

Work layout. Only valid (non-padding) positions are computed. Users are sorted by depth and
their valid positions laid end to end as "rows"; a program takes R consecutive rows and walks
the levels 1..max depth of its rows, so x0 = E^0 is read once per row and, in the backward,
dE^0 is summed over a user's levels in registers (no atomics). Sorting by depth keeps the rows
of one block at similar depths, so few rows idle in the level loop. The row map is built on
the device from `lengths` and the packed pairs, with an upper bound (B * L rows) as the grid
so no host synchronisation is needed and ragged lengths never recompile anything.

Noise. eps for (user u, level k, position p, channel c) is Philox(seed; counter (c0, c1, c2, c3)),
Box-Muller'd to N(0, 1), with c0 = (L - 1 - p) * D + c (p counted from the right end, where the
newest item sits, so a batch trimmed to fewer padding columns draws the same noise) and, for the
rest of the counter, one of two keyings:
- by row key, when `keys` [B] (int64, non-negative) gives each user a key of its own: c1 = k,
  c2 and c3 = the low and high 32 bits of keys[u]. A training row's noise then depends on its key
  only, not on where the row sits in the batch or which other rows are in it (so data-parallel
  ranks, each holding part of a batch, draw what one process would);
- by batch position, without `keys`: c1 = u * levels + k, c2 = c3 = 0 (so key 0 draws what the
  batch's first user draws without keys; the two keyings share no other stream).
Keying by (user, level) rather than by packed pair keeps a pair's noise independent of which
other levels are computed (the depth-gradient probe adds pairs without moving any value). The
backward regenerates the same values from the same counters, so no noise tensor is ever stored.
`noise=` replaces the RNG by a given [P, L, D] tensor (for exact comparison with the eager twin);
`zero_noise=True` is eps = 0; either way `keys` is unused.

L_deno counts only pairs with `loss_weight` > 0 (the active levels; a probe level is computed
for its reconstruction but is not part of the denoising objective).

Backward, in two kernels:
1. rows kernel (same layout as the forward): recompute eps_hat, form d eps_hat, push it back
   through the MLP to dE^0, and store d eps_hat (fp32) for the second kernel;
2. weights kernel: one program per (H chunk, row split) recomputes the chunk's hidden
   activations and accumulates dW1, dW2, db1, db2 and d step_table for its chunk in registers
   across all its rows; the S row splits are summed afterwards (per-block partial sums, then a
   reduction, instead of contended atomics).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from adarec.profiling.opcount import TRITON_LAUNCH
from torch.profiler import record_function

NOISE_RNG, NOISE_GIVEN, NOISE_ZERO = 0, 1, 2
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.erf(x * _SQRT1_2))


@triton.jit
def _gelu_grad(x):
    cdf = 0.5 * (1.0 + tl.erf(x * _SQRT1_2))
    return cdf + x * _INV_SQRT_2PI * tl.exp(-0.5 * x * x)


@triton.jit
def _row_streams(keys_ptr, user, row_mask, NUM_LEVELS, HAS_KEYS: tl.constexpr):
    """The per-row parts of the Philox counter (module docstring, "Noise"): level_base [R] (c1 is
    level_base + level) and the row key's low and high words key_lo, key_hi [R] (c2, c3; zero
    without keys). Loaded once per block of rows, outside the level loop."""
    if HAS_KEYS:
        key = tl.load(keys_ptr + user, mask=row_mask, other=0)
        level_base = tl.zeros_like(user)
        key_lo = key.to(tl.uint32)              # truncation keeps the low 32 bits
        key_hi = (key >> 32).to(tl.uint32)
    else:
        level_base = user * NUM_LEVELS
        key_lo = tl.zeros_like(user).to(tl.uint32)
        key_hi = key_lo
    return level_base, key_lo, key_hi


@triton.jit
def _normal_from_words(i1, i2):
    """N(0, 1) (fp32) from two uint32 words by Box-Muller, the cos output, as
    adarec.keyed_random.normal_from_words computes it: each word's top 24 bits k give
    (k + 1/2) / 2**24, so log() never sees 0 (its argument is at least 2**-25) and the radius is
    at most 5.9 whatever the words (tests feed the extreme ones)."""
    # The top word rounds to 1.0 in fp32; clamped to 1 - 2**-24 as on the CPU (open_unit).
    u1 = tl.minimum(((i1 >> 8).to(tl.float32) + 0.5) * 5.960464477539063e-08, 0.9999999403953552)
    u2 = tl.minimum(((i2 >> 8).to(tl.float32) + 0.5) * 5.960464477539063e-08, 0.9999999403953552)
    return tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)


@triton.jit
def _level_noise(seed, noise_ptr, stream, key_lo, key_hi, pair, pos, cols, row_mask, col_mask, L, D,
                 NOISE_MODE: tl.constexpr):
    """eps [R, BD] (fp32) of rows at positions pos [R]: drawn with the counter words stream [R]
    (c1) and key_lo, key_hi [R] (c2, c3) or, for given noise, read at packed pairs pair [R]."""
    mask = row_mask[:, None] & col_mask[None, :]
    if NOISE_MODE == 0:
        # Keyed by the distance from the right end (the newest item), so a batch trimmed to a
        # narrower width draws the same noise at every position it keeps.
        c0 = ((L - 1 - pos)[:, None] * D + cols[None, :]).to(tl.uint32)
        c1 = (stream[:, None] + cols[None, :] * 0).to(tl.uint32)
        c2 = tl.broadcast_to(key_lo[:, None], c0.shape)
        c3 = tl.broadcast_to(key_hi[:, None], c0.shape)
        i1, i2, _, _ = tl.philox(seed, c0, c1, c2, c3)
        eps = tl.where(mask, _normal_from_words(i1, i2), 0.0)
    elif NOISE_MODE == 1:
        offs = (pair.to(tl.int64) * L + pos)[:, None] * D + cols[None, :]
        eps = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        eps = tl.zeros((pos.shape[0], cols.shape[0]), dtype=tl.float32)
    return eps


@triton.jit
def _round_to(x, like_ptr, UPCAST: tl.constexpr):
    """x rounded to the element type of like_ptr (round to nearest even).

    Compiled, this is a plain cast. Under the interpreter (UPCAST) a cast to bf16 truncates, so
    the rounding is done on the bits first; the cast of the rounded value is then exact.
    """
    dtype = like_ptr.dtype.element_ty
    if UPCAST:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _dot(a, b, acc, w_ptr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with both operands rounded to the weights' dtype and fp32 accumulation.

    UPCAST (set only under TRITON_INTERPRET=1, whose tl.dot mishandles bf16) multiplies the
    rounded operands as fp32: products of bf16 values are exact in fp32, so this is the same
    arithmetic as a bf16 tensor-core product with fp32 accumulation.
    """
    a = _round_to(a, w_ptr, UPCAST)
    b = _round_to(b, w_ptr, UPCAST)
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _denoiser_eps_hat(ek, level, cols, col_mask, w1_ptr, b1_ptr, step_ptr, w2_ptr, b2_ptr, D, H,
                      BH: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """eps_hat = W2 gelu(W1 ek + b1 + step[level]) + b2 on rows ek [R, BD] (fp32 result).

    The hidden width H is streamed in BH-wide chunks so only [R, BH] activations and one chunk
    of each weight are live at a time; products accumulate in fp32.
    """
    acc = tl.zeros(ek.shape, dtype=tl.float32)
    for h0 in range(0, H, BH):
        hid = h0 + tl.arange(0, BH)
        hmask = hid < H
        wmask = col_mask[:, None] & hmask[None, :]
        w1t = tl.load(w1_ptr + hid[None, :] * D + cols[:, None], mask=wmask, other=0.0)        # [BD, BH]
        pre = _dot(ek, w1t, tl.zeros((ek.shape[0], BH), dtype=tl.float32), w1_ptr, PRECISION, UPCAST)
        pre += tl.load(b1_ptr + hid, mask=hmask, other=0.0).to(tl.float32)[None, :]
        pre += tl.load(step_ptr + level * H + hid, mask=hmask, other=0.0).to(tl.float32)[None, :]
        w2t = tl.load(w2_ptr + cols[None, :] * H + hid[:, None], mask=tl.trans(wmask), other=0.0)     # [BH, BD]
        acc = _dot(_gelu(pre), w2t, acc, w1_ptr, PRECISION, UPCAST)
    return acc + tl.load(b2_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _load_rows(row_user_ptr, row_pos_ptr, num_rows_ptr, depth_ptr, offsets_ptr, start, R: tl.constexpr):
    """The rows start..start+R of the depth-sorted row map: user, position, depth, first pair."""
    rows = start + tl.arange(0, R)
    row_mask = rows < tl.load(num_rows_ptr)
    user = tl.load(row_user_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    pos = tl.load(row_pos_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    depth = tl.where(row_mask, tl.load(depth_ptr + user, mask=row_mask, other=0), -1)
    pair0 = tl.load(offsets_ptr + user, mask=row_mask, other=0).to(tl.int64)
    return row_mask, user, pos, depth, pair0


@triton.jit
def _load_block(e0_ptr, row_user_ptr, row_pos_ptr, num_rows_ptr, depth_ptr, offsets_ptr, start, L, D,
                R: tl.constexpr, BD: tl.constexpr):
    """A block's rows (as `_load_rows`), its column range and its E^0 rows x0 [R, BD] in fp32."""
    row_mask, user, pos, depth, pair0 = _load_rows(row_user_ptr, row_pos_ptr, num_rows_ptr, depth_ptr,
                                                   offsets_ptr, start, R)
    cols = tl.arange(0, BD)
    col_mask = cols < D
    mask = row_mask[:, None] & col_mask[None, :]
    x0 = tl.load(e0_ptr + (user * L + pos)[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return row_mask, user, pos, depth, pair0, cols, col_mask, mask, x0


@triton.jit
def _noisy_level(level, x0, depth, row_mask, col_mask, level_base, key_lo, key_hi, pair0, pos, cols, seed,
                 noise_ptr, sqrt_abar_ptr, sqrt_1m_abar_ptr, L, D, NOISE_MODE: tl.constexpr):
    """One level of the block's rows: which rows reach it, its schedule values, its pairs, the
    noise eps and E^k = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps (fp32); the rows' counter parts
    level_base, key_lo, key_hi come from `_row_streams`."""
    active = row_mask & (level <= depth)
    amask = active[:, None] & col_mask[None, :]
    a = tl.load(sqrt_abar_ptr + level).to(tl.float32)
    s = tl.load(sqrt_1m_abar_ptr + level).to(tl.float32)
    pair = pair0 + level
    eps = _level_noise(seed, noise_ptr, level_base + level, key_lo, key_hi, pair, pos, cols, active, col_mask, L,
                       D, NOISE_MODE)
    return active, amask, a, s, pair, eps, a * x0 + s * eps


# ----------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["L", "D", "H", "NUM_LEVELS"])
def _trajectory_fwd_kernel(
    e0_ptr, noise_ptr, seed_ptr, keys_ptr, row_user_ptr, row_pos_ptr, num_rows_ptr, depth_ptr, offsets_ptr,
    sqrt_abar_ptr, sqrt_1m_abar_ptr, w1_ptr, b1_ptr, step_ptr, w2_ptr, b2_ptr, loss_w_ptr,
    ehat_ptr, loss_part_ptr,
    L, D, H, NUM_LEVELS,
    R: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, NOISE_MODE: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, HAS_KEYS: tl.constexpr,
):
    pid = tl.program_id(0)
    row_mask, user, pos, depth, pair0, cols, col_mask, mask, x0 = _load_block(
        e0_ptr, row_user_ptr, row_pos_ptr, num_rows_ptr, depth_ptr, offsets_ptr, pid * R, L, D, R, BD)
    out_dt = ehat_ptr.dtype.element_ty
    # Level 0 is E^0 itself (every user has it in the packed layout; depth >= 0 guards misuse).
    mask0 = mask & (depth >= 0)[:, None]
    tl.store(ehat_ptr + (pair0 * L + pos)[:, None] * D + cols[None, :], x0.to(out_dt), mask=mask0)
    seed = tl.load(seed_ptr)
    level_base, key_lo, key_hi = _row_streams(keys_ptr, user, row_mask, NUM_LEVELS, HAS_KEYS)
    loss = tl.zeros((R,), dtype=tl.float32)
    for level in range(1, tl.max(depth) + 1):
        active, amask, a, s, pair, eps, ek = _noisy_level(
            level, x0, depth, row_mask, col_mask, level_base, key_lo, key_hi, pair0, pos, cols, seed, noise_ptr,
            sqrt_abar_ptr, sqrt_1m_abar_ptr, L, D, NOISE_MODE)
        eps_hat = _denoiser_eps_hat(ek, level, cols, col_mask, w1_ptr, b1_ptr, step_ptr, w2_ptr, b2_ptr,
                                    D, H, BH, PRECISION, UPCAST)
        ehat = (ek - s * eps_hat) / a
        tl.store(ehat_ptr + (pair * L + pos)[:, None] * D + cols[None, :], _round_to(ehat, ehat_ptr, UPCAST),
                 mask=amask)
        err = tl.where(amask, eps_hat - eps, 0.0)
        loss_w = tl.load(loss_w_ptr + pair, mask=active, other=0.0)
        loss += tl.sum(err * err, axis=1) * loss_w
    tl.store(loss_part_ptr + pid, tl.sum(loss, axis=0) / D)


@triton.jit(do_not_specialize=["L", "D", "H", "NUM_LEVELS"])
def _trajectory_bwd_rows_kernel(
    e0_ptr, noise_ptr, seed_ptr, keys_ptr, row_user_ptr, row_pos_ptr, num_rows_ptr, depth_ptr, offsets_ptr,
    sqrt_abar_ptr, sqrt_1m_abar_ptr, w1_ptr, b1_ptr, step_ptr, w2_ptr, b2_ptr, loss_w_ptr,
    grad_ehat_ptr, loss_coef_ptr, de0_ptr, deps_hat_ptr,
    L, D, H, NUM_LEVELS,
    R: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, NOISE_MODE: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, HAS_KEYS: tl.constexpr,
):
    pid = tl.program_id(0)
    row_mask, user, pos, depth, pair0, cols, col_mask, mask, x0 = _load_block(
        e0_ptr, row_user_ptr, row_pos_ptr, num_rows_ptr, depth_ptr, offsets_ptr, pid * R, L, D, R, BD)
    dx0 = tl.load(grad_ehat_ptr + (pair0 * L + pos)[:, None] * D + cols[None, :],
                  mask=mask & (depth >= 0)[:, None], other=0.0).to(tl.float32)
    seed = tl.load(seed_ptr)
    level_base, key_lo, key_hi = _row_streams(keys_ptr, user, row_mask, NUM_LEVELS, HAS_KEYS)
    # dL/d eps_hat from L_deno = sum w ||eps_hat - eps||^2 / (D * count), times the incoming grad.
    loss_coef = tl.load(loss_coef_ptr)
    for level in range(1, tl.max(depth) + 1):
        active, amask, a, s, pair, eps, ek = _noisy_level(
            level, x0, depth, row_mask, col_mask, level_base, key_lo, key_hi, pair0, pos, cols, seed, noise_ptr,
            sqrt_abar_ptr, sqrt_1m_abar_ptr, L, D, NOISE_MODE)
        eps_hat = _denoiser_eps_hat(ek, level, cols, col_mask, w1_ptr, b1_ptr, step_ptr, w2_ptr, b2_ptr,
                                    D, H, BH, PRECISION, UPCAST)
        out_offs = (pair * L + pos)[:, None] * D + cols[None, :]
        g = tl.load(grad_ehat_ptr + out_offs, mask=amask, other=0.0).to(tl.float32)
        # Ehat = (ek - s eps_hat) / a
        loss_w = tl.load(loss_w_ptr + pair, mask=active, other=0.0)
        d_eps_hat = tl.where(amask, -(s / a) * g + (loss_coef * loss_w)[:, None] * (eps_hat - eps), 0.0)
        tl.store(deps_hat_ptr + out_offs, d_eps_hat, mask=amask)
        d_ek = g / a
        for h0 in range(0, H, BH):
            hid = h0 + tl.arange(0, BH)
            hmask = hid < H
            wmask = col_mask[:, None] & hmask[None, :]
            w1t = tl.load(w1_ptr + hid[None, :] * D + cols[:, None], mask=wmask, other=0.0)    # [BD, BH]
            pre = _dot(ek, w1t, tl.zeros((R, BH), dtype=tl.float32), w1_ptr, PRECISION, UPCAST)
            pre += tl.load(b1_ptr + hid, mask=hmask, other=0.0).to(tl.float32)[None, :]
            pre += tl.load(step_ptr + level * H + hid, mask=hmask, other=0.0).to(tl.float32)[None, :]
            w2 = tl.load(w2_ptr + cols[:, None] * H + hid[None, :], mask=wmask, other=0.0)     # [BD, BH]
            d_pre = _dot(d_eps_hat, w2, tl.zeros((R, BH), dtype=tl.float32), w1_ptr, PRECISION, UPCAST)
            d_pre = d_pre * _gelu_grad(pre)
            d_ek = _dot(d_pre, tl.trans(w1t), d_ek, w1_ptr, PRECISION, UPCAST)
        dx0 += a * d_ek
    tl.store(de0_ptr + (user * L + pos)[:, None] * D + cols[None, :], _round_to(dx0, de0_ptr, UPCAST), mask=mask)


@triton.jit(do_not_specialize=["L", "D", "H", "NUM_LEVELS", "num_blocks"])
def _trajectory_bwd_weights_kernel(
    e0_ptr, noise_ptr, seed_ptr, keys_ptr, row_user_ptr, row_pos_ptr, num_rows_ptr, depth_ptr, offsets_ptr,
    sqrt_abar_ptr, sqrt_1m_abar_ptr, w1_ptr, b1_ptr, step_ptr, w2_ptr,
    deps_hat_ptr, dw1_part_ptr, db1_part_ptr, dstep_part_ptr, dw2_part_ptr, db2_part_ptr,
    L, D, H, NUM_LEVELS, num_blocks,
    R: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, LEVELS: tl.constexpr, SPLITS: tl.constexpr,
    NOISE_MODE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, HAS_KEYS: tl.constexpr,
):
    chunk = tl.program_id(0)
    split = tl.program_id(1)
    cols = tl.arange(0, BD)
    col_mask = cols < D
    hid = chunk * BH + tl.arange(0, BH)
    hmask = hid < H
    wmask = col_mask[:, None] & hmask[None, :]
    w1t = tl.load(w1_ptr + hid[None, :] * D + cols[:, None], mask=wmask, other=0.0)            # [BD, BH]
    w2 = tl.load(w2_ptr + cols[:, None] * H + hid[None, :], mask=wmask, other=0.0)             # [BD, BH]
    b1 = tl.load(b1_ptr + hid, mask=hmask, other=0.0).to(tl.float32)
    seed = tl.load(seed_ptr)
    level_ids = tl.arange(0, LEVELS)
    dw1t = tl.zeros((BD, BH), dtype=tl.float32)   # dW1^T chunk
    dw2 = tl.zeros((BD, BH), dtype=tl.float32)
    db1 = tl.zeros((BH,), dtype=tl.float32)
    db2 = tl.zeros((BD,), dtype=tl.float32)
    dstep = tl.zeros((LEVELS, BH), dtype=tl.float32)
    for block in range(split, num_blocks, SPLITS):
        row_mask, user, pos, depth, pair0, _cols, _col_mask, _mask, x0 = _load_block(
            e0_ptr, row_user_ptr, row_pos_ptr, num_rows_ptr, depth_ptr, offsets_ptr, block * R, L, D, R, BD)
        if tl.max(depth) >= 1:
            level_base, key_lo, key_hi = _row_streams(keys_ptr, user, row_mask, NUM_LEVELS, HAS_KEYS)
            for level in range(1, tl.max(depth) + 1):
                active, amask, _a, _s, pair, _eps, ek = _noisy_level(
                    level, x0, depth, row_mask, col_mask, level_base, key_lo, key_hi, pair0, pos, cols, seed,
                    noise_ptr, sqrt_abar_ptr, sqrt_1m_abar_ptr, L, D, NOISE_MODE)
                pre = _dot(ek, w1t, tl.zeros((R, BH), dtype=tl.float32), w1_ptr, PRECISION, UPCAST) + b1[None, :]
                pre += tl.load(step_ptr + level * H + hid, mask=hmask, other=0.0).to(tl.float32)[None, :]
                d_eps_hat = tl.load(deps_hat_ptr + (pair * L + pos)[:, None] * D + cols[None, :], mask=amask,
                                    other=0.0)
                d_pre = _dot(d_eps_hat, w2, tl.zeros((R, BH), dtype=tl.float32), w1_ptr, PRECISION, UPCAST)
                d_pre = d_pre * _gelu_grad(pre)
                d_pre = tl.where(active[:, None], d_pre, 0.0)
                dw1t = _dot(tl.trans(ek), d_pre, dw1t, w1_ptr, PRECISION, UPCAST)
                dw2 = _dot(tl.trans(d_eps_hat), _gelu(pre), dw2, w1_ptr, PRECISION, UPCAST)
                d_pre_sum = tl.sum(d_pre, axis=0)
                db1 += d_pre_sum
                dstep += tl.where(level_ids[:, None] == level, d_pre_sum[None, :], 0.0)
                db2 += tl.sum(d_eps_hat, axis=0)
    # Partial sums of this row split; the SPLITS partials are reduced by the launcher.
    tl.store(dw1_part_ptr + split * H * D + hid[None, :] * D + cols[:, None], dw1t, mask=wmask)
    tl.store(dw2_part_ptr + split * D * H + cols[:, None] * H + hid[None, :], dw2, mask=wmask)
    tl.store(db1_part_ptr + split * H + hid, db1, mask=hmask)
    tl.store(dstep_part_ptr + split * LEVELS * H + level_ids[:, None] * H + hid[None, :], dstep,
             mask=hmask[None, :])
    if chunk == 0:
        tl.store(db2_part_ptr + split * D + cols, db2, mask=col_mask)


@triton.jit(do_not_specialize=["L", "D", "NUM_LEVELS"])
def _noise_kernel(seed_ptr, keys_ptr, row_user_ptr, row_pos_ptr, num_rows_ptr, depth_ptr, offsets_ptr, noise_ptr,
                  L, D, NUM_LEVELS, R: tl.constexpr, BD: tl.constexpr, MAX_LEVEL: tl.constexpr,
                  HAS_KEYS: tl.constexpr):
    """Writes the noise the trajectory kernels draw, for testing the RNG stream."""
    pid = tl.program_id(0)
    row_mask, user, pos, depth, pair0 = _load_rows(row_user_ptr, row_pos_ptr, num_rows_ptr, depth_ptr,
                                               offsets_ptr, pid * R, R)
    cols = tl.arange(0, BD)
    col_mask = cols < D
    seed = tl.load(seed_ptr)
    level_base, key_lo, key_hi = _row_streams(keys_ptr, user, row_mask, NUM_LEVELS, HAS_KEYS)
    for level in range(1, MAX_LEVEL + 1):
        active = row_mask & (level <= depth)
        pair = pair0 + level
        eps = _level_noise(seed, noise_ptr, level_base + level, key_lo, key_hi, pair, pos, cols, active, col_mask,
                           L, D, 0)
        tl.store(noise_ptr + (pair * L + pos)[:, None] * D + cols[None, :], eps,
                 mask=active[:, None] & col_mask[None, :])


# ----------------------------------------------------------------------------- launcher


class _Layout:
    """Depth-sorted row map of the valid positions, built on the device without host syncs."""

    def __init__(self, lengths: torch.Tensor, pair_user: torch.Tensor, batch: int, length: int,
                 pair_level: torch.Tensor | None = None, loss_weight: torch.Tensor | None = None):
        device = pair_user.device
        counts = torch.zeros(batch, dtype=torch.int64, device=device).index_add_(
            0, pair_user, torch.ones_like(pair_user))
        self.depth = (counts - 1).to(torch.int32)
        self.offsets = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
        lengths = lengths.to(device=device, dtype=torch.int64)
        order = torch.argsort(counts, stable=True)
        row_start = F.pad(lengths[order].cumsum(0), (1, 0))
        rows = torch.arange(batch * length, device=device)
        slot = torch.searchsorted(row_start[1:], rows, right=True).clamp_max(batch - 1)
        user = order[slot]
        self.row_user = user.to(torch.int32)
        self.row_pos = (length - lengths[user] + rows - row_start[slot]).clamp(0, length - 1).to(torch.int32)
        self.num_rows = row_start[-1:].to(torch.int32)
        # Rows entering L_deno: valid positions at levels >= 1, weighted by the pairs' loss weights.
        if loss_weight is None:
            self.noisy_rows = (lengths * (counts - 1)).sum().to(torch.float32).clamp_min(1.0)
        else:
            noisy = (pair_level > 0).to(torch.float32) * loss_weight.to(torch.float32)
            self.noisy_rows = (lengths[pair_user].to(torch.float32) * noisy).sum().clamp_min(1.0)
        self.max_rows = batch * length

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The row map as the forward op returns it and the backward op takes it back."""
        return self.row_user, self.row_pos, self.num_rows, self.depth, self.offsets, self.noisy_rows

    @classmethod
    def from_tensors(cls, row_user, row_pos, num_rows, depth, offsets, noisy_rows) -> _Layout:
        layout = cls.__new__(cls)
        layout.row_user, layout.row_pos, layout.num_rows = row_user, row_pos, num_rows
        layout.depth, layout.offsets, layout.noisy_rows = depth, offsets, noisy_rows
        layout.max_rows = row_user.numel()
        return layout


def _config(d: int, h: int, dtype: torch.dtype) -> dict:
    block_d = max(16, triton.next_power_of_2(d))
    # Rows per program and hidden chunk: [R, BD] fp32 accumulators plus one [BD, BH] weight chunk.
    # fp32 operands take twice the shared memory of bf16 ones in tl.dot: halve the chunk so the
    # largest kernel stays near 100 KB (compiled for sm_90 in tests/test_trajectory_kernel.py).
    rows = 32 if block_d <= 128 else 16
    block_h = 64 if block_d <= 128 else 32
    if dtype == torch.float32:
        rows, block_h = 16, block_h // 2
    block_h = min(block_h, max(16, triton.next_power_of_2(h)))
    # From D = 256 on, the [R, BD] fp32 tiles a program holds outgrow the 255 registers a thread
    # may have at 4 warps and spill to local memory: an sm_90 compile of the bf16 kernels keeps
    # 1.6-2.1 KB of stack per thread. 8 warps and 16-wide hidden chunks cut it to 0.4-0.8 KB (fp32:
    # 1.5-1.6 KB to 0.3-0.75 KB); none of the tilings that tl.dot allows removes it (that needs the
    # hidden dimension split across programs). Measured by profiling/trajectory_tiling.py
    # (docs/gpu_check.md); which spill-free-enough tiling is fastest is for a GPU to time.
    num_warps = 4
    if block_d >= 256:
        block_h, num_warps = 16, 8
    override = os.environ.get("ADAREC_TRAJECTORY_TILING")
    if override:    # "R,BH,WARPS": for timing other tilings on a GPU (profiling/bench_trajectory.py)
        rows, block_h, num_warps = _parse_tiling(override)
    # Under the interpreter, bf16/fp16 products run on fp32 copies of the rounded operands (see _dot).
    upcast = dtype != torch.float32 and triton_interpreter_enabled()
    # fp32 (and upcast) operands: IEEE products to match the eager twin (tl.dot defaults to TF32 on GPUs).
    precision = "ieee" if dtype == torch.float32 or upcast else None
    return {"R": rows, "BD": block_d, "BH": block_h, "PRECISION": precision, "UPCAST": upcast,
            "num_warps": num_warps}


def _parse_tiling(text: str) -> tuple[int, int, int]:
    try:
        rows, block_h, warps = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"ADAREC_TRAJECTORY_TILING={text!r}: expected R,BH,WARPS, e.g. 16,16,8") from None
    ok = (rows >= 16 and block_h >= 16 and warps in (1, 2, 4, 8, 16)
          and all(v & (v - 1) == 0 for v in (rows, block_h)))
    if not ok:
        raise ValueError(f"ADAREC_TRAJECTORY_TILING={text!r}: R and BH must be powers of two >= 16 (tl.dot's "
                         "smallest tile) and WARPS one of 1, 2, 4, 8, 16")
    return rows, block_h, warps


def _weight_splits(device: torch.device, num_chunks: int, num_blocks: int) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(num_blocks, (2 * sms) // max(1, num_chunks)))
    return 2


def _noise_mode(noise, zero_noise) -> int:
    if zero_noise:
        return NOISE_ZERO
    return NOISE_RNG if noise is None else NOISE_GIVEN


# ----------------------------------------------------------------------------- custom ops


class _Launch:
    """What the kernels of one call need, from the op's tensor inputs.

    The forward op builds the row map (`_Layout`, two dozen small device ops, no host sync) and
    returns its tensors as extra outputs; the backward op gets them back (`layout`) instead of
    building it again. The fp32 views of the schedule and loss weights cost nothing when their
    inputs are fp32 already.
    """

    def __init__(self, e0, lengths, pair_user, pair_level, sqrt_abar, sqrt_1m_abar, w1, b1, step_table, w2, b2,
                 noise, seed, zero_noise, loss_weight, keys, layout: _Layout | None = None):
        self.batch, self.length, self.d = e0.shape
        self.h = w1.shape[0]
        self.e0 = e0.contiguous()
        self.w1, self.b1, self.step_table, self.w2, self.b2 = (t.contiguous() for t in (w1, b1, step_table, w2, b2))
        self.seed = seed.contiguous()
        self.mode = _noise_mode(noise, zero_noise)
        self.noise_arg = noise.contiguous() if self.mode == NOISE_GIVEN else self.e0
        # Row keys matter only to drawn noise; without them the seed (int64 too) stands in as the
        # unused pointer, so the compiled kernels see one pointer type either way.
        self.has_keys = keys is not None and self.mode == NOISE_RNG
        self.keys_arg = keys.to(device=e0.device, dtype=torch.int64).contiguous() if self.has_keys else self.seed
        self.layout = layout or _Layout(lengths, pair_user, self.batch, self.length, pair_level, loss_weight)
        device = e0.device
        self.loss_w = (torch.ones(pair_user.shape, dtype=torch.float32, device=device) if loss_weight is None
                       else loss_weight.to(device=device, dtype=torch.float32).contiguous())
        self.sa = sqrt_abar.to(device=device, dtype=torch.float32).contiguous()
        self.s1m = sqrt_1m_abar.to(device=device, dtype=torch.float32).contiguous()
        self.num_levels = sqrt_abar.numel()
        self.cfg = _config(self.d, self.h, e0.dtype)
        self.num_blocks = triton.cdiv(self.layout.max_rows, self.cfg["R"])

    def leading_args(self) -> tuple:
        """The arguments every trajectory kernel starts with: E^0, noise, seed, row keys, the row
        map and the schedule."""
        layout = self.layout
        return (self.e0, self.noise_arg, self.seed, self.keys_arg, layout.row_user, layout.row_pos, layout.num_rows,
                layout.depth, layout.offsets, self.sa, self.s1m)


# The ops' arguments, in order: those of `fused_diffusion_trajectory` with the seed as an int64
# tensor [1] (and without its generator). `noise` is used only when given and zero_noise is
# False; `keys` (int64 [B]) only when the noise is drawn.
@torch.library.custom_op("adarec::trajectory_forward", mutates_args=())
def trajectory_forward(
    e0: torch.Tensor, lengths: torch.Tensor, pair_user: torch.Tensor, pair_level: torch.Tensor,
    sqrt_abar: torch.Tensor, sqrt_one_minus_abar: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
    step_table: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, noise: torch.Tensor | None, seed: torch.Tensor,
    zero_noise: bool, loss_weight: torch.Tensor | None, keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """(ehat [P, L, D] in e0's dtype, L_deno: an fp32 scalar, then the row map for the backward:
    row_user, row_pos [B L], num_rows [1], depth [B], offsets [B + 1], all int32, and the fp32
    count of rows in L_deno); see `fused_diffusion_trajectory`."""
    run = _Launch(e0, lengths, pair_user, pair_level, sqrt_abar, sqrt_one_minus_abar, w1, b1, step_table, w2, b2,
                  noise, seed, zero_noise, loss_weight, keys)
    ehat = torch.zeros((pair_user.numel(), run.length, run.d), dtype=e0.dtype, device=e0.device)
    loss_part = torch.empty(run.num_blocks, dtype=torch.float32, device=e0.device)
    with record_function(TRITON_LAUNCH + "trajectory_fwd"):
        _trajectory_fwd_kernel[(run.num_blocks,)](
            *run.leading_args(), run.w1, run.b1, run.step_table, run.w2, run.b2, run.loss_w, ehat, loss_part,
            run.length, run.d, run.h, run.num_levels, NOISE_MODE=run.mode, HAS_KEYS=run.has_keys, **run.cfg,
        )
    return ehat, loss_part.sum() / run.layout.noisy_rows, *run.layout.tensors()


@trajectory_forward.register_fake
def _trajectory_forward_fake(e0, lengths, pair_user, pair_level, sqrt_abar, sqrt_one_minus_abar, w1, b1,
                             step_table, w2, b2, noise, seed, zero_noise, loss_weight, keys=None):
    """Shapes and dtypes only: ehat [P, L, D] in e0's dtype, the fp32 scalar loss, the row map."""
    batch, length, d = e0.shape
    ehat = e0.new_empty((pair_user.shape[0], length, d))
    i32 = {"dtype": torch.int32}
    return (ehat, e0.new_empty((), dtype=torch.float32), e0.new_empty((batch * length,), **i32),
            e0.new_empty((batch * length,), **i32), e0.new_empty((1,), **i32), e0.new_empty((batch,), **i32),
            e0.new_empty((batch + 1,), **i32), e0.new_empty((), dtype=torch.float32))


@torch.library.custom_op("adarec::trajectory_backward", mutates_args=())
def trajectory_backward(
    grad_ehat: torch.Tensor, grad_loss: torch.Tensor, e0: torch.Tensor, lengths: torch.Tensor,
    pair_user: torch.Tensor, pair_level: torch.Tensor, sqrt_abar: torch.Tensor, sqrt_one_minus_abar: torch.Tensor,
    w1: torch.Tensor, b1: torch.Tensor, step_table: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
    noise: torch.Tensor | None, seed: torch.Tensor, zero_noise: bool, loss_weight: torch.Tensor | None,
    keys: torch.Tensor | None, row_user: torch.Tensor, row_pos: torch.Tensor, num_rows: torch.Tensor,
    depth: torch.Tensor, offsets: torch.Tensor, noisy_rows: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dE^0, dW1, db1, d step_table, dW2, db2) of `trajectory_forward`, each in its
    input's dtype, given the gradients of ehat and of the loss, the forward's inputs and the row
    map it returned; the noise is regenerated (from the same seed and row keys)."""
    layout = _Layout.from_tensors(row_user, row_pos, num_rows, depth, offsets, noisy_rows)
    run = _Launch(e0, lengths, pair_user, pair_level, sqrt_abar, sqrt_one_minus_abar, w1, b1, step_table, w2, b2,
                  noise, seed, zero_noise, loss_weight, keys, layout)
    d, h, device = run.d, run.h, e0.device
    grad_ehat = grad_ehat.contiguous()
    loss_coef = (grad_loss.float() * 2.0 / (d * run.layout.noisy_rows)).reshape(1)
    de0 = torch.zeros_like(run.e0)
    deps_hat = torch.empty(grad_ehat.shape, dtype=torch.float32, device=device)
    with record_function(TRITON_LAUNCH + "trajectory_bwd_rows"):
        _trajectory_bwd_rows_kernel[(run.num_blocks,)](
            *run.leading_args(), run.w1, run.b1, run.step_table, run.w2, run.b2, run.loss_w, grad_ehat, loss_coef, de0,
            deps_hat, run.length, d, h, run.num_levels, NOISE_MODE=run.mode, HAS_KEYS=run.has_keys, **run.cfg,
        )
    num_chunks = triton.cdiv(h, run.cfg["BH"])
    splits = _weight_splits(device, num_chunks, run.num_blocks)
    step_levels = step_table.shape[0]
    levels = max(16, triton.next_power_of_2(step_levels))
    f32 = {"dtype": torch.float32, "device": device}
    dw1 = torch.empty((splits, h, d), **f32)
    dw2 = torch.empty((splits, d, h), **f32)
    db1 = torch.empty((splits, h), **f32)
    db2 = torch.empty((splits, d), **f32)
    dstep = torch.empty((splits, levels, h), **f32)
    with record_function(TRITON_LAUNCH + "trajectory_bwd_weights"):
        _trajectory_bwd_weights_kernel[(num_chunks, splits)](
            *run.leading_args(), run.w1, run.b1, run.step_table, run.w2, deps_hat, dw1, db1, dstep, dw2, db2,
            run.length, d, h, run.num_levels, run.num_blocks,
            LEVELS=levels, SPLITS=splits, NOISE_MODE=run.mode, HAS_KEYS=run.has_keys, **run.cfg,
        )
    return (de0, dw1.sum(0).to(w1.dtype), db1.sum(0).to(b1.dtype), dstep.sum(0)[:step_levels].to(step_table.dtype),
            dw2.sum(0).to(w2.dtype), db2.sum(0).to(b2.dtype))


@trajectory_backward.register_fake
def _trajectory_backward_fake(grad_ehat, grad_loss, e0, lengths, pair_user, pair_level, sqrt_abar,
                              sqrt_one_minus_abar, w1, b1, step_table, w2, b2, noise, seed, zero_noise, loss_weight,
                              keys, *row_map):
    """Shapes and dtypes only: one new contiguous gradient per differentiable input, like it."""
    return tuple(t.new_empty(t.shape) for t in (e0, w1, b1, step_table, w2, b2))


def _trajectory_setup_context(ctx, inputs, output) -> None:
    """Saves the forward's inputs and its row map: the backward op recomputes the activations
    and regenerates the noise from them (neither is stored)."""
    *tensors, zero_noise, loss_weight, keys = inputs
    row_map = output[2:]
    ctx.mark_non_differentiable(*row_map)
    # `noise`, `loss_weight` and `keys` may be None: save_for_backward keeps them.
    ctx.save_for_backward(*tensors, loss_weight, keys, *row_map)
    ctx.zero_noise = zero_noise
    ctx.row_map_size = len(row_map)


def _trajectory_backward_fn(ctx, grad_ehat, grad_loss, *row_map_grads):
    """Gradients of trajectory_forward's inputs: E^0 and the denoiser's weights; the integer
    layout, the schedule, the noise, the seed, the loss weights and the row keys get none.

    An output that did not reach the loss arrives as None (under torch.compile) and counts as
    a zero gradient."""
    saved = ctx.saved_tensors
    *tensors, loss_weight, keys = saved[: -ctx.row_map_size]
    row_map = saved[-ctx.row_map_size:]
    e0 = tensors[0]
    if grad_ehat is None:
        grad_ehat = e0.new_zeros((tensors[2].shape[0], *e0.shape[1:]))
    if grad_loss is None:
        grad_loss = torch.zeros((), dtype=torch.float32, device=e0.device)
    de0, dw1, db1, dstep, dw2, db2 = torch.ops.adarec.trajectory_backward(
        grad_ehat, grad_loss, *tensors, ctx.zero_noise, loss_weight, keys, *row_map)
    # In trajectory_forward's argument order: e0, lengths, pair_user, pair_level, sqrt_abar,
    # sqrt_one_minus_abar, w1, b1, step_table, w2, b2, noise, seed, zero_noise, loss_weight, keys.
    return de0, None, None, None, None, None, dw1, db1, dstep, dw2, db2, None, None, None, None, None


trajectory_forward.register_autograd(_trajectory_backward_fn, setup_context=_trajectory_setup_context)


def _as_seed_tensor(seed, generator, device) -> torch.Tensor:
    if seed is None:
        # Drawn on the device from torch's RNG: reproducible under torch.manual_seed, no host sync.
        return torch.randint(0, 2**62, (1,), generator=generator, device=device, dtype=torch.int64)
    if isinstance(seed, torch.Tensor):
        return seed.to(device=device, dtype=torch.int64).reshape(1)
    return torch.tensor([int(seed)], dtype=torch.int64, device=device)


def _check(e0, lengths, pair_user, pair_level, sqrt_abar, w1, step_table, w2, noise, keys=None) -> None:
    if e0.dim() != 3:
        raise ValueError(f"e0 must be [B, L, D], got shape {tuple(e0.shape)}")
    if e0.device.type != "cuda" and not triton_interpreter_enabled():
        raise RuntimeError("the fused trajectory runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1); "
                           f"got e0 on {e0.device}")
    if e0.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"e0 must be float32, bfloat16 or float16, got {e0.dtype}")
    # Tile sizes and the product precision are chosen from one dtype for inputs and weights.
    mixed = [name for name, t in (("w1", w1), ("w2", w2), ("step_table", step_table)) if t.dtype != e0.dtype]
    if mixed:
        raise TypeError(f"{', '.join(mixed)} must have e0's dtype {e0.dtype} (got "
                        f"{', '.join(str(t.dtype) for t in (w1, w2, step_table) if t.dtype != e0.dtype)})")
    batch, length, d = e0.shape
    h = w1.shape[0]
    if tuple(w1.shape) != (h, d) or tuple(w2.shape) != (d, h) or step_table.shape[-1] != h:
        raise ValueError(f"denoiser weights do not fit D={d}: w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}, "
                         f"step_table {tuple(step_table.shape)}")
    if step_table.shape[0] != sqrt_abar.numel():
        raise ValueError(f"step_table has {step_table.shape[0]} levels, the schedule {sqrt_abar.numel()}")
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must be [B={batch}], got {tuple(lengths.shape)}")
    if pair_user.shape != pair_level.shape or pair_user.dim() != 1:
        raise ValueError("pair_user and pair_level must be 1-D and of the same length")
    if noise is not None and tuple(noise.shape) != (pair_user.numel(), length, d):
        raise ValueError(f"noise must be [P, L, D] = {(pair_user.numel(), length, d)}, got {tuple(noise.shape)}")
    _check_keys(keys, batch)


def _check_keys(keys, batch: int) -> None:
    """Shape and dtype of the row keys (their values are not read: that would wait for the device)."""
    if keys is None:
        return
    if keys.dtype != torch.int64:
        raise TypeError(f"keys must be int64 (one row key per user), got {keys.dtype}")
    if tuple(keys.shape) != (batch,):
        raise ValueError(f"keys must be [B={batch}], one per user, got {tuple(keys.shape)}")


def triton_interpreter_enabled() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fused_diffusion_trajectory(
    e0: torch.Tensor,
    lengths: torch.Tensor,
    pair_user: torch.Tensor,
    pair_level: torch.Tensor,
    sqrt_abar: torch.Tensor,
    sqrt_one_minus_abar: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    step_table: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | torch.Tensor | None = None,
    zero_noise: bool = False,
    loss_weight: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused twin of `adarec.diffusion.diffusion_trajectory` (same arguments and results).

    The pairs must follow the packed layout (sorted by user, each user's computed levels
    0..C_u - 1 contiguous, as `adarec.diffusion.pack_levels` builds them). Noise comes from
    Philox keyed by `seed` (drawn from torch's RNG, or `generator`, when not given) and
    (user, level); `noise` replaces it exactly. `keys` (int64 [B], non-negative, one per user)
    keys the noise by each row's key instead of its index in the batch, so a row draws the same
    noise wherever it sits and whatever else is in the batch (module docstring, "Noise").

    Checks the inputs here (in Python: under torch.compile they run while tracing, on shapes
    and dtypes), then calls the custom op `torch.ops.adarec.trajectory_forward`; autograd runs
    its backward op.
    """
    if torch.is_autocast_enabled(e0.device.type):
        # Under autocast the step table arrives in bf16 and E^0 in fp32; the kernels take one
        # dtype, and bf16 would round sqrt(abar_k) (0.9999...) to 1, so the op runs in fp32.
        e0, w1, b1, step_table, w2, b2 = (t.float() for t in (e0, w1, b1, step_table, w2, b2))
        noise = noise.float() if noise is not None else None
    _check(e0, lengths, pair_user, pair_level, sqrt_abar, w1, step_table, w2, noise, keys)
    if pair_user.numel() == 0:
        return e0.new_zeros((0, *e0.shape[1:])), e0.sum() * 0.0
    seed_t = _as_seed_tensor(seed, generator, e0.device)
    ehat, loss, *_row_map = torch.ops.adarec.trajectory_forward(
        e0, lengths, pair_user, pair_level, sqrt_abar, sqrt_one_minus_abar, w1, b1, step_table, w2, b2, noise,
        seed_t, zero_noise, loss_weight, keys)
    return ehat, loss


def trajectory_noise(e0: torch.Tensor, lengths: torch.Tensor, pair_user: torch.Tensor, max_level: int,
                     seed: int | torch.Tensor, num_levels: int | None = None,
                     keys: torch.Tensor | None = None) -> torch.Tensor:
    """The [P, L, D] noise the fused kernels draw for these pairs, seed and row keys (zero where
    unused: level-0 rows and padding), with a schedule of num_levels levels (default
    max_level + 1). For tests of the RNG stream; training never materialises it."""
    batch, length, d = e0.shape
    _check_keys(keys, batch)
    layout = _Layout(lengths, pair_user, batch, length)
    cfg = _config(d, 4 * d, torch.float32)
    seed_t = _as_seed_tensor(seed, None, e0.device)
    out = torch.zeros((pair_user.numel(), length, d), dtype=torch.float32, device=e0.device)
    _noise_kernel[(triton.cdiv(layout.max_rows, cfg["R"]),)](
        seed_t, seed_t if keys is None else keys.to(e0.device).contiguous(), layout.row_user, layout.row_pos,
        layout.num_rows, layout.depth, layout.offsets, out, length, d, num_levels or max_level + 1, R=cfg["R"],
        BD=cfg["BD"], MAX_LEVEL=max_level, HAS_KEYS=keys is not None,
    )
    return out
