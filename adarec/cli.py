"""Command line: `adarec train`, `adarec evaluate`, `adarec augment` (DiffuASR's augmented data file),
`adarec export` and `adarec recommend` (serving a run through a faiss index, docs/serving.md).

Every AdarecError (bad data, bad config, nothing to resume...) ends with one message on stderr
and exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import AdarecError
from .summarize import add_arguments as add_summarize_arguments
from .summarize import summarize_command


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML run config (configs/*.yaml); optional with --resume")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                        metavar="KEY=VALUE",
                        help="dotted overrides, e.g. --set train.lr=2e-3 data.max_users=500")
    parser.add_argument("--output-dir", help="run directory (default: runs/<config file stem>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output-dir from its latest checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in a folder that holds one: the old run is moved aside to "
                             "<folder>.old-<UTC time>, never deleted")
    parser.add_argument("--help-config", action="store_true", help="list every config key and exit")
    # Passed by the deepspeed launcher; the rank is read from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def default_run_dir(config_path: str) -> Path:
    """runs/<config file stem>: one folder per config file, so that configs of one model and data
    file (adarec_beauty.yaml, adarec_beauty_sparse5.yaml) never share a run folder."""
    return Path("runs") / Path(config_path).stem


def train_command(args: argparse.Namespace) -> int:
    from .config import apply_overrides, describe_keys, load_config

    if args.help_config:
        print(describe_keys())
        return 0
    run_dir = Path(args.output_dir) if args.output_dir else None
    if args.resume and args.overwrite:
        raise AdarecError("--resume continues the run in --output-dir and --overwrite moves it aside: pass one")
    if args.resume:
        if run_dir is None:
            raise AdarecError("--resume needs --output-dir (the run to continue)")
        saved = run_dir / "config.yaml"
        if not saved.exists():
            raise AdarecError(f"{run_dir}: nothing to resume (no config.yaml)")
        cfg = apply_overrides(load_config(saved), args.overrides)
    else:
        if not args.config:
            raise AdarecError("train needs --config FILE (or --resume --output-dir DIR)")
        cfg = load_config(args.config, args.overrides)
    if run_dir is None:
        run_dir = default_run_dir(args.config)
    from adarec.engine.trainer import run_training

    result = run_training(cfg, run_dir, resume=args.resume, overwrite=args.overwrite)
    print(json.dumps(result))
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    from adarec.engine.offline import evaluate_run

    print(json.dumps(evaluate_run(Path(args.run), args.split, args.device, args.overrides, args.allow_unfinished)))
    return 0


def augment_command(args: argparse.Namespace) -> int:
    """The generator's config is the one its run saved (with --set over it), so that the weights fit;
    --config locates the default run, runs/<config file stem>, and is otherwise only checked."""
    from .augment_file import write_augmented
    from .config import apply_overrides, load_config
    from .engine.distributed import pick_device

    if not args.config and not args.run:
        raise AdarecError("augment needs --config FILE (the generator's config) or --run DIR (its run)")
    given = load_config(args.config, args.overrides) if args.config else None
    if given is not None and given.model.name != "diffuasr":
        raise AdarecError(f"{args.config}: augment needs a diffuasr generator config, this one trains "
                          f"model.name={given.model.name!r}")
    run_dir = Path(args.run) if args.run else default_run_dir(args.config)
    saved = run_dir / "config.yaml"
    if saved.exists():
        cfg = apply_overrides(load_config(saved), args.overrides)
    elif given is not None:
        cfg = given
    else:
        raise AdarecError(f"{run_dir}: not a trained run (no config.yaml); pass --config or train the generator")
    print(json.dumps(write_augmented(cfg, run_dir, args.output, pick_device(args.device))))
    return 0


def export_command(args: argparse.Namespace) -> int:
    from .serving import export_run

    print(json.dumps(export_run(Path(args.run), args.index, args.nlist, args.nprobe, args.device)))
    return 0


def recommend_command(args: argparse.Namespace) -> int:
    """One line per user, `USER item:score item:score ...` best first, or one JSON list."""
    from .serving import Recommender
    from .serving.recommender import check_k

    check_k(args.k)     # before the model is loaded
    recommender = Recommender.from_run(Path(args.run), args.device)
    results = recommender.recommend(args.users, args.k)
    if args.json:
        print(json.dumps([{"user": user, "items": r.items.tolist(), "scores": [round(float(s), 6) for s in r.scores]}
                          for user, r in zip(args.users, results, strict=True)]))
    else:
        for user, r in zip(args.users, results, strict=True):
            pairs = (f"{item}:{score:.6g}" for item, score in zip(r.items, r.scores, strict=True))
            print(" ".join([str(user), *pairs]))
    return 0


def version_text() -> str:
    """`adarec --version`: this package's version, then the engine's main dependencies (read from
    the installed packages' metadata, nothing imported)."""
    from .engine.run_record import package_versions

    versions = package_versions()
    deps = ", ".join(f"{name} {versions[name] or 'not installed'}" for name in ("torch", "triton", "deepspeed"))
    return f"adarec {versions['adarec']}\n{deps}; python {versions['python']}"


class _VersionAction(argparse.Action):
    """--version, computed when asked for (not each time the parser is built)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adarec", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action=_VersionAction,
                        help="print the versions of adarec, torch, triton and deepspeed and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model (DeepSpeed engine)")
    add_train_arguments(train)
    train.set_defaults(func=train_command)
    ev = sub.add_parser("evaluate", help="evaluate a run's best weights (the test split only once it has ended)")
    ev.add_argument("--run", required=True, help="run directory written by adarec train")
    ev.add_argument("--split", choices=("valid", "test"), default="test")
    ev.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ev.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="settings over the run's config, e.g. --set model.eval_noise=fixed eval.batch_size=256")
    ev.add_argument("--allow-unfinished", action="store_true",
                    help="evaluate the test split of a run that has not ended (recorded in metrics.jsonl)")
    ev.set_defaults(func=evaluate_command)
    aug = sub.add_parser("augment", help="write DiffuASR's augmented data file (generated items before every "
                                         "sequence) from a trained generator")
    aug.add_argument("--config", help="the generator's YAML config (configs/diffuasr_*.yaml)")
    aug.add_argument("--run", help="the generator's run directory (default: runs/<config file stem>)")
    aug.add_argument("--output", required=True, help="augmented interaction file to write (and FILE.json)")
    aug.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    aug.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                     help="settings over the run's config, e.g. --set model.guidance_weight=0.2")
    aug.set_defaults(func=augment_command)
    exp = sub.add_parser("export", help="write a run's item table and faiss index beside it (items.npy, "
                                        "items.faiss, export.json) for `adarec recommend`")
    exp.add_argument("--run", required=True, help="run directory written by adarec train")
    exp.add_argument("--index", choices=("flat", "ivf"), default="flat",
                     help="flat: exact inner-product search; ivf: clustered, faster on large catalogs, "
                          "approximate unless --nprobe equals --nlist")
    exp.add_argument("--nlist", type=int, help="ivf lists (default about 4 * sqrt(number of items))")
    exp.add_argument("--nprobe", type=int, help="ivf lists scanned per query (default nlist / 8)")
    exp.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    exp.set_defaults(func=export_command)
    rec = sub.add_parser("recommend", help="top-k items for users of a run's data file, none from their history "
                                           "(needs adarec export)")
    rec.add_argument("--run", required=True, help="run directory with an export")
    rec.add_argument("--user", dest="users", type=int, action="append", required=True, metavar="USER_ID",
                     help="user id as in the data file; repeat for several users")
    rec.add_argument("--k", type=int, default=20, help="items per user (default 20)")
    rec.add_argument("--json", action="store_true", help="print one JSON list of {user, items, scores}")
    rec.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    rec.set_defaults(func=recommend_command)
    summ = sub.add_parser("summarize", help="one table row per run folder (seeds folded into mean ± std), "
                                            "markdown or CSV; --update regenerates a markdown file's tables")
    add_summarize_arguments(summ)
    summ.set_defaults(func=summarize_command)
    return parser


def run(func, args) -> int:
    try:
        return func(args)
    except AdarecError as err:
        print(f"adarec: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("adarec: interrupted; resume with --resume --output-dir <run>", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
