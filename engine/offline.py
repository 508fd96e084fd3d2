"""`adarec evaluate`: score a run's best weights without DeepSpeed.

The test split is touched once, when a run ends (docs/method.md 4). Evaluating the test split of
a run that has not ended (no test_metrics.json) is refused unless asked for explicitly, and
every offline test evaluation is appended to the run's metrics.jsonl ("source": "evaluate") so
the run's history shows it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from adarec.config import apply_overrides, load_config
from adarec.errors import AdarecError
from adarec.models import build_members, scorer

from .data_setup import load_split
from .distributed import pick_device
from .evaluator import evaluate_split
from .run_log import RunLog
from .trainer import BEST_WEIGHTS


def evaluate_run(run_dir: Path, split_name: str = "test", device: str = "auto", overrides=(),
                 allow_unfinished: bool = False) -> dict:
    """Metrics of the run's best weights on a split; `overrides` are `section.key=value` settings
    applied over the run's config (e.g. model.eval_noise=fixed to compare evaluation modes)."""
    run_dir = Path(run_dir)
    config_path, weights_path = run_dir / "config.yaml", run_dir / BEST_WEIGHTS
    for path in (config_path, weights_path):
        if not path.exists():
            raise AdarecError(f"{run_dir}: no trained weights to evaluate ({path.name} is missing)")
    if split_name == "test" and not (run_dir / "test_metrics.json").exists() and not allow_unfinished:
        raise AdarecError(f"{run_dir}: the run has not ended (no test_metrics.json), and the test split is "
                          "evaluated once, when a run ends; evaluate --split valid, or pass --allow-unfinished "
                          "(the evaluation is then recorded in metrics.jsonl)")
    cfg = apply_overrides(load_config(config_path), list(overrides))
    dev = pick_device(device)
    split = load_split(cfg, dev)
    members = build_members(cfg.model, split.num_items, split.max_len, cfg.kernels.backend)
    saved = torch.load(weights_path, map_location=dev, weights_only=True)["members"]
    if set(saved) != set(members):
        raise AdarecError(f"{weights_path}: holds {sorted(saved)}, the config builds {sorted(members)}")
    for name, net in members.items():
        state = saved[name]["model"]
        # In the precision the run validated in (a bf16 engine keeps bf16 weights and buffers), so
        # that the run's own validation numbers are reproduced exactly.
        dtype = next(v.dtype for v in state.values() if v.is_floating_point())
        net.to(device=dev, dtype=dtype).load_state_dict(state)
    metrics = evaluate_split(scorer(members), split, split_name, cfg.eval.ks, cfg.eval.protocol,
                             cfg.eval.batch_size)
    best_epoch = max(entry["epoch"] for entry in saved.values())
    if split_name == "test":
        RunLog(run_dir, enabled=True, tensorboard=False).evaluation(
            best_epoch, "test", metrics, source="evaluate", overrides=list(overrides))
    return {"epoch": best_epoch, "split": split_name, **metrics}
