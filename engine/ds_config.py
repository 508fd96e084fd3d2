"""The DeepSpeed config, built from the run config (and written into the run directory).

Batch sizes, precision, clipping and the ZeRO stage come from the run config; an optional JSON
(train.ds_config) is merged over the result for anything else DeepSpeed offers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from adarec.config import ZERO3_REFUSED
from adarec.errors import ConfigError


def resolve_precision(requested: str, device: torch.device) -> str:
    """auto = bf16 on CUDA (mixed precision with fp32 master weights), fp32 on CPU."""
    if requested == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return requested


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_json(path: str) -> dict:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"train.ds_config: no such file {p}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{p}:{err.lineno}: invalid JSON: {err.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a DeepSpeed config must be a JSON object")
    return data


def use_autocast(train_cfg, world_size: int, zero_stage: int) -> bool:
    """Whether bf16 runs as torch.autocast over fp32 weights rather than in DeepSpeed's bf16 engine.

    auto: autocast on one process at ZeRO stage 0. There DeepSpeed's bf16 engine can only use its
    unfused optimizer (it refuses fp32 gradient accumulation at stage 0), which checks every
    parameter's gradient for overflow on the host; autocast with fused Adam reads nothing
    (docs/method.md, "The training step on a GPU"). Several ranks or ZeRO keep DeepSpeed's bf16.
    train.cuda_graphs always needs autocast.
    """
    if train_cfg.cuda_graphs or train_cfg.bf16_mode == "autocast":
        return True
    if train_cfg.bf16_mode == "deepspeed":
        return False
    return world_size == 1 and int(zero_stage) == 0


_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _check_batch_keys(train_cfg, world_size: int, merged: dict) -> None:
    """The batch keys follow train.batch_size (the sampler builds batches of that size and the
    trainer steps after every one), so an overlay may repeat them but not change them."""
    want = {"train_batch_size": train_cfg.batch_size,
            "train_micro_batch_size_per_gpu": train_cfg.batch_size // world_size,
            "gradient_accumulation_steps": 1}
    for key in _BATCH_KEYS:
        if merged.get(key) != want[key]:
            raise ConfigError(
                f"{train_cfg.ds_config}: {key}={merged.get(key)!r} disagrees with train.batch_size="
                f"{train_cfg.batch_size} on {world_size} rank(s), which means {key}={want[key]}; set the batch "
                "size with train.batch_size (gradient accumulation is not supported) and leave these keys out of "
                "the overlay")


def build_ds_config(train_cfg, world_size: int, device: torch.device, autocast: bool = False) -> dict:
    """autocast: bf16 is done by torch.autocast over fp32 weights (use_autocast), so DeepSpeed
    itself runs in fp32, whatever a train.ds_config overlay says about bf16."""
    if train_cfg.batch_size % world_size:
        raise ConfigError(f"train.batch_size={train_cfg.batch_size} is not divisible by the "
                          f"{world_size} ranks of this launch")
    precision = "fp32" if autocast else resolve_precision(train_cfg.precision, device)
    config = {
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
        # The throughput timer synchronises the device at the start and end of every step.
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    }
    if precision == "bf16" and int(train_cfg.zero_stage) == 1:
        # With ZeRO-1, fp32 gradient accumulation selects DeepSpeed's BF16_Optimizer (fp32 master
        # weights, one global-norm overflow check per step) instead of the unfused bf16 path, which
        # checks every parameter's gradient on the host. DeepSpeed refuses that mix at stage 0;
        # there train.bf16_mode=autocast is the sync-free choice (docs/method.md, "The training
        # step on a GPU").
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if train_cfg.ds_config:
        config = _deep_merge(config, _read_json(train_cfg.ds_config))
        if int(config.get("zero_optimization", {}).get("stage", 0)) >= 3:
            raise ConfigError(f"{train_cfg.ds_config}: zero_optimization.stage 3: {ZERO3_REFUSED}")
        _check_batch_keys(train_cfg, world_size, config)
    if autocast:
        config["bf16"] = {"enabled": False}
        config.pop("data_types", None)
    return config
