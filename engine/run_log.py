"""What a run writes besides checkpoints: train.log, metrics.jsonl, epochs.jsonl, TensorBoard.

metrics.jsonl holds one JSON object per evaluation (epoch, split, HR@K..., NDCG@K...,
MRR@K...; rows written before MRR@K was added lack it);
epochs.jsonl one per training epoch (loss terms, step time, samples/s). Both are append-only:
no row is ever rewritten or deleted. When a run resumes, a marker row
{"event": "resumed", "epoch": N, "superseded": [...]} is appended to both; it supersedes the
rows written before it for epochs after N (work the restored checkpoint does not contain) and,
in metrics.jsonl, every earlier test row (a resumed run is tested again when it ends). The
superseded rows stay in the file and are listed in the marker; `current_rows` gives the rows in
force, which is what plots and summaries read.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

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
    # Records logged with extra={"file_only": True} (the resolved config at the top of train.log)
    # stay out of the console.
    console.addFilter(lambda record: not getattr(record, "file_only", False))
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


def is_marker(row: dict) -> bool:
    return "event" in row


def _superseded(row: dict, resumed_after: int) -> bool:
    """Whether a resume from the checkpoint of epoch `resumed_after` supersedes this row."""
    return row["epoch"] > resumed_after or row.get("split") == "test"


def superseded_by_resume(rows: list[dict], epoch: int) -> list[dict]:
    """The rows in force that a resume from the checkpoint of `epoch` supersedes."""
    return [r for r in current_rows(rows) if _superseded(r, epoch)]


def current_rows(rows: list[dict]) -> list[dict]:
    """The rows in force: markers applied (and dropped), superseded rows left out."""
    kept: list[dict] = []
    for row in rows:
        if is_marker(row):
            if row["event"] == "resumed":
                kept = [r for r in kept if not _superseded(r, row["epoch"])]
            continue
        kept.append(row)
    return kept


class RunLog:
    """Append-only records of one run (rank 0 only writes; other ranks get a no-op)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception as exc:
                # The JSON logs are the record; TensorBoard is a view of them (an optional extra,
                # which a bare GPU machine may not have, or an install that fails to import).
                logging.getLogger("adarec.train").warning(
                    "no TensorBoard events (%s: %s); install tensorboard for them, the run goes on without",
                    type(exc).__name__, exc)
            else:
                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def mark_resumed(self, epoch: int) -> list[dict]:
        """Append the resume marker to both logs; return the test rows it supersedes."""
        if not self.enabled:
            return []
        superseded_tests = []
        for name in ("metrics.jsonl", "epochs.jsonl"):
            gone = superseded_by_resume(read_jsonl(self.run_dir / name), epoch)
            described = [{k: r[k] for k in ("epoch", "split", "source") if k in r} for r in gone]
            self._append(name, {"event": "resumed", "epoch": epoch, "superseded": described})
            superseded_tests += [r for r in gone if r.get("split") == "test"]
        return superseded_tests

    def _append(self, name: str, record: dict) -> None:
        with open(self.run_dir / name, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def evaluation(self, epoch: int, split: str, metrics: dict[str, float], **extra) -> None:
        if not self.enabled:
            return
        self._append("metrics.jsonl", {"epoch": epoch, "split": split, **metrics, **extra})
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.add_scalar(f"{split}/{name}", value, epoch)

    def epoch(self, epoch: int, record: dict) -> None:
        if not self.enabled:
            return
        self._append("epochs.jsonl", {"epoch": epoch, **record})
        for name, value in record.items() if self._tb is not None else ():
            if isinstance(value, (int, float)):
                self._tb.add_scalar(f"train/{name}", value, epoch)

    def hparams(self, config: dict, metrics: dict[str, float]) -> None:
        """A TensorBoard HParams entry in the run's events: the config flattened to section.key
        (flatten_hparams) and `metrics` ({name: value}), each metric also written as the scalar
        `hparam/<name>` that the HParams dashboard reads."""
        if self._tb is None:
            return
        try:
            from torch.utils.tensorboard.summary import hparams

            tagged = {f"hparam/{name}": float(value) for name, value in metrics.items()}
            writer = self._tb._get_file_writer()
            for summary in hparams(flatten_hparams(config), tagged):
                writer.add_summary(summary)
            for tag, value in tagged.items():
                self._tb.add_scalar(tag, value)
            self._tb.flush()
        except Exception as exc:    # a view of the logs; never the end of a finished run
            logging.getLogger("adarec.train").warning("no TensorBoard hparams entry: %s: %s",
                                                      type(exc).__name__, exc)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def flatten_hparams(config: dict, prefix: str = "") -> dict[str, object]:
    """{section: {key: value}} -> {"section.key": value} with the value types TensorBoard's hparams
    accept: bool, int, float and str as they are, None as "null", lists and dicts as JSON text."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value) and not prefix:
            flat.update(flatten_hparams(value, f"{name}."))
        elif value is None:
            flat[name] = "null"
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=str)
    return flat
