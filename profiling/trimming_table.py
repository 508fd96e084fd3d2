"""The before/after table of `profiling/bench_trimming.sh`: one row per (model, precision).

    python -m adarec.profiling.trimming_table results/bench/trimming_cpu [LATER ...] [--md OUT.md]

Reads every `<model>_<precision>_<layout>/bench.json` under the folders (a later folder's rows
replace an earlier one's: a rerun of one layout) and prints a markdown table
of the epoch and validation times, the padding fractions and the speed-ups of "after" (grouped
and trimmed batches) over "before" (full width), and of bf16 over fp32 after.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = ("model", "precision", "epoch s before", "epoch s after", "speed-up", "valid s before", "valid s after",
           "padding before", "padding after", "step ms after (median)")


def load(folder: Path) -> dict[tuple[str, str, str], dict]:
    rows = {}
    for path in sorted(folder.glob("*_*_*/bench.json")):
        model, precision, layout = path.parent.name.rsplit("_", 2)
        (row,) = [r for r in json.loads(path.read_text()) if "error" not in r] or [None]
        if row is not None:
            rows[(model, precision, layout)] = row
    return rows


def _f(value, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def table(rows: dict[tuple[str, str, str], dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    keys = sorted({(m, p) for m, p, _ in rows}, key=lambda k: (k[0], k[1] != "fp32"))
    for model, precision in keys:
        after = rows.get((model, precision, "after"))
        # Models that are never trimmed (diffurec, adrec) have one layout: it is both.
        before = rows.get((model, precision, "before"), after)
        if after is None or before is None:
            continue
        speedup = before["epoch_train_s"] / after["epoch_train_s"]
        lines.append("| " + " | ".join([
            model, precision, _f(before["epoch_train_s"]), _f(after["epoch_train_s"]), f"{speedup:.2f}x",
            _f(before["valid_pass_s"]), _f(after["valid_pass_s"]), _f(before["padding_frac"], 3),
            _f(after["padding_frac"], 3), _f(after["step_ms_median"], 0)]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adarec.profiling.trimming_table",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+")
    parser.add_argument("--md", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    rows = {}
    for folder in args.folders:
        rows.update(load(folder))
    text = table(rows)
    print(text, end="")
    if args.md:
        args.md.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
