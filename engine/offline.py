"""`adarec evaluate`: score a finished run's best weights without DeepSpeed."""

from __future__ import annotations

from pathlib import Path

import torch

from adarec.config import load_config
from adarec.errors import AdarecError
from adarec.models import build_members, scorer

from .data_setup import load_split
from .distributed import pick_device
from .evaluator import evaluate_split
from .trainer import BEST_WEIGHTS


def evaluate_run(run_dir: Path, split_name: str = "test", device: str = "auto") -> dict:
    config_path, weights_path = run_dir / "config.yaml", run_dir / BEST_WEIGHTS
    for path in (config_path, weights_path):
        if not path.exists():
            raise AdarecError(f"{run_dir}: not a finished run ({path.name} is missing)")
    cfg = load_config(config_path)
    dev = pick_device(device)
    split = load_split(cfg, dev)
    members = build_members(cfg.model, split.num_items, split.max_len, cfg.kernels.backend)
    saved = torch.load(weights_path, map_location=dev, weights_only=True)["members"]
    if set(saved) != set(members):
        raise AdarecError(f"{weights_path}: holds {sorted(saved)}, the config builds {sorted(members)}")
    for name, net in members.items():
        net.to(dev).load_state_dict({k: v.float() for k, v in saved[name]["model"].items()})
    metrics = evaluate_split(scorer(members), split, split_name, cfg.eval.ks, cfg.eval.protocol,
                             cfg.eval.batch_size)
    return {"epoch": max(entry["epoch"] for entry in saved.values()), "split": split_name, **metrics}
