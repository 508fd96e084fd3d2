"""Key numbers of one step of the GPU device check, as `key=value` lines for its summary.txt.

    python3 profiling/check_summary.py STEP_DIR STEP_NAME [EXIT_STATUS]

profiling/gpu_check.sh runs every step with its output in STEP_DIR/output.txt and whatever the
step writes under STEP_DIR, then calls this once per step. What is extracted depends on what the
step left behind, not on its name, so a new step needs no change here:

- bench.json (profiling/bench.py): one line per backend with the step time, the projected epoch,
  the validation pass, the speedup and, when the harness traced, kernels/syncs/GPU-busy per step;
- other top-level *.json lists of rows (bench_trajectory.py, bench_fusion.py): the rows' numbers;
- a run's metrics.jsonl (adarec train --output-dir under STEP_DIR): its last valid and test rows
  and the seconds of each epoch from epochs.jsonl;
- pytest's final line ("3 passed, 1 skipped in 2.0s") and the ids of failed tests;
- otherwise, or when the step failed, the last non-empty line of its output.

Only the standard library is imported (it runs between steps and must start fast), and it never
fails the check: anything unreadable becomes `parse_error=...` and the exit status is always 0.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

OUTPUT = "output.txt"
BENCH_KEYS = ("backend", "step_ms_median", "epoch_train_s", "valid_pass_s")
TRACE_KEYS = ("kernels_per_step", "syncs_per_step", "gpu_busy_ms_per_step")
LABEL_KEYS = ("backend", "op", "case", "phase", "impl", "items", "dtype")
MAX_ROW_LINES = 6
MAX_FAILED = 5
MAX_LINE = 300
PYTEST_FINAL = re.compile(
    r"\b(\d+ (passed|failed|skipped|deselected|errors?|xfailed|xpassed|warnings?)\b.*\bin [\d.]+s\b.*"
    r"|no tests ran\b.*)"
)
PYTEST_FAILED = re.compile(r"^(FAILED|ERROR) (\S+)")
ENV_VERSIONS = re.compile(r"^torch (\S+) cuda (\S+) triton (\S+) gpu (.+)$")


def fmt(value: object) -> str:
    """A value as one short token: floats to 4 significant digits, no spaces."""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value).replace(" ", "_")


def is_number(value: object) -> bool:
    """Numbers worth printing (bools and None are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def pairs(row: dict, keys: Iterable[str]) -> str:
    """`key=value` for each of keys present (and not None) in row, in that order."""
    return " ".join(f"{k}={fmt(row[k])}" for k in keys if row.get(k) is not None)


def read_rows(path: Path) -> list[dict]:
    """A JSON file holding a list of dicts (write_tables' <stem>.json); ValueError otherwise."""
    rows = json.loads(path.read_text())
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path.name}: not a list of rows")
    return rows


def read_jsonl(path: Path) -> list[dict]:
    """The dict rows of a JSON-lines file; a half-written last line is dropped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def bench_lines(path: Path) -> list[str]:
    """One line per backend of the training-step harness's bench.json."""
    lines = []
    for row in read_rows(path):
        speedups = sorted(k for k in row if k.startswith("speedup"))
        lines.append(pairs(row, (*BENCH_KEYS, *speedups, *TRACE_KEYS)))
    return lines


def row_lines(paths: list[Path]) -> list[str]:
    """The rows of the kernel benchmarks' tables: labels and every numeric column, a few lines at most."""
    lines = []
    for path in paths:
        for row in read_rows(path):
            numbers = [k for k, v in row.items() if is_number(v) and k not in LABEL_KEYS]
            lines.append(f"{path.stem}: " + pairs(row, (*LABEL_KEYS, *numbers)))
    if len(lines) > MAX_ROW_LINES:
        lines = [*lines[: MAX_ROW_LINES - 1], f"more_rows={len(lines) - MAX_ROW_LINES + 1}"]
    return lines


def training_lines(metrics: Path) -> list[str]:
    """The run's last validation row, its test row(s) and the seconds of every epoch."""
    rows = [r for r in read_jsonl(metrics) if r.get("split") in ("valid", "test")]
    last_valid = [r for r in rows if r["split"] == "valid"][-1:]
    tests = [r for r in rows if r["split"] == "test"][-2:]
    lines = []
    for row in [*last_valid, *tests]:
        numbers = [k for k, v in row.items() if is_number(v)]
        lines.append(pairs(row, ("split", *numbers)))
    if not rows:
        lines.append("metrics=none")
    epochs = metrics.with_name("epochs.jsonl")
    if epochs.exists():
        seconds = [fmt(float(r["seconds"])) for r in read_jsonl(epochs) if is_number(r.get("seconds"))]
        lines.append("epoch_seconds=" + (",".join(seconds) or "none"))
    return lines


def pytest_lines(output: str) -> list[str]:
    """pytest's final counts line and the first few failed test ids ([] when pytest did not finish)."""
    final = None
    failed = []
    for line in output.splitlines():
        found = PYTEST_FINAL.search(line)
        if found:
            final = found.group(1).rstrip("= ").strip()
        bad = PYTEST_FAILED.match(line)
        if bad and len(failed) < MAX_FAILED:
            failed.append(bad.group(2))
    if final is None:
        return []
    return [f"pytest={final}", *(f"failed={test}" for test in failed)]


def environment_lines(output: str) -> list[str]:
    """The versions line of the environment step (`torch X cuda Y triton Z gpu NAME`) and its import errors."""
    lines = []
    for line in output.splitlines():
        versions = ENV_VERSIONS.match(line)
        if versions:
            lines.append(" ".join(f"{k}={fmt(v)}" for k, v in zip(("torch", "cuda", "triton", "gpu"), versions.groups(),
                                                                  strict=True)))
        elif " IMPORT ERROR " in line:
            lines.append(f"import_error={line.split()[0]}")
    return lines


def last_line(output: str) -> str | None:
    """The last non-empty line of a step's output (progress bars' carriage returns resolved)."""
    for line in reversed(output.splitlines()):
        line = line.rsplit("\r", 1)[-1].strip()
        if line:
            return line[:MAX_LINE]
    return None


def find_metrics(step_dir: Path) -> Path | None:
    """The metrics.jsonl of a training run somewhere under the step's folder, if any."""
    found = sorted(step_dir.rglob("metrics.jsonl"))
    return found[0] if found else None


def guarded(fn: Callable[..., list[str]], *args: object) -> list[str]:
    """fn's lines, or one parse_error line: one unreadable file must not hide the others' numbers."""
    try:
        return fn(*args)
    except Exception as err:  # a summary must never stop the check
        return [f"parse_error={type(err).__name__}:{fmt(str(err)[:MAX_LINE])}"]


def extract(step_dir: Path, status: int | None = None) -> list[str]:
    """The summary lines of one step (see the module docstring for what is read)."""
    output_path = step_dir / OUTPUT
    output = output_path.read_text(errors="replace") if output_path.exists() else ""
    lines: list[str] = []
    bench = step_dir / "bench.json"
    tables = sorted(p for p in step_dir.glob("*.json") if p.name != "bench.json" and not p.name.startswith("trace"))
    if bench.exists():
        lines += guarded(bench_lines, bench)
    elif tables:
        lines += guarded(row_lines, tables)
    metrics = find_metrics(step_dir)
    if metrics is not None:
        lines += guarded(training_lines, metrics)
    lines += pytest_lines(output)
    lines += environment_lines(output)
    tail = last_line(output)
    if tail is not None and (not lines or status not in (None, 0)):
        lines.append(f"last_line={tail}")
    return lines


def main(argv: list[str]) -> int:
    """Print the step's lines; on any failure print parse_error=... and still exit 0."""
    if len(argv) < 2:
        print("usage: check_summary.py STEP_DIR STEP_NAME [EXIT_STATUS]", file=sys.stderr)
        return 0
    try:
        status = int(argv[2]) if len(argv) > 2 else None
        for line in extract(Path(argv[0]), status):
            print(line)
    except Exception as err:  # a summary must never stop the check
        print(f"parse_error={type(err).__name__}:{fmt(str(err)[:MAX_LINE])}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
