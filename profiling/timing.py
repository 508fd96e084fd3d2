"""Shared pieces of the benchmarks: timing a callable, describing the machine, writing tables.

Every row a benchmark writes carries the device name, the torch and triton versions, the date
and the git commit, so a number in BENCHMARKS.md can be traced to the run that produced it.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(fn: Callable[[], object], device: torch.device, warmup: int = 3, repeats: int = 20) -> list[float]:
    """Milliseconds of each of ``repeats`` calls after ``warmup`` untimed ones. CUDA calls are timed
    with events (device time between launch and completion), CPU calls with perf_counter."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def summarize(times_ms: Sequence[float]) -> dict[str, float]:
    """Median and spread (min, max, interquartile range) of a list of timings."""
    ordered = sorted(times_ms)
    q = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else [ordered[0]] * 3
    return {"median_ms": statistics.median(ordered), "min_ms": ordered[0], "max_ms": ordered[-1],
            "iqr_ms": q[2] - q[0]}


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak CUDA memory allocated during one call, above what was allocated before it (MiB)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def git_commit() -> str:
    """ADAREC_COMMIT when set (a copy of the tree without .git, e.g. on a remote GPU machine), else git."""
    if os.environ.get("ADAREC_COMMIT"):
        return os.environ["ADAREC_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: torch.device) -> dict[str, str]:
    """The columns every benchmark row carries."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "torch": torch.__version__, "triton": triton_version,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": git_commit()}


def add_speedups(rows: list[dict], time_key: str, baseline: str = "eager") -> None:
    """Set each row's speedup_vs_<baseline>: the baseline backend's time over the row's."""
    base = next((r[time_key] for r in rows if r["backend"] == baseline), None)
    for row in rows:
        row[f"speedup_vs_{baseline}"] = base / row[time_key] if base else None


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "n/a" if value is None else str(value)


class RowWriter:
    """A benchmark's rows kept on disk as they are measured, so a step killed at its time limit
    leaves every finished row behind.

    add(row) appends the row to <stem>.rows.jsonl (flushed and fsynced) and rewrites the tables
    (<stem>.csv, .md, .json) with the rows so far; finish(rows) writes the final tables, e.g.
    after speedups have been added. The jsonl is append-only: a rerun into the same folder adds
    rows, it never loses the earlier ones.
    """

    def __init__(self, out_dir: str | Path, stem: str):
        self.out, self.stem = Path(out_dir), stem
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self.jsonl = self.out / f"{stem}.rows.jsonl"

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        write_tables(self.rows, self.out, self.stem)
        return row

    def finish(self, rows: list[dict] | None = None) -> dict[str, Path]:
        return write_tables(self.rows if rows is None else rows, self.out, self.stem)


def _write_atomically(path: Path, text: str) -> None:
    """Through a temporary name and a rename: a kill mid-write leaves the previous complete file."""
    part = path.with_name(path.name + ".part")
    part.write_text(text)
    os.replace(part, path)


def write_tables(rows: list[dict], out_dir: str | Path, stem: str) -> dict[str, Path]:
    """rows -> <stem>.csv, <stem>.md (a markdown table) and <stem>.json under out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    paths = {"csv": out / f"{stem}.csv", "md": out / f"{stem}.md", "json": out / f"{stem}.json"}
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    _write_atomically(paths["csv"], buffer.getvalue())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    _write_atomically(paths["md"], "\n".join(lines) + "\n")
    _write_atomically(paths["json"], json.dumps(rows, indent=2, default=str) + "\n")
    return paths
