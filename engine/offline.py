"""`adarec evaluate`: score a run's best weights without DeepSpeed.

The test split is touched once, when a run ends (docs/method.md 4). Evaluating the test split of
a run that has not ended (no test_metrics.json) is refused unless asked for explicitly, and
every offline test evaluation is appended to the run's metrics.jsonl ("source": "evaluate") so
the run's history shows it.
"""

from __future__ import annotations

from pathlib import Path

from adarec.errors import AdarecError

from .evaluator import evaluate_split
from .run_log import RunLog
from .run_model import load_run, run_files


def evaluate_run(run_dir: Path, split_name: str = "test", device: str = "auto", overrides=(),
                 allow_unfinished: bool = False) -> dict:
    """Metrics of the run's best weights on a split; `overrides` are `section.key=value` settings
    applied over the run's config (e.g. model.eval_noise=fixed to compare evaluation modes)."""
    run_dir = Path(run_dir)
    run_files(run_dir, "evaluate")
    if split_name == "test" and not (run_dir / "test_metrics.json").exists() and not allow_unfinished:
        raise AdarecError(f"{run_dir}: the run has not ended (no test_metrics.json), and the test split is "
                          "evaluated once, when a run ends; evaluate --split valid, or pass --allow-unfinished "
                          "(the evaluation is then recorded in metrics.jsonl)")
    loaded = load_run(run_dir, device, overrides, action="evaluate")
    cfg, split = loaded.cfg, loaded.split
    metrics = evaluate_split(loaded.model, split, split_name, cfg.eval.ks, cfg.eval.protocol,
                             cfg.eval.batch_size, item_chunk=cfg.eval.item_chunk,
                             label=f"{cfg.model.name} ({run_dir})", width_buckets=cfg.data.width_buckets)
    best_epoch = loaded.best_epoch
    if split_name == "test":
        RunLog(run_dir, enabled=True, tensorboard=False).evaluation(
            best_epoch, "test", metrics, source="evaluate", overrides=list(overrides))
    return {"epoch": best_epoch, "split": split_name, **metrics}
