"""Hierarchical Diffusion Augmentation, reference (eager) implementation (docs/method.md 2.2).

Every user u has a depth T_u (in training the deepest level any of its positions needs, for
scoring the last position's depth); its levels k = 0..T_u are *active*. Levels are computed as
rows of a packed layout of (user, level) pairs sorted by user: pair_user[P], pair_level[P],
offsets[B+1], a user's computed levels always 0..C_u - 1, contiguous. The models compute the
whole grid (`grid_levels`: C_u = T_max + 1 for every user, so shapes never depend on the data);
the levels above T_u carry no weight, or only the depth controller's gradient
(`model.depth_gradient`, docs/method.md 2.1). `pack_levels` builds the compact variable-depth
layout (C_u = T_u + 1, + 1 for the probe) that the fused kernel also accepts.
For each pair at level k >= 1, E^k = sqrt(abar_k) E^0 + sqrt(1 - abar_k) eps (a Gaussian per
user, level, position and channel, so the same (user, level) gets the same noise whatever else
is computed), a per-position MLP predicts eps, and the one-shot reconstruction
Ehat^k = (E^k - sqrt(1 - abar_k) eps_hat) / sqrt(abar_k) is the level's view of the user.
Level 0 is E^0 itself. Padding positions are not part of the trajectory: their rows are zero
and they do not enter L_deno. Only active pairs enter L_deno (`loss_weight`).

This file is the readable definition and the test oracle of the fused Triton trajectory; the
signature of `diffusion_trajectory` is the contract both share.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adarec.config import LEVEL_SCHEDULES
from adarec.keyed_random import KeyedDraws, Streams


def linear_beta_schedule(steps: int = 50, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear beta schedule, float64 [steps]; beta[i] is the beta of step i + 1."""
    return torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)


def level_tables(max_depth: int, steps: int = 50, schedule: str = "authors",
                 final_signal: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(abar_k) and sqrt(1 - abar_k) for levels k = 0..max_depth (level 0: 1 and 0).

    authors: level k is step k of the `steps`-step linear beta schedule (1e-4 to 0.02), the
    authors' code: at T_max = 8 the noise std runs from 0.01 to 0.11, every level close to E^0.
    span: abar falls linearly from 1 at level 0 to final_signal**2 at level max_depth,
    abar_k = 1 - (k / T_max)(1 - final_signal**2), so the levels run from lightly to heavily
    corrupted and the deepest keeps only `final_signal` of the signal's scale (docs/method.md 2.2).
    """
    if schedule not in LEVEL_SCHEDULES:
        raise ValueError(f"level schedule must be one of {', '.join(LEVEL_SCHEDULES)}, got {schedule!r}")
    if schedule == "authors":
        if not 0 <= max_depth <= steps:
            raise ValueError(f"max_depth must be in [0, {steps}], got {max_depth}")
        abar = torch.cumprod(1.0 - linear_beta_schedule(steps), 0)[:max_depth]
        abar = torch.cat([torch.ones(1, dtype=torch.float64), abar])
    else:
        if not 0.0 < final_signal < 1.0:
            raise ValueError(f"final_signal must be in (0, 1), got {final_signal}")
        if max_depth < 0:
            raise ValueError(f"max_depth must be >= 0, got {max_depth}")
        k = torch.arange(max_depth + 1, dtype=torch.float64)
        abar = 1.0 - k / max(max_depth, 1) * (1.0 - final_signal ** 2)
    return abar.sqrt().float(), (1.0 - abar).sqrt().float()


DEPTH_GRADIENTS = ("probe", "all", "none")


@dataclass
class PackedLevels:
    """The computed (user, level) pairs of a batch, sorted by user then level."""

    pair_user: torch.Tensor    # int64 [P]
    pair_level: torch.Tensor   # int64 [P]
    offsets: torch.Tensor      # int64 [B+1]; user u owns rows offsets[u]:offsets[u+1]
    pair_active: torch.Tensor  # bool [P]; level <= the depth packed for (False: an extra level of depth_gradient)

    @property
    def num_pairs(self) -> int:
        return self.pair_user.numel()


def pack_levels(depths: torch.Tensor, max_depth: int | None = None, depth_gradient: str = "none") -> PackedLevels:
    """Packed layout for depths T [B], only the levels each user needs (its size P is read on the
    host: the variable-depth layout of the kernels' tests and benchmarks; the models use the
    static `grid_levels`).

    none   user u gets levels 0..T_u, all active (levels above are never built);
    probe  also level T_u + 1 when T_u < max_depth, inactive;
    all    levels 0..max_depth, those above T_u inactive.
    """
    if depth_gradient not in DEPTH_GRADIENTS:
        raise ValueError(f"depth_gradient must be one of {', '.join(DEPTH_GRADIENTS)}, got {depth_gradient!r}")
    depths = depths.long()
    if depth_gradient != "none" and max_depth is None:
        raise ValueError(f"depth_gradient={depth_gradient!r} needs max_depth")
    if depth_gradient == "probe":
        counts = (depths + 2).clamp_max(max_depth + 1)
    elif depth_gradient == "all":
        counts = torch.full_like(depths, max_depth + 1)
    else:
        counts = depths + 1
    offsets = F.pad(counts.cumsum(0), (1, 0))
    pair_user = torch.repeat_interleave(torch.arange(depths.numel(), device=depths.device), counts)
    pair_level = torch.arange(pair_user.numel(), device=depths.device) - offsets[pair_user]
    return PackedLevels(pair_user, pair_level, offsets, pair_level <= depths[pair_user])


def grid_levels(depths: torch.Tensor, max_depth: int) -> PackedLevels:
    """Every level 0..max_depth of every user: P = B (T_max + 1) pairs, user-major.

    The layout the models train and score with (docs/method.md 2, "Packed layout"): it depends
    on B and T_max only, so building it reads nothing on the host and every step has the same
    shapes (a CUDA graph can replay it). Levels above a user's depth are computed but carry no
    weight: the depth masks of the fusion are 0 there and `pair_active` (level <= depth, the
    levels that enter L_deno) is False.
    """
    pair_user, pair_level, offsets = _grid(depths.numel(), max_depth + 1, depths.device)
    return PackedLevels(pair_user, pair_level, offsets, pair_level <= depths.long()[pair_user])


# Unbounded: one entry per shape, and a captured CUDA graph may hold pointers into them.
@functools.cache
def _grid(batch: int, levels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pair_user, pair_level and offsets of the grid: built once per (B, levels), not per step.
    Callers must not modify them in place."""
    pair = torch.arange(batch * levels, device=device)
    pair_user = torch.div(pair, levels, rounding_mode="floor")
    return pair_user, pair - pair_user * levels, torch.arange(batch + 1, device=device) * levels


def sinusoidal_embedding(steps: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of diffusion step indices: [n] -> [n, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=steps.device, dtype=torch.float32) / half)
    angles = steps.float()[:, None] * freqs[None]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(emb, (0, dim - 2 * half))


class Denoiser(nn.Module):
    """eps_hat = W2 act(W1 E^k + b1 + temb(k)) + b2, applied at every position.

    temb(k) = Linear(sinusoidal(k)) is computed once per forward as a [T_max + 1, H] table so
    the fused kernel can read it like any other weight.
    """

    def __init__(self, hidden: int, width: int, max_depth: int):
        super().__init__()
        self.max_depth = max_depth
        self.fc1 = nn.Linear(hidden, width)
        self.fc2 = nn.Linear(width, hidden)
        self.step_proj = nn.Linear(hidden, width)
        self.register_buffer("step_sinusoid", sinusoidal_embedding(torch.arange(max_depth + 1), hidden),
                             persistent=False)

    def step_table(self) -> torch.Tensor:
        return self.step_proj(self.step_sinusoid.to(self.step_proj.weight.dtype))


def denoise(e_k: torch.Tensor, level: torch.Tensor, w1, b1, step_table, w2, b2) -> torch.Tensor:
    """The denoiser MLP on [P, L, D] inputs whose rows sit at the given levels [P]."""
    hidden = F.linear(e_k, w1, b1) + step_table[level][:, None, :]
    return F.linear(F.gelu(hidden), w2, b2)


def diffusion_trajectory(
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
    seed: int | None = None,
    zero_noise: bool = False,
    loss_weight: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstructions Ehat [P, L, D] of every computed pair and the denoising loss L_deno.

    e0 [B, L, D] left-padded (valid positions are the last lengths[u]); noise [P, L, D] may be
    given for exact comparisons. By default eps is N(0, 1) drawn per (user, level) on a
    [B, levels, L, D] grid from `generator` (or a generator seeded with `seed`), so a pair's noise
    does not depend on which other pairs are computed; the fused twin draws a different but
    equally distributed stream with the same keying. With `keys` [B] (int64 row keys, what
    training passes) each computed pair's noise is drawn from its (row key, level) instead
    (adarec/keyed_random.py; `seed` and `generator` are then unused), so a row's noise does not
    depend on its place in the batch or on which other pairs are computed.
    `zero_noise` is eps = 0. Level-0 rows are E^0.
    L_deno = mean over pairs with level >= 1, loss_weight (default 1) and valid positions of
    ||eps_hat - eps||^2 / D, the weights counting in the mean (zero when nothing enters it).
    """
    num_pairs = pair_user.numel()
    batch, length = e0.shape[:2]
    x0 = e0[pair_user]
    if zero_noise:
        noise = torch.zeros_like(x0)
    elif noise is None and keys is not None:
        # Drawn for the computed pairs only, each from its (row key, level) block: the same
        # numbers as the whole [row, level] grid would hold there.
        draws = KeyedDraws(keys[pair_user], Streams.DIFFUSION)
        noise = draws.normal(tuple(e0.shape[1:]), x0.dtype, block=pair_level, blocks=sqrt_abar.numel(),
                             align_right=True)
    elif noise is None:
        if seed is not None:
            generator = torch.Generator(device=x0.device).manual_seed(int(seed))
        grid = torch.randn((batch, sqrt_abar.numel(), *e0.shape[1:]), generator=generator, device=x0.device,
                           dtype=x0.dtype)
        noise = grid[pair_user, pair_level]
    valid = (torch.arange(length, device=e0.device)[None, :] >= (length - lengths[pair_user])[:, None])
    a = sqrt_abar.to(x0.dtype)[pair_level][:, None, None]
    s = sqrt_one_minus_abar.to(x0.dtype)[pair_level][:, None, None]
    e_k = a * x0 + s * noise
    eps_hat = denoise(e_k, pair_level, w1, b1, step_table, w2, b2)
    e_hat = (e_k - s * eps_hat) / a
    noisy = (pair_level > 0)[:, None]
    e_hat = torch.where(noisy[..., None], e_hat, x0) * valid[..., None].to(x0.dtype)
    weight = (valid & noisy).to(torch.float32)
    if loss_weight is not None:
        weight = weight * loss_weight.to(torch.float32)[:, None]
    per_position = (eps_hat.float() - noise.float()).pow(2).mean(-1)
    loss = (per_position * weight).sum() / weight.sum().clamp_min(1.0)
    if num_pairs == 0:
        loss = e0.sum() * 0.0
    return e_hat, loss
