"""Which folder a run owns: a new run never writes into another run's folder, and a run that
fails before it trains leaves no folder behind.

The logs are append-only (engine/run_log.py), so a second run started in a folder that holds one
would add its epoch-1 rows after the first run's and `metrics.jsonl` would mix two runs. A new
run (not `--resume`) therefore refuses such a folder, naming the two ways out: `--resume` to
continue it, or `--overwrite`, which moves the old run aside to `<folder>.old-<UTC time>` (never
deletes it). A folder "holds a run" when it contains any file a run writes (RUN_FILES); other
files, such as a user's notes or a data file, do not make it one.

A folder that did not exist before the call and that the run's setup then fails in (a missing or
malformed data file, a bad config, a backend that cannot run here) is removed again: it holds
nothing but the setup's own traces, and an empty run folder would later be mistaken for a run.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from adarec.errors import AdarecError

RUN_FILES = ("config.yaml", "metrics.jsonl", "epochs.jsonl", "train.log", "checkpoints", "best_model.pt",
             "test_metrics.json", "ds_config.json", "tensorboard", "run.json")
"""What a run writes into its folder (any one of them marks the folder as a run's)."""


def run_files_in(run_dir: Path) -> list[str]:
    return [name for name in RUN_FILES if (Path(run_dir) / name).exists()]


def aside_name(run_dir: Path, now: float | None = None) -> Path:
    """A free sibling path `<run_dir>.old-YYYYmmdd-HHMMSS[-n]` for a run moved aside."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    base = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    candidate, n = base, 1
    while candidate.exists():
        candidate, n = base.with_name(f"{base.name}-{n}"), n + 1
    return candidate


def claim_run_dir(run_dir: Path, overwrite: bool) -> Path | None:
    """Make run_dir usable by a new run: refuse it when it holds a run, or with `overwrite` move
    that run aside. Returns where the old run went (None when there was none)."""
    run_dir = Path(run_dir)
    found = run_files_in(run_dir) if run_dir.is_dir() else []
    if run_dir.exists() and not run_dir.is_dir():
        raise AdarecError(f"output directory {run_dir} is a file, not a folder")
    if not found:
        return None
    if not overwrite:
        raise AdarecError(f"{run_dir} already holds a run ({', '.join(found)}); continue it with --resume, or "
                          f"pass --overwrite to move it aside (to {run_dir}.old-<time>) and start a new one there")
    target = aside_name(run_dir)
    run_dir.rename(target)
    logging.getLogger("adarec.train").warning("moved the previous run in %s aside to %s", run_dir, target)
    return target


@contextlib.contextmanager
def removed_if_setup_fails(run_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Remove run_dir if it did not exist on entry and the block raises (module docstring)."""
    run_dir = Path(run_dir)
    fresh = enabled and not run_dir.exists()
    try:
        yield
    except BaseException:
        if fresh and run_dir.is_dir():
            # The run's log file handler points into the folder: close it first.
            for handler in list(logging.getLogger("adarec").handlers):
                if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == run_dir.resolve():
                    handler.close()
                    logging.getLogger("adarec").removeHandler(handler)
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
