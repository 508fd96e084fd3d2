"""The DeepSpeed config, built from the run config (and written into the run directory)."""

from __future__ import annotations

import torch

from adarec.errors import ConfigError


def resolve_precision(requested: str, device: torch.device) -> str:
    """auto = bf16 on CUDA (mixed precision with fp32 master weights), fp32 on CPU."""
    if requested == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return requested


def build_ds_config(train_cfg, world_size: int, device: torch.device) -> dict:
    if train_cfg.batch_size % world_size:
        raise ConfigError(f"train.batch_size={train_cfg.batch_size} is not divisible by the "
                          f"{world_size} ranks of this launch")
    precision = resolve_precision(train_cfg.precision, device)
    return {
        "train_batch_size": train_cfg.batch_size,
        "train_micro_batch_size_per_gpu": train_cfg.batch_size // world_size,
        "gradient_accumulation_steps": 1,
        # Written out even when 0 (= off, the reference setting) so the choice is explicit.
        "gradient_clipping": float(train_cfg.grad_clip),
        "zero_optimization": {"stage": int(train_cfg.zero_stage)},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
