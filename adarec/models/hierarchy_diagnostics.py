"""Does ADARec's hierarchy live? Per-level numbers on a fixed validation batch, every epoch.

The paper credits its gains to levels that run from clean to heavily corrupted, each
reconstructed by the denoiser into a coarser view of the user (docs/method.md 2.2). Whether that
happens in a run is measurable (docs/method.md, "Diagnostics"):

- `deno_k`: L_deno of level k, the mean over item positions of ||eps_hat - eps||^2 / D. 1.0 is
  what predicting eps = 0 scores; below 1 the denoiser recovers part of the noise.
- `dist_k`: ||Ehat^k - E^0|| / ||E^0|| over the item positions, how far level k's view is from
  the clean sequence. Near 0 at every level means every level is E^0 and the hierarchy is flat.
- `controller_entropy`: the entropy of the depth controller's softmax (no Gumbel noise) averaged
  over item positions, divided by log(T_max + 1): 1 is a uniform choice, 0 a fixed one.

The batch is the first DIAGNOSTIC_USERS validation users and its noise is keyed by fixed keys,
so epoch after epoch the numbers differ only through the weights. The router weights per level
and the depth histogram come from the training steps themselves (ADARec.pop_epoch_stats).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from adarec.diffusion import denoise
from adarec.keyed_random import KeyedDraws, Streams, row_keys

DIAGNOSTIC_USERS = 256
DIAGNOSTIC_SEED = 20240601


@torch.no_grad()
def hierarchy_diagnostics(model, input_ids: torch.Tensor) -> dict[str, float]:
    """The numbers of the module docstring for `model` (an ADARec) on input rows [B, L]."""
    was_training = model.training
    model.eval()
    try:
        items = input_ids > 0
        e0 = model.encoder.embed(input_ids).float()
        out: dict[str, float] = {}
        if model.controller is not None:
            probs = F.softmax(model.controller.logits(e0.to(_dtype(model.controller)), input_ids).float(), dim=-1)
            entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)
            out["controller_entropy"] = float(entropy[items].mean()) / math.log(model.max_depth + 1)
        norm = float(e0[items].norm())
        keys = torch.from_numpy(row_keys(DIAGNOSTIC_SEED, 0, np.arange(input_ids.shape[0]))).to(input_ids.device)
        for level in range(1, model.max_depth + 1):
            if model.denoiser is None:          # without HDA every level is E^0
                out[f"dist_{level}"] = 0.0
                continue
            block = torch.full((input_ids.shape[0],), level, dtype=torch.int64, device=input_ids.device)
            noise = KeyedDraws(keys, Streams.DIFFUSION).normal(tuple(e0.shape[1:]), block=block,
                                                               blocks=model.max_depth + 1, align_right=True)
            a, s = float(model.sqrt_abar[level]), float(model.sqrt_one_minus_abar[level])
            x_k = a * e0 + s * noise
            den = model.denoiser
            eps_hat = denoise(x_k, block, den.fc1.weight.float(), den.fc1.bias.float(), den.step_table().float(),
                              den.fc2.weight.float(), den.fc2.bias.float())
            e_hat = (x_k - s * eps_hat) / a
            out[f"deno_{level}"] = float((eps_hat - noise).pow(2).mean(-1)[items].mean())
            out[f"dist_{level}"] = float((e_hat - e0)[items].norm()) / max(norm, 1e-12)
        return out
    finally:
        model.train(was_training)


def _dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
