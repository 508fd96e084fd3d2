"""A finished run's model, rebuilt from its directory: config.yaml + the best weights.

`adarec evaluate` and serving (`adarec export`, `adarec recommend`) load a run the same way:
the saved config (with optional `section.key=value` overrides) builds the members, and each
member is loaded in the dtype it was saved in (a bf16 engine keeps bf16 weights and buffers),
so that the run's own validation numbers are reproduced exactly. The pieces are separate so that
a caller that reads the data file itself (serving needs the raw sequences, not just the split)
still builds the model from the same code.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from adarec.config import RunConfig, apply_overrides, load_config
from adarec.errors import AdarecError
from adarec.models import build_members, scorer

from .data_setup import load_split
from .distributed import pick_device
from .trainer import BEST_WEIGHTS


@dataclass
class LoadedModel:
    """The scorer (one network or the experts' average) and the best epoch."""

    model: torch.nn.Module
    best_epoch: int


@dataclass
class LoadedRun:
    cfg: RunConfig
    split: object
    model: torch.nn.Module
    best_epoch: int


def run_files(run_dir: Path, action: str = "load") -> tuple[Path, Path]:
    """(config.yaml, best weights) of a run directory; an AdarecError names the one missing and
    what could not be done without it (`action`: evaluate, export, serve)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AdarecError(f"{run_dir}: no trained weights to {action} (no such directory)")
    config_path, weights_path = run_dir / "config.yaml", run_dir / BEST_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise AdarecError(f"{run_dir}: no trained weights to {action} ({path.name} is missing)")
    return config_path, weights_path


def read_run_config(run_dir: Path, overrides=(), action: str = "load") -> tuple[RunConfig, Path]:
    """The run's saved config with `overrides` applied, and the path of its best weights."""
    config_path, weights_path = run_files(run_dir, action)
    return apply_overrides(load_config(config_path), list(overrides)), weights_path


def load_model(cfg: RunConfig, weights_path: Path, num_items: int, max_len: int,
               device: torch.device) -> LoadedModel:
    """Build the members for a catalog of `num_items` and inputs of `max_len` columns and load
    the saved weights into them, in eval mode."""
    members = build_members(cfg.model, num_items, max_len, cfg.kernels.backend)
    try:
        saved = torch.load(weights_path, map_location=device, weights_only=True)["members"]
    except (OSError, EOFError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError) as err:
        raise AdarecError(f"{weights_path}: not a weights file written by adarec train ({err})") from None
    if set(saved) != set(members):
        raise AdarecError(f"{weights_path}: holds {sorted(saved)}, the config builds {sorted(members)}")
    for name, net in members.items():
        state = saved[name]["model"]
        # In the precision the run validated in, so that its own numbers are reproduced exactly.
        dtype = next(v.dtype for v in state.values() if v.is_floating_point())
        try:
            net.to(device=device, dtype=dtype).load_state_dict(state)
        except RuntimeError as err:
            # A shape mismatch: the data file or the config changed since the run was trained.
            first = str(err).strip().splitlines()[-1].strip()
            raise AdarecError(f"{weights_path}: the weights do not fit the model the run's config and data "
                              f"build ({first})") from None
        net.eval()
    best_epoch = max(entry["epoch"] for entry in saved.values())
    return LoadedModel(scorer(members), best_epoch)


def load_run(run_dir: Path, device: str | torch.device = "auto", overrides=(), action: str = "load") -> LoadedRun:
    """Config, split (on the device) and model of a trained run."""
    cfg, weights_path = read_run_config(run_dir, overrides, action)
    dev = device if isinstance(device, torch.device) else pick_device(device)
    split = load_split(cfg, dev)
    loaded = load_model(cfg, weights_path, split.num_items, split.max_len, dev)
    return LoadedRun(cfg, split, loaded.model, loaded.best_epoch)
