"""The diffusion schedule shared by the peers (docs/peers.md, "Schedules").

DiffuRec and ADRec diffuse over T = 32 steps with the truncated-linear schedule, DiffuASR over
T = 1000 with DDPM's linear one. Everything a forward or reverse step needs is precomputed here
in float64 and kept as float32 buffers on the model's device, so that a step gathers its
coefficients by index on the device (no host round trip per step).

Timesteps are 0-based: t = 0 .. T-1, as in the public code; alphas_cumprod[t] = prod_{s<=t}(1 - beta_s).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def betas(schedule: str, steps: int) -> np.ndarray:
    """beta_0 .. beta_{T-1} (float64). With s = 1000 / T:
    trunc_lin: linspace(1e-4 s + 0.01, 0.02 s + 0.01), the end falling back to 1e-3 s + 0.01 if it
    would exceed 1; linear: linspace(1e-4 s, 0.02 s)."""
    scale = 1000.0 / steps
    if schedule == "trunc_lin":
        start, end = scale * 1e-4 + 0.01, scale * 0.02 + 0.01
        if end > 1:
            end = scale * 1e-3 + 0.01
    elif schedule == "linear":
        start, end = scale * 1e-4, scale * 0.02
    else:
        raise ValueError(f"unknown noise schedule {schedule!r}; expected trunc_lin or linear")
    return np.linspace(start, end, steps, dtype=np.float64)


class PeerSchedule(nn.Module):
    """Buffers of one schedule [T]: betas, alphas_cumprod (abar), sqrt(abar), sqrt(1 - abar),
    the posterior q(x_{t-1} | x_t, x_0) mean coefficients (coef_x0, coef_xt) and its fixed-large
    log variance log([posterior_var_1, beta_1, ..., beta_{T-1}]), the choice of DiffuRec and ADRec."""

    def __init__(self, schedule: str, steps: int, timesteps: list[int] | None = None):
        super().__init__()
        beta = betas(schedule, steps)
        abar = np.cumprod(1.0 - beta)
        if timesteps is not None:
            # Respaced (RespacedSchedule): the same marginals at the chosen timesteps only.
            abar = abar[timesteps]
            beta = 1.0 - abar / np.append(1.0, abar[:-1])
        abar_prev = np.append(1.0, abar[:-1])
        posterior_var = beta * (1.0 - abar_prev) / (1.0 - abar)
        log_var = np.log(np.append(posterior_var[1], beta[1:])) if len(beta) > 1 else np.log(beta)
        values = {
            "beta": beta,
            "abar": abar,
            "abar_prev": abar_prev,
            "sqrt_abar": np.sqrt(abar),
            "sqrt_one_minus_abar": np.sqrt(1.0 - abar),
            "coef_x0": beta * np.sqrt(abar_prev) / (1.0 - abar),
            "coef_xt": (1.0 - abar_prev) * np.sqrt(1.0 - beta) / (1.0 - abar),
            "log_var": log_var,
        }
        self.steps = len(beta)
        for name, value in values.items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32), persistent=False)

    @staticmethod
    def at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """values[t] broadcast against `like` (t has like's leading dims)."""
        out = values[t]
        return out.reshape(*out.shape, *([1] * (like.dim() - out.dim())))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        return self.at(self.sqrt_abar, t, x0) * x0 + self.at(self.sqrt_one_minus_abar, t, x0) * noise

    def posterior_step(self, x0_hat: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                       noise: torch.Tensor) -> torch.Tensor:
        """One ancestral step p(x_{t-1} | x_t) with x0 predicted: posterior mean plus
        exp(log_var / 2) * noise, no noise where t == 0."""
        mean = self.at(self.coef_x0, t, x_t) * x0_hat + self.at(self.coef_xt, t, x_t) * x_t
        std = torch.exp(0.5 * self.at(self.log_var, t, x_t))
        keep = (t > 0).to(x_t.dtype)
        keep = keep.reshape(*keep.shape, *([1] * (x_t.dim() - keep.dim())))
        return mean + keep * std * noise


def spaced_timesteps(steps: int, count: int) -> list[int]:
    """`count` of the timesteps 0..steps-1, evenly spaced with both ends kept (improved-diffusion's
    respacing with one section): round(i (T - 1) / (S - 1)), i = 0..S-1. count = steps: all."""
    if not 1 <= count <= steps:
        raise ValueError(f"sample_steps must be in [1, diffusion_steps = {steps}], got {count}")
    if count == 1:
        return [0]
    stride = (steps - 1) / (count - 1)
    return [round(i * stride) for i in range(count)]


class RespacedSchedule(PeerSchedule):
    """A PeerSchedule's reverse process over the timesteps tau_0 < .. < tau_{S-1} only: the same
    buffers rebuilt from abar'_i = abar[tau_i] and beta'_i = 1 - abar'_i / abar'_{i-1}, a DDPM over
    S steps with the same marginals q(x_tau | x0). With S = T these are the schedule's own values.
    Index i of the buffers is reverse step i; the Approximator is told the original tau_i."""

    def __init__(self, schedule: str, steps: int, timesteps: list[int]):
        super().__init__(schedule, steps, timesteps)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [*t.shape, dim] of (possibly rescaled, fractional) timesteps:
    cos of the frequencies first, then sin, as in improved-diffusion (DiffuRec, ADRec)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[..., None] * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[..., :1])], dim=-1)
    return emb
