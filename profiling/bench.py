"""Training-step benchmark harness: a config, several kernel backends, one table.

    python -m adarec.profiling.bench --config configs/adarec_beauty.yaml --backends eager fused \
        --steps 20 --repeats 5 --out results/bench/adarec_beauty
    python -m adarec.profiling.bench --config ... --trace        # + a Chrome trace per backend
    python -m adarec.profiling.bench --config ... --trace-summary   # + counts read off a profile

Backends: eager (the eager twins) and fused (Triton trajectory + native gated fusion), both with
DeepSpeed's bf16 engine; autocast (fused, with bf16 from torch.autocast over fp32 weights, the
default on one GPU); graphs (autocast, and train.cuda_graphs: the whole step captured and
replayed); auto (kernels.backend=auto and the run config's precision as it stands: what a CPU
run trains with). A backend that fails leaves a row with its error; the others still run.

Every row also carries the share of padding among the positions a training epoch and a
validation pass compute (`padding_frac`, `valid_padding_frac`: data.width_buckets and
data.group_by_length decide them, adarec/data/length_groups.py). `--full-epoch` times one whole
training epoch instead of projecting it from blocks of steps: with length-grouped batches the
step time depends on the batch's width, and a whole epoch holds every width in its proportion.

For each backend it builds the real training path (the DeepSpeed engine(s) of the run config,
the on-device batch sampler, the model's data-dependent init), runs `--warmup` untimed steps,
then `--repeats` timed blocks of `--steps` steps (a step = batch construction + forward +
backward + optimizer step of every member, exactly as `adarec train` does it). Reported per
backend: the step time (median and spread over the repeats), samples/s, the training time of
one epoch projected from the dataset's steps per epoch, the time of a full validation pass
and the peak CUDA memory. Writes bench.csv, bench.md, bench.json and bench.png under --out;
every row carries the device, torch/triton versions, date and git commit. `--trace-summary`
profiles `--trace-steps` more steps (Trainer.train_step on batches built beforehand) and adds
per-step counts to the row (a trace reduced to numbers, small enough to copy off a remote
machine): launches and host syncs by the rules of
profiling/opcount.py and, on CUDA, kernels, synchronising CUDA runtime calls and GPU-busy ms
per step, with the top kernels in trace_summary_<backend>.json.

Timing is wall-clock around synchronised blocks (what a training run pays), not per-kernel
device time; use --trace or Nsight (README, "Profiling") for the breakdown.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from adarec.engine.data_setup import load_split
from adarec.engine.distributed import setup_distributed
from adarec.engine.evaluator import model_width_buckets
from adarec.engine.trainer import Trainer
from adarec.profiling import opcount
from adarec.profiling.timing import RowWriter, add_speedups, environment, synchronize

from adarec.config import apply_overrides, load_config
from adarec.data.length_groups import evaluation_batches, padding_fraction, sequence_lengths
from adarec.models import scorer

log = logging.getLogger("adarec.bench")
BACKENDS = ("eager", "fused", "autocast", "graphs", "auto")
# What each bench backend sets in the run config.
# eager and fused pin DeepSpeed's bf16 engine so that the two differ in their kernels only.
BACKEND_SETTINGS = {
    "eager": ["kernels.backend=eager", "train.bf16_mode=deepspeed"],
    "fused": ["kernels.backend=fused", "train.bf16_mode=deepspeed"],
    "autocast": ["kernels.backend=fused", "train.bf16_mode=autocast"],
    "graphs": ["kernels.backend=fused", "train.cuda_graphs=true"],
    "auto": ["kernels.backend=auto"],
}
SYNC_RUNTIME_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy ")


def _steps(trainer: Trainer):
    """Endless training batches, epoch after epoch, as the trainer would draw them."""
    epoch = 0
    while True:
        yield from trainer.sampler.epoch(epoch)
        epoch += 1


def _run_block(trainer: Trainer, batches, count: int) -> float:
    """Seconds for `count` steps, batch construction included, synchronised at both ends."""
    synchronize(trainer.device)
    start = time.perf_counter()
    for _ in range(count):
        trainer.train_step(next(batches))
    synchronize(trainer.device)
    return time.perf_counter() - start


def _validation_seconds(trainer: Trainer, repeats: int) -> float | None:
    if repeats <= 0:
        return None
    model = scorer({name: engine.module for name, engine in trainer.engines.items()})
    times = []
    for _ in range(repeats):
        synchronize(trainer.device)
        start = time.perf_counter()
        trainer.evaluate(model, "valid")
        synchronize(trainer.device)
        times.append(time.perf_counter() - start)
    # The first pass pays one-off costs (kernel compilation, allocator growth) when there are more.
    return statistics.median(times[1:] if len(times) > 1 else times)


def _valid_padding(trainer: Trainer) -> float:
    """Share of padding among the positions a validation pass computes (engine/evaluator.py)."""
    model = scorer({name: engine.module for name, engine in trainer.engines.items()})
    lengths = sequence_lengths(trainer.split.valid_input)
    buckets = model_width_buckets(model, trainer.width_buckets)
    return padding_fraction(lengths, evaluation_batches(lengths, trainer.cfg.eval.batch_size, buckets,
                                                        trainer.split.valid_input.shape[1]))


def _activities(device: torch.device) -> list:
    """What the profiler records: the host always, the GPU's kernels on CUDA."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return activities


def _trace(trainer: Trainer, batches, steps: int, path: Path) -> None:
    with torch.profiler.profile(activities=_activities(trainer.device), record_shapes=True) as prof:
        for _ in range(steps):
            trainer.train_step(next(batches))
        synchronize(trainer.device)
    prof.export_chrome_trace(str(path))


def trace_summary(trainer: Trainer, batches, steps: int, top: int = 10) -> dict:
    """Per-step counts from a profile of `steps` training steps (module docstring)."""
    cuda = trainer.device.type == "cuda"
    # The batches are built before the profile: the counts are Trainer.train_step's, as opcount's.
    ready = [next(batches) for _ in range(steps)]
    with torch.profiler.profile(activities=_activities(trainer.device)) as prof:
        for batch in ready:
            trainer.train_step(batch)
        synchronize(trainer.device)
    events = prof.events()
    counted = opcount.count_events(events)
    summary = {"launches_per_step": counted.launches / steps, "syncs_per_step": counted.syncs / steps,
               "sync_ops": dict(counted.sync_ops)}
    if cuda:
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_us = sum(e.device_time for e in kernels)
        by_name = collections.Counter()
        time_by_name = collections.Counter()
        for e in kernels:
            by_name[e.name] += 1
            time_by_name[e.name] += e.device_time
        summary.update(
            kernels_per_step=len(kernels) / steps,
            cuda_syncs_per_step=sum(e.name.startswith(SYNC_RUNTIME_CALLS) for e in events) / steps,
            gpu_busy_ms_per_step=busy_us / 1e3 / steps,
            top_kernels=[{"name": n[:120], "per_step": by_name[n] / steps, "ms_per_step": t / 1e3 / steps}
                         for n, t in time_by_name.most_common(top)],
        )
    return summary


def bench_backend(cfg, backend: str, split, dist, args, out: Path) -> dict:
    cfg = apply_overrides(cfg, BACKEND_SETTINGS[backend], where="bench")
    with tempfile.TemporaryDirectory(prefix="adarec-bench-") as run_dir:
        trainer = Trainer(cfg, Path(run_dir), dist, split, resume=False)
        for engine in trainer.engines.values():
            engine.train()
        batches = _steps(trainer)
        _run_block(trainer, batches, args.warmup)
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)
        block_s = [_run_block(trainer, batches, args.steps) for _ in range(args.repeats)]
        peak = torch.cuda.max_memory_allocated(trainer.device) / 2**20 if trainer.device.type == "cuda" else None
        step_ms = sorted(1e3 * s / args.steps for s in block_s)
        median_ms = statistics.median(step_ms)
        epoch_s = len(trainer.sampler) * median_ms / 1e3
        if args.full_epoch:
            synchronize(trainer.device)
            start = time.perf_counter()
            trainer.train_epoch(1)
            synchronize(trainer.device)
            epoch_s = time.perf_counter() - start
        row = {
            "config": args.config_name, "model": cfg.model.name, "backend": backend,
            "precision": trainer.precision,
            "batch_size": cfg.train.batch_size, "steps_per_epoch": len(trainer.sampler),
            "step_ms_median": median_ms, "step_ms_min": step_ms[0], "step_ms_max": step_ms[-1],
            "samples_per_s": cfg.train.batch_size / (median_ms / 1e3),
            "epoch_train_s": epoch_s, "epoch_measured": bool(args.full_epoch),
            "valid_pass_s": _validation_seconds(trainer, args.eval_repeats),
            "peak_mem_mib": peak,
            "padding_frac": trainer.sampler.padding_fraction(0),
            "valid_padding_frac": _valid_padding(trainer),
            "threads": torch.get_num_threads(),
        }
        if args.trace:
            _trace(trainer, batches, args.trace_steps, out / f"trace_{backend}.json")
        if args.trace_summary:
            summary = trace_summary(trainer, batches, args.trace_steps)
            (out / f"trace_summary_{backend}.json").write_text(json.dumps(summary, indent=1))
            row.update({k: v for k, v in summary.items() if k.endswith("_per_step")})
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["backend"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    step = [r["step_ms_median"] for r in rows]
    spread = [[r["step_ms_median"] - r["step_ms_min"] for r in rows], [r["step_ms_max"] - r["step_ms_median"]
                                                                      for r in rows]]
    axes[0].bar(labels, step, yerr=spread, capsize=4, color="tab:blue")
    axes[0].set_ylabel("ms per training step (median, min-max)")
    valid = [r["valid_pass_s"] or 0.0 for r in rows]
    axes[1].bar(labels, [r["epoch_train_s"] for r in rows], color="tab:orange", label="training, projected")
    axes[1].bar(labels, valid, bottom=[r["epoch_train_s"] for r in rows], color="tab:green",
                label="validation pass")
    axes[1].set_ylabel("seconds per epoch")
    axes[1].legend(fontsize=8)
    first = rows[0]
    fig.suptitle(f"{first['config']} on {first['device']} ({first['date']}, {first['commit']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks (median and spread over these)")
    parser.add_argument("--eval-repeats", type=int, default=2,
                        help="full validation passes to time (the first is a warm-up when > 1); 0 skips")
    parser.add_argument("--trace", action="store_true", help="also write a torch.profiler Chrome trace")
    parser.add_argument("--trace-summary", action="store_true",
                        help="profile --trace-steps steps and add per-step launch, sync and kernel counts")
    parser.add_argument("--trace-steps", type=int, default=3)
    parser.add_argument("--full-epoch", action="store_true",
                        help="time one whole training epoch instead of projecting it from the timed blocks")
    parser.add_argument("--out", default=None, help="results folder (default results/bench/<config name>)")
    args = parser.parse_args(argv)
    if os.environ.get("ADAREC_KERNELS"):
        parser.error("unset ADAREC_KERNELS: it would override the backend under test")
    args.config_name = Path(args.config).stem
    out = Path(args.out or f"results/bench/{args.config_name}")
    out.mkdir(parents=True, exist_ok=True)
    cfg = apply_overrides(load_config(args.config), args.set)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    dist = setup_distributed(cfg.train.device, cfg.train.dist_timeout_s)
    split = load_split(cfg, dist.device)
    env = environment(dist.device)
    # Each backend's row is on disk as soon as it is measured (a step killed at its time limit
    # keeps the backends it finished).
    writer = RowWriter(out, "bench")
    for backend in args.backends:
        try:
            row = writer.add({**bench_backend(cfg, backend, split, dist, args, out), **env})
            print(f"{backend}: {row['step_ms_median']:.1f} ms per step", flush=True)
        except Exception as exc:  # one backend failing must not lose the others' rows
            log.exception("backend %s failed", backend)
            writer.add({"config": args.config_name, "backend": backend, "error": f"{type(exc).__name__}: {exc}",
                        **env})
    rows = writer.rows
    if not any("error" not in row for row in rows):
        raise SystemExit(f"every backend failed: {'; '.join(row['error'] for row in rows)}")
    measured = [row for row in rows if "error" not in row]
    add_speedups(measured, "step_ms_median")
    paths = writer.finish()
    try:
        plot(measured, out / "bench.png")
    except ImportError as exc:   # a bare GPU machine may lack matplotlib; the tables are the record
        log.warning("no bench.png: %s", exc)
    print(paths["md"].read_text(), end="")
    return rows


if __name__ == "__main__":
    main()
