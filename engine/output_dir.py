"""Checks of the output directory before a run trains: it takes a write, and it has room for
the checkpoints. A run that cannot save should stop at once, not after its first epoch."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from adarec.errors import AdarecError

from .atomic_io import os_error_text

SPACE_MARGIN_BYTES = 64 << 20
"""Room left for logs, TensorBoard events and the temp files of atomic writes."""


def free_bytes_text(path: Path) -> str:
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    return f"{_size_text(shutil.disk_usage(existing).free)} free there"


def probe_output_dir(run_dir: Path) -> None:
    """Create run_dir if needed and prove it takes a write: a small file is written, fsynced and
    removed. A run that cannot write its checkpoints should fail now, not after its first epoch."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=run_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        finally:
            os.unlink(probe)
    except OSError as err:
        raise AdarecError(f"output directory {run_dir} is not writable: {os_error_text(err)}") from err


def checkpoint_bytes_estimate(modules: Iterable[torch.nn.Module], keep: int) -> int:
    """Disk the checkpoints of these members can occupy at once: fp32 weights and Adam's two
    moments (12 bytes a parameter) in each of the `keep` kept tags and the one being written
    before the oldest is pruned, the best weights (4 bytes a parameter), and a fixed margin."""
    params = sum(p.numel() for module in modules for p in module.parameters())
    return params * (4 * 3 * (keep + 1) + 4) + SPACE_MARGIN_BYTES


def tree_bytes(path: Path) -> int:
    path = Path(path)
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def check_free_space(run_dir: Path, need_bytes: int) -> None:
    """Stop before training when run_dir's file system has less room than need_bytes."""
    free = shutil.disk_usage(run_dir).free
    if free < need_bytes:
        raise AdarecError(
            f"output directory {run_dir} has {_size_text(free)} ({free} bytes) free, but the checkpoints "
            f"need about {_size_text(need_bytes)} ({need_bytes} bytes: weights and Adam's moments for "
            "the kept epochs and the one being written); free some space or choose another --output-dir")


def _size_text(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
