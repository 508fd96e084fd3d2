"""Stress run: every model trains for a few hundred steps on small synthetic data and must stay finite.

What it catches: a value that turns NaN or inf only now and then (a random draw that rounds to
exactly 1.0, a log of a zero, a division by an empty count), which a short test on fixed data
never meets. Each case trains the real Trainer (`train_epoch`, so staged training and the
non-finite watch run as in `adarec train`) on a synthetic file with long, short and length-1
training histories, then asserts that every weight is finite and validates once (which refuses
NaN scores).

Rare draws are made common: with `--extreme-rate R` a fraction R of every row-keyed hash word
(adarec/keyed_random.py) is replaced by one of the extreme words (all zeros, all ones, each
half), so a conversion that is not finite at an extreme fails within a few steps instead of once
per 150 Beauty steps. The replacement is a function of the word itself: no host sync, the same
on every run.

    python -m adarec.profiling.stress                                  # the full grid, 300 steps
    python -m adarec.profiling.stress --models adarec --steps 1000 --out runs/stress.jsonl

One JSON row per case is printed (and appended to --out) as soon as the case ends. The test
suite runs a smaller grid (tests/test_stress.py); this is the longer version for manual runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
MODELS = ("sasrec", "elcrec", "adarec", "adarec-dual", "diffurec", "adrec", "diffuasr")
# Per model: the shipped Beauty config (its loss and architecture) scaled down to the stress data.
SMALL = ["data.max_len=20", "model.num_layers=1", "model.num_heads=2", "model.num_intent_clusters=8",
         "model.max_depth=4", "train.batch_size=32", "eval.batch_size=128", "train.log_every=10",
         "train.device=cpu", "train.precision=fp32"]
EXTRA = {
    "diffurec": ["model.diffusion_steps=8", "model.sample_steps=2"],
    # Every training stage within the run: pre-training, frozen warm-up, joint.
    "adrec": ["model.diffusion_steps=8", "model.sample_steps=2", "model.pretrain_epochs=1",
              "model.freeze_epochs=1", "model.denoiser_layers=1"],
    "diffuasr": ["model.prefix_items=4", "model.diffusion_steps=50", "model.sample_steps=2",
                 "model.denoiser_channels=4"],
}
EXTREME_WORDS = (0x00000000, 0xFFFFFFFF, 0x0000FFFF, 0xFFFF0000, 0x7FFFFFFF, 0x80000000, 0x000000FF, 0xFFFFFF00)


def hidden_for(model: str, hidden: int) -> int:
    """DiffuASR's item vectors are square images: its hidden size is the nearest square >= hidden."""
    if model != "diffuasr":
        return hidden
    side = math.isqrt(hidden - 1) + 1
    return side * side


def write_stress_data(path: Path, seed: int = 0, users: int = 400, items: int = 300) -> Path:
    """Histories of 3 items upwards (a training input of 0 or 1 items) to several times max_len,
    geometric in between: long, short and length-1 rows in every epoch."""
    from adarec.data.synthetic import SyntheticSpec, write_synthetic

    write_synthetic(path, SyntheticSpec(items=items, users=users, seed=seed, mean_length=9.0, min_length=3,
                                        max_length=80))
    return path


@contextlib.contextmanager
def extreme_words(rate: float) -> Iterator[None]:
    """Replace a fraction `rate` of KeyedDraws' hash words by extreme words (module docstring)."""
    from adarec.keyed_random import KeyedDraws, _mix32

    if rate <= 0:
        yield
        return
    real = KeyedDraws.bits
    threshold = int(rate * 2**20)

    def bits(self, tail, block=None, blocks=1, align_right=False):
        words = real(self, tail, block, blocks, align_right)
        # A second, independent hash of the word decides (20 bits) and picks (3 bits).
        decide = _mix32(words ^ 0x5BD1E995)
        extremes = torch.tensor(EXTREME_WORDS, dtype=words.dtype, device=words.device)
        replaced = extremes[(decide >> 20) & 7]
        return torch.where((decide & 0xFFFFF) < threshold, replaced, words)

    KeyedDraws.bits = bits
    try:
        yield
    finally:
        KeyedDraws.bits = real


def stress_case(model: str, data: Path, hidden: int, seed: int, steps: int, work_dir: Path,
                extreme_rate: float = 1e-3) -> dict:
    """Train `model` for at least `steps` steps; the row of this case (ok, or the error)."""
    from adarec.engine.data_setup import load_split
    from adarec.engine.distributed import setup_distributed
    from adarec.engine.trainer import Trainer

    from adarec.config import apply_overrides, load_config
    from adarec.errors import AdarecError

    hidden = hidden_for(model, hidden)
    overrides = [*SMALL, *EXTRA.get(model, []), f"data.path={data}", f"model.hidden_size={hidden}",
                 f"train.seed={seed}"]
    cfg = apply_overrides(load_config(REPO / "configs" / f"{model}_beauty.yaml"), overrides)
    row = {"model": model, "hidden": hidden, "seed": seed, "extreme_rate": extreme_rate}
    start = time.perf_counter()
    dist = setup_distributed(cfg.train.device, cfg.train.dist_timeout_s)
    split = load_split(cfg, dist.device)
    trainer = Trainer(cfg, work_dir, dist, split, resume=False)
    done, epoch, losses = 0, 0, []
    try:
        with extreme_words(extreme_rate):
            while done < steps:
                record = trainer.train_epoch(epoch)
                losses.append(record["loss"])
                done += len(trainer.sampler)
                epoch += 1
            bad = [n for e in trainer.engines.values() for n, p in e.module.named_parameters()
                   if not torch.isfinite(p).all()]
            if bad:
                raise AssertionError(f"non-finite weights after {done} steps: {', '.join(bad[:5])}")
            metrics = trainer.evaluate(_scorer(trainer), "valid")
        row.update(ok=True, steps=done, epochs=epoch, first_loss=losses[0], last_loss=losses[-1],
                   valid_ndcg20=metrics["NDCG@20"])
    except (AdarecError, AssertionError) as err:
        row.update(ok=False, steps=done, epochs=epoch, error=f"{type(err).__name__}: {err}")
    finally:
        trainer.runlog.close()
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _scorer(trainer):
    from adarec.models import scorer

    return scorer({name: engine.module for name, engine in trainer.engines.items()})


def run_grid(models, hiddens, seeds, steps: int, extreme_rate: float, out: Path | None = None,
             work: Path | None = None) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        data = write_stress_data(Path(tmp) / "stress.txt")
        for model in models:
            for hidden in hiddens:
                for seed in seeds:
                    row = stress_case(model, data, hidden, seed, steps, Path(tmp) / f"{model}_{hidden}_{seed}",
                                      extreme_rate)
                    print(json.dumps(row), flush=True)
                    if out is not None:
                        with open(out, "a") as f:
                            f.write(json.dumps(row) + "\n")
                    rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adarec.profiling.stress", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--hidden", nargs="+", type=int, default=[16, 32])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=300, help="training steps per case, at least (whole epochs)")
    parser.add_argument("--extreme-rate", type=float, default=1e-3,
                        help="fraction of hash words replaced by extreme words (0: the draws as they are)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, help="append one JSON row per case to this file")
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(args.threads)
    rows = run_grid(args.models, args.hidden, args.seeds, args.steps, args.extreme_rate, args.out)
    failed = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)} of {len(rows)} cases stayed finite", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
