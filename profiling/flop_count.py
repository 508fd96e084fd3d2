"""Arithmetic of one training epoch: what the steps compute, and the floor without padding.

    python -m adarec.profiling.flop_count --config configs/adarec_beauty.yaml [--steps 12] [--set ...]

Counts the floating-point operations of real training steps (Trainer.train_step on the sampler's
batches, forward, backward and optimizer) with torch.utils.flop_counter.FlopCounterMode, on
`--steps` batches spread over an epoch, and scales the mean to the epoch's steps. It reports the
epoch's TFLOP as computed (with the batches' padding) and a floor: the same epoch counted again
with every batch cut to exactly its longest row (data.width_buckets of every width), whose
remaining padding (rows shorter than their batch's longest, reported) is small because the
batches are length-grouped. Divided by a measured matmul rate (`--gflops`, default the bf16 rate
of the 2-core development CPU) the floor gives the time an epoch cannot beat on that machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from torch.utils.flop_counter import FlopCounterMode

from adarec.config import apply_overrides, load_config

# bf16 matmul rate of the 2-core development machine (2 threads, AVX512-BF16): docs/method.md,
# "Trimmed batches". Pass --gflops for another machine.
DEFAULT_GFLOPS = 143.0


def _trainer(cfg, run_dir: Path):
    from adarec.engine.data_setup import load_split
    from adarec.engine.distributed import setup_distributed
    from adarec.engine.trainer import Trainer

    dist = setup_distributed(cfg.train.device, cfg.train.dist_timeout_s)
    return Trainer(cfg, run_dir, dist, load_split(cfg, dist.device), resume=False)


def epoch_flops(cfg, steps: int) -> tuple[float, int, float]:
    """(mean FLOPs of `steps` training steps spread over epoch 0, steps per epoch, padding fraction)."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _trainer(cfg, Path(tmp))
        for engine in trainer.engines.values():
            engine.train()
        batches = list(trainer.sampler.epoch(0))
        chosen = batches[:: max(len(batches) // steps, 1)][:steps]
        counter = FlopCounterMode(display=False)
        with counter:
            for batch in chosen:
                trainer.train_step(batch)
        return counter.get_total_flops() / len(chosen), len(batches), trainer.sampler.padding_fraction(0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m adarec.profiling.flop_count",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=12, help="steps counted, spread over the epoch")
    parser.add_argument("--gflops", type=float, default=DEFAULT_GFLOPS, help="matmul rate for the floor's time")
    args = parser.parse_args(argv)
    cfg = apply_overrides(load_config(args.config), ["train.device=cpu", *args.set])
    done, steps, padding = epoch_flops(cfg, args.steps)
    exact = apply_overrides(cfg, [f"data.width_buckets={list(range(1, cfg.data.max_len + 1))}"])
    floor, _, residual = epoch_flops(exact, args.steps)
    row = {"config": Path(args.config).stem, "steps_per_epoch": steps,
           "epoch_tflop_computed": done * steps / 1e12, "padding_frac": padding,
           "epoch_tflop_floor": floor * steps / 1e12, "floor_padding_frac": residual,
           "gflops_assumed": args.gflops, "floor_seconds": floor * steps / (args.gflops * 1e9)}
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
