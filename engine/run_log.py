"""What a run writes besides checkpoints: train.log, metrics.jsonl, epochs.jsonl, TensorBoard.

metrics.jsonl holds one JSON object per evaluation (epoch, split, HR@K..., NDCG@K...);
epochs.jsonl one per training epoch (loss terms, step time, samples/s). Both are rewritten
atomically when a run resumes so that entries past the restored checkpoint disappear.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from .checkpoint import atomic_write_text

log = logging.getLogger("adarec")


def setup_logging(run_dir: Path | None, is_main: bool) -> None:
    """Console (and, on rank 0, run_dir/train.log) logging for the adarec loggers."""
    root = logging.getLogger("adarec")
    root.handlers.clear()
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    root.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    root.addHandler(console)
    if run_dir is not None and is_main:
        file = logging.FileHandler(Path(run_dir) / "train.log")
        file.setFormatter(fmt)
        root.addHandler(file)


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLog:
    """Append-only records of one run (rank 0 only writes; other ranks get a no-op)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def truncate_after(self, epoch: int) -> None:
        """Drop records of epochs after `epoch` (they belong to work the checkpoint lost)."""
        if not self.enabled:
            return
        for name in ("metrics.jsonl", "epochs.jsonl"):
            kept = [r for r in read_jsonl(self.run_dir / name) if r["epoch"] <= epoch and r.get("split") != "test"]
            atomic_write_text(self.run_dir / name, "".join(json.dumps(r) + "\n" for r in kept))

    def _append(self, name: str, record: dict) -> None:
        with open(self.run_dir / name, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def evaluation(self, epoch: int, split: str, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._append("metrics.jsonl", {"epoch": epoch, "split": split, **metrics})
        for name, value in metrics.items():
            self._tb.add_scalar(f"{split}/{name}", value, epoch)

    def epoch(self, epoch: int, record: dict) -> None:
        if not self.enabled:
            return
        self._append("epochs.jsonl", {"epoch": epoch, **record})
        for name, value in record.items():
            if isinstance(value, (int, float)):
                self._tb.add_scalar(f"train/{name}", value, epoch)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
