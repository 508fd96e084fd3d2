"""`adarec summarize`: one table row per run folder, read from its config.yaml and metrics.jsonl.

A row gives the model (model.name), the data (the stem of data.path, with data.shorten_seq_to,
data.max_users and data.augmented_prefix when set), the epochs trained, the best validation
epoch and value of the run's own eval.select_metric (case-insensitive; the first of equal
values, as the trainer selects), and the metrics of the run's test row.

Which rows count: metrics.jsonl is read through engine/run_log.current_rows (rows superseded by
a resume are left out). The validation rows are those of split "valid" and, for a run of several
members, "valid/<member>". The test row is the last test row written by the trainer; test rows
appended by `adarec evaluate` (they carry "source") are offline evaluations, shown only with
--offline, each under its run and labelled with its --set overrides. A run with no trainer test
row has not ended: it is listed, marked "no test row", and never folded. The epochs trained are
the test row's trained_epochs, or (older rows and unfinished runs) the last epoch of epochs.jsonl,
or of the validation rows. Rows written before MRR@K was logged lack it: its cells stay empty.

Seeds: runs whose config.yaml are equal once train.seed and output-location keys (IGNORED_KEYS)
are left out are folded into one row holding mean ± sample standard deviation (ddof=1) of every
number and the seed count n, when all of them have a test row and their seeds differ (equal
configs with an equal seed are reruns of different code, not seeds: they stay separate rows).
--no-fold lists every run.

Folders: a RUN_DIR holds config.yaml and metrics.jsonl. A folder that holds neither but whose
direct subfolders include runs stands for those runs (sorted by name; its other subfolders are
ignored), so `adarec summarize results/beauty/trimming` lists every run in it. Anything else is
an AdarecError naming the folder.

Markdown blocks (--update FILE): every block of FILE between
`<!-- summarize: ARGS -->` and `<!-- /summarize -->` is replaced by the markdown table of
`adarec summarize ARGS` (ARGS: run folders relative to FILE's folder and the table options
--metrics, --offline, --no-fold), so a document's tables are regenerated from the run logs.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shlex
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from adarec.engine.run_log import current_rows
from adarec.errors import AdarecError

RUN_FILES = ("config.yaml", "metrics.jsonl")
IGNORED_KEYS = ("train.seed",)
"""Dotted config keys that do not make runs different: the seed (folded over) and where outputs go.
Besides these, every key whose last part is OUTPUT_KEY_NAMES or ends in `_dir` is ignored."""
OUTPUT_KEY_NAMES = ("output_dir", "run_dir", "out", "output")
METRIC_ORDER = ("HR", "NDCG", "MRR")
"""adarec.metrics.METRICS (not imported here: that module needs torch)."""
_METRIC = re.compile(r"^(HR|NDCG|MRR)@([0-9]+)$")
NO_TEST_ROW = "no test row"
BLOCK = re.compile(r"^<!-- summarize:(?P<args>(?:(?!-->|^<!--).)*)-->[ \t]*\n"
                   r"(?P<body>(?:(?!^<!-- summarize:).)*?)(?P<end>^<!-- /summarize -->)", re.DOTALL | re.MULTILINE)
"""A block: the opening marker at the start of a line (its arguments may run over several lines),
the generated table, the closing marker at the start of a line. A marker quoted inside a line
(as in this docstring) is text, not a block."""
OPEN = re.compile(r"^<!-- summarize:", re.MULTILINE)


# -- reading runs ----------------------------------------------------------------------------
@dataclass
class Run:
    """One run folder's summary. label: its path as given (relative paths stay relative)."""

    label: str
    path: Path
    config: dict
    model: str
    data: str
    seed: object
    select: str
    epochs: int | None
    best_epoch: int | str | None      # several members: each one's best epoch, joined with "/"
    best_value: float | None          # several members: the mean of their best values
    test: dict[str, float] | None
    offline: list[tuple[str, dict[str, float]]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.test is not None


def _is_run(path: Path) -> bool:
    return all((path / name).is_file() for name in RUN_FILES)


def expand_runs(paths: Sequence[str | Path], base: Path | None = None) -> list[tuple[str, Path]]:
    """(label, folder) of every run the paths name, in order, each folder once; a folder that is
    not a run but holds runs is expanded one level (module docstring). base: the folder relative
    paths are read from (labels keep the path as given)."""
    found: list[tuple[str, Path]] = []
    seen: set[Path] = set()

    def add(label: str, path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            found.append((label, path))

    for given in paths:
        label = str(given).rstrip("/") or str(given)
        path = Path(given) if base is None or Path(given).is_absolute() else base / given
        if not path.exists():
            raise AdarecError(f"{label}: not a run folder (no such directory)")
        if not path.is_dir():
            raise AdarecError(f"{label}: not a run folder (a file, not a directory)")
        if _is_run(path):
            add(label, path)
            continue
        present = [name for name in RUN_FILES if (path / name).is_file()]
        runs = sorted(p for p in path.iterdir() if p.is_dir() and _is_run(p)) if not present else []
        if not runs:
            missing = " or ".join(name for name in RUN_FILES if name not in present)
            inside = "" if present else ", and no run folders in it"
            raise AdarecError(f"{label}: not a run folder (no {missing}{inside})")
        for sub in runs:
            add(f"{label}/{sub.name}", sub)
    return found


def _read_config(label: str, path: Path) -> dict:
    try:
        config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        problem = " ".join(str(exc).split())           # one line, whatever the YAML error spans
        raise AdarecError(f"{label}/config.yaml: cannot read it ({type(exc).__name__}: {problem})") from None
    if not isinstance(config, dict):
        raise AdarecError(f"{label}/config.yaml: not a run config (expected a mapping of sections)")
    return config


def _read_rows(label: str, file: Path) -> list[dict]:
    rows = []
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise AdarecError(f"{label}/{file.name}: cannot read it ({exc})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AdarecError(f"{label}/{file.name}:{number}: not a JSON row ({exc.msg})") from None
        if not isinstance(row, dict) or ("event" not in row and "epoch" not in row):
            raise AdarecError(f"{label}/{file.name}:{number}: not a metrics row (no epoch)")
        rows.append(row)
    return current_rows(rows)


def _section(config: dict, name: str) -> dict:
    value = config.get(name)
    return value if isinstance(value, dict) else {}


def describe_data(config: dict) -> str:
    """The data file's stem, with the settings that select part of it or change it."""
    data = _section(config, "data")
    stem = Path(str(data.get("path", "?"))).stem
    extras = [f"{key}={data[key]}" for key in ("shorten_seq_to", "max_users", "augmented_prefix") if data.get(key)]
    return f"{stem} ({', '.join(extras)})" if extras else stem


def is_metric(key: str) -> bool:
    return _METRIC.match(key) is not None


def _metrics(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if is_metric(k) and isinstance(v, (int, float))}


def _last_epoch(rows: list[dict]) -> int | None:
    epochs = [r["epoch"] for r in rows if isinstance(r.get("epoch"), int)]
    return max(epochs) if epochs else None


def load_run(label: str, path: Path) -> Run:
    """Summarise one run folder (expand_runs checked that it is one)."""
    config = _read_config(label, path)
    rows = _read_rows(label, path / "metrics.jsonl")
    select = str(_section(config, "eval").get("select_metric", "NDCG@20")).upper()
    valid = [r for r in rows if str(r.get("split", "")).split("/")[0] == "valid"]
    # Each member (adarec-dual's e5 and e10: splits "valid/<member>") keeps the weights of its own
    # best validation epoch, as the trainer selects them; a one-member run has split "valid".
    member_best: dict[str, dict] = {}
    for row in valid:
        if select not in row:
            raise AdarecError(f"{label}/metrics.jsonl: the validation row of epoch {row.get('epoch')} has no "
                              f"{select} (the run's eval.select_metric)")
        best = member_best.get(row["split"])
        if best is None or row[select] > best[select]:        # the first of equal values, as the trainer
            member_best[row["split"]] = row
    bests = list(member_best.values())
    # Several members: their best epochs joined with "/" and the mean of their best values.
    best_epoch = ("/".join(str(b["epoch"]) for b in bests) if len(bests) > 1
                  else bests[0]["epoch"] if bests else None)
    best_value = sum(float(b[select]) for b in bests) / len(bests) if bests else None
    tests = [r for r in rows if r.get("split") == "test"]
    own = [r for r in tests if "source" not in r]
    test = own[-1] if own else None
    offline = []
    for r in tests:
        if "source" in r:
            overrides = " ".join(r.get("overrides") or [])
            offline.append((f"offline {overrides}".strip(), _metrics(r)))
    if test is not None and isinstance(test.get("trained_epochs"), int):
        epochs = test["trained_epochs"]
    else:
        epochs_file = path / "epochs.jsonl"
        epochs = _last_epoch(_read_rows(label, epochs_file)) if epochs_file.is_file() else None
        if epochs is None:
            epochs = _last_epoch(valid)
    return Run(label=label, path=path, config=config, model=str(_section(config, "model").get("name", "?")),
               data=describe_data(config), seed=_section(config, "train").get("seed"), select=select,
               epochs=epochs, best_epoch=best_epoch, best_value=best_value,
               test=None if test is None else _metrics(test), offline=offline)


def load_runs(paths: Sequence[str | Path], base: Path | None = None) -> list[Run]:
    return [load_run(label, path) for label, path in expand_runs(paths, base)]


# -- folding seeds ---------------------------------------------------------------------------
def _ignored(dotted: str) -> bool:
    last = dotted.rsplit(".", 1)[-1]
    return dotted in IGNORED_KEYS or last in OUTPUT_KEY_NAMES or last.endswith("_dir")


def _resolved(config: dict) -> dict:
    """The config with today's defaults filled in, so that a run saved before a key existed compares
    equal to a newer one that left it at its default; the file as it is when it no longer loads."""
    from adarec.config import config_from_dict, config_to_dict

    try:
        return config_to_dict(config_from_dict(config, check=False))
    except Exception:               # an old or foreign config: compared as written
        return config


def _comparable(config: dict, prefix: str = "") -> object:
    """The resolved config without IGNORED_KEYS and output locations, as a canonical JSON string."""
    config = _resolved(config)

    def strip(value, at):
        if isinstance(value, dict):
            return {k: strip(v, f"{at}.{k}" if at else str(k)) for k, v in value.items()
                    if not _ignored(f"{at}.{k}" if at else str(k))}
        return value
    return json.dumps(strip(config, prefix), sort_keys=True, default=str)


@dataclass
class Row:
    """A table row: one run, several seeds of one config folded, or one offline evaluation."""

    runs: list[Run]
    metrics: dict[str, list[float]]
    evaluation: str = "test"


def fold_runs(runs: list[Run], fold: bool = True, offline: bool = False) -> list[Row]:
    """Table rows in the order of the runs (a folded row where its first run is); with `offline`,
    each run's offline evaluations follow its row and the run is never folded."""
    groups: dict[object, list[Run]] = {}
    for run in runs:
        if run.finished and not (offline and run.offline):
            groups.setdefault(_comparable(run.config), []).append(run)
    folded: dict[int, list[Run]] = {}
    for members in groups.values():
        seeds = [m.seed for m in members]
        if fold and len(members) > 1 and len(set(map(repr, seeds))) == len(seeds):
            folded[id(members[0])] = members
            for m in members[1:]:
                folded[id(m)] = []
    rows: list[Row] = []
    for run in runs:
        members = folded.get(id(run), [run])
        if not members:
            continue
        tests = [m.test or {} for m in members]
        keys = [k for k in tests[0] if all(k in t for t in tests)]
        rows.append(Row(members, {k: [t[k] for t in tests] for k in keys}))
        if offline:
            rows += [Row([run], {k: [v] for k, v in values.items()}, evaluation=what) for what, values in run.offline]
    return rows


def metric_sort_key(name: str) -> tuple[int, int]:
    kind, k = _METRIC.match(name).groups()
    return METRIC_ORDER.index(kind), int(k)


def parse_metrics(text: str | None) -> list[str] | None:
    """--metrics 'HR@5,ndcg@20' -> ['HR@5', 'NDCG@20'] (case-insensitive, order kept)."""
    if text is None:
        return None
    names = [part.strip().upper() for part in text.split(",") if part.strip()]
    bad = [n for n in names if not is_metric(n)]
    if bad or not names:
        raise AdarecError(f"--metrics {text!r}: expected a comma-separated list of HR@K, NDCG@K or MRR@K")
    return names


def default_metrics(rows: list[Row]) -> list[str]:
    return sorted({k for row in rows for k in row.metrics}, key=metric_sort_key)


# -- formatting ------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _short(value: float) -> str:
    """.0667 for 0.06667 (the style of RESULTS.md): 4 decimals, no leading zero below 1."""
    text = f"{value:.4f}"
    return text[1:] if text.startswith("0.") else text


def _cell(values: list[float] | None) -> str:
    if not values:
        return ""
    mean, std = _mean_std(values)
    return _short(mean) if std is None else f"{_short(mean)} ± {_short(std)}"


def _joined(values: list) -> str:
    """One value when all are equal, else all of them, 19/20."""
    if all(v is None for v in values):
        return ""
    return str(values[0]) if len(set(values)) == 1 else "/".join("" if v is None else str(v) for v in values)


def _labels(rows: list[Row]) -> dict[int, str]:
    """Each run's path as given, less the folders common to all runs' paths (a lone run keeps
    its whole path)."""
    runs = list({id(run): run for row in rows for run in row.runs}.values())
    parents = {os.path.dirname(run.label) for run in runs}
    common = ""
    if len(runs) > 1:
        try:
            common = os.path.commonpath(list(parents))
        except ValueError:                    # absolute and relative paths mixed
            common = ""
    return {id(run): os.path.relpath(run.label, common) if common else run.label for run in runs}


def _select_header(rows: list[Row]) -> str | None:
    selects = {run.select for row in rows for run in row.runs}
    return f"valid {selects.pop()}" if len(selects) == 1 else None


def render_markdown(rows: list[Row], metrics: list[str], offline: bool = False) -> str:
    """A pipe table, one line per row, ending with a newline."""
    labels = _labels(rows)
    select_header = _select_header(rows)
    header = ["run", "model", "data", "epochs", "best epoch", select_header or "best valid",
              *(["evaluation"] if offline else []), *metrics, "seed", "n"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        runs = row.runs
        if row.evaluation != "test":
            cells = ["", "", "", "", "", ""]
        else:
            epochs = _joined([r.epochs for r in runs])
            if not runs[0].finished:
                epochs = f"{epochs}, {NO_TEST_ROW}" if epochs else NO_TEST_ROW
            best = [r.best_value for r in runs]
            best_cell = "" if any(v is None for v in best) else _cell(best)
            if select_header is None and best_cell:
                best_cell = f"{runs[0].select} {best_cell}"
            cells = [", ".join(labels[id(r)] for r in runs), runs[0].model, runs[0].data, epochs,
                     _joined([r.best_epoch for r in runs]), best_cell]
        if offline:
            cells.append(row.evaluation)
        cells += [_cell(row.metrics.get(m)) for m in metrics]
        cells += [", ".join(str(r.seed) for r in runs), str(len(runs))] if row.evaluation == "test" else ["", ""]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _number(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def render_csv(rows: list[Row], metrics: list[str]) -> str:
    """One CSV line per row, numbers at full precision; a folded row has the mean under each
    metric's name and the sample standard deviation under NAME_std."""
    labels = _labels(rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["run", "model", "data", "status", "evaluation", "epochs", "best_epoch", "select_metric",
                     "valid_best", "valid_best_std", *(x for m in metrics for x in (m, f"{m}_std")), "seed", "n"])
    for row in rows:
        runs = row.runs
        best = [r.best_value for r in runs]
        best_mean, best_std = (None, None) if any(v is None for v in best) else _mean_std(best)
        line = [";".join(labels[id(r)] for r in runs), runs[0].model, runs[0].data,
                "finished" if runs[0].finished else NO_TEST_ROW, row.evaluation,
                _joined([r.epochs for r in runs]), _joined([r.best_epoch for r in runs]), runs[0].select,
                _number(best_mean), _number(best_std)]
        for m in metrics:
            values = row.metrics.get(m)
            mean, std = _mean_std(values) if values else (None, None)
            line += [_number(mean), _number(std)]
        line += [";".join(str(r.seed) for r in runs), len(runs)]
        writer.writerow(line)
    return out.getvalue()


# -- the command -----------------------------------------------------------------------------
class _BlockArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of exiting (a marker's arguments are not the command line)."""

    def error(self, message):
        raise AdarecError(message)


def add_table_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that shape a table: shared by the command line and the markers of --update."""
    parser.add_argument("--metrics", metavar="LIST",
                        help="test metrics to show, comma-separated, e.g. HR@5,NDCG@5,HR@20,NDCG@20 "
                             "(default: every HR@K, NDCG@K, MRR@K the test rows have)")
    parser.add_argument("--offline", action="store_true",
                        help="also list each run's offline test evaluations (adarec evaluate), with their --set")
    parser.add_argument("--no-fold", dest="fold", action="store_false",
                        help="one row per run, even for runs that differ only in train.seed")


def table(paths: Sequence[str | Path], fmt: str = "md", metrics: str | None = None, offline: bool = False,
          fold: bool = True, base: Path | None = None) -> str:
    """The summary table of the run folders `paths` as markdown or CSV text."""
    rows = fold_runs(load_runs(paths, base), fold=fold, offline=offline)
    names = parse_metrics(metrics) or default_metrics(rows)
    return render_markdown(rows, names, offline) if fmt == "md" else render_csv(rows, names)


def _block_parser() -> argparse.ArgumentParser:
    parser = _BlockArgumentParser(prog="summarize", add_help=False)
    parser.add_argument("runs", nargs="+")
    add_table_arguments(parser)
    return parser


def update_text(text: str, base: Path, where: str = "file") -> tuple[str, list[int]]:
    """The text with every summarize block regenerated, and the line numbers of the blocks that
    changed. Relative run folders are read from `base`; `where` names the file in errors."""
    opened = [text.count("\n", 0, m.start()) + 1 for m in OPEN.finditer(text)]
    blocks = list(BLOCK.finditer(text))
    starts = [text.count("\n", 0, m.start()) + 1 for m in blocks]
    unclosed = sorted(set(opened) - set(starts))
    if unclosed:
        raise AdarecError(f"{where}:{unclosed[0]}: a summarize block needs `-->` at the end of a line and "
                          "<!-- /summarize --> at the start of a later line")
    out, changed, pos = [], [], 0
    for line, match in zip(starts, blocks, strict=True):
        try:
            args = _block_parser().parse_args(shlex.split(match["args"]))
            body = table(args.runs, "md", args.metrics, args.offline, args.fold, base)
        except (AdarecError, ValueError) as err:
            raise AdarecError(f"{where}:{line}: {err}") from None
        if body != match["body"]:
            changed.append(line)
        out += [text[pos:match.start("body")], body]
        pos = match.start("end")
    out.append(text[pos:])
    return "".join(out), changed


def update_file(path: Path, check: bool = False) -> tuple[int, list[int]]:
    """Regenerate the summarize blocks of a markdown file in place (atomically, and only if one
    changed); with `check`, write nothing. Returns (number of blocks, changed blocks' lines)."""
    path = Path(path)
    if not path.is_file():
        raise AdarecError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    new, changed = update_text(text, path.parent, str(path))
    if changed and not check:
        write_text(path, new)
    return len(BLOCK.findall(text)), changed


def write_text(path: Path, text: str) -> None:
    from adarec.engine.atomic_io import atomic_write_text

    try:
        atomic_write_text(Path(path), text)
    except OSError as exc:
        raise AdarecError(f"{path}: cannot write it ({exc.strerror or exc})") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR",
                        help="run folders (config.yaml + metrics.jsonl), or folders holding run folders")
    parser.add_argument("--format", choices=("md", "csv"), default="md", help="markdown pipe table or CSV")
    parser.add_argument("--out", metavar="FILE", help="write the table to FILE (atomically) instead of printing it")
    add_table_arguments(parser)
    parser.add_argument("--update", metavar="MD_FILE",
                        help="regenerate every <!-- summarize: ARGS --> ... <!-- /summarize --> block of a "
                             "markdown file in place (run folders in ARGS are relative to the file)")
    parser.add_argument("--check", action="store_true",
                        help="with --update: change nothing, exit 1 if a block is out of date")


def summarize_command(args: argparse.Namespace) -> int:
    if args.update:
        if args.runs or args.out or args.format != "md" or args.metrics or args.offline or not args.fold:
            raise AdarecError("--update regenerates the blocks of a markdown file as their markers say: pass no "
                              "RUN_DIR, --out, --format, --metrics, --offline or --no-fold with it")
        blocks, changed = update_file(Path(args.update), check=args.check)
        lines = ", ".join(map(str, changed))
        if args.check and changed:
            print(f"{args.update}: {len(changed)} of {blocks} summarize blocks out of date (lines {lines}); "
                  f"regenerate them with adarec summarize --update {args.update}")
            return 1
        state = f"{'out of date' if args.check else 'regenerated'}: lines {lines}" if changed else "all up to date"
        print(f"{args.update}: {blocks} summarize blocks, {state}")
        return 0
    if args.check:
        raise AdarecError("--check goes with --update MD_FILE")
    if not args.runs:
        raise AdarecError("summarize needs run folders (RUN_DIR ...) or --update MD_FILE")
    text = table(args.runs, args.format, args.metrics, args.offline, args.fold)
    if args.out:
        write_text(Path(args.out), text)
    else:
        print(text, end="")
    return 0
