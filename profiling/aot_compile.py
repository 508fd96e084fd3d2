"""Compile, ahead of time and without a GPU, every Triton specialisation each step of the device
check (profiling/gpu_check.sh) launches; report the count and the compile time per step, and
each kernel's registers and stack, so the check's per-step timeouts come from measurement.

    python -m adarec.profiling.aot_compile --arch 90 --out results/bench/aot_sm90
    python -m adarec.profiling.aot_compile --arch 90 --steps bench_adarec kernels_fast

Two phases:
1. record: each step's workload runs on the CPU through Triton's interpreter in a subprocess
   (TRITON_INTERPRET=1), with profiling/launch_recorder.py noting the compile key of every
   launch (signature, constexprs, divisibility attributes, launch options). The workloads are
   the steps' own commands at small sizes (few users, one or two steps: the kernels' keys depend
   on dtypes, widths and block sizes, not on the batch count) or, for the pytest steps, the GPU
   tests' kernel calls replayed on the CPU with the same shapes and dtypes (RECORDERS below);
2. compile: every distinct key is compiled for the target (triton.compile with
   GPUTarget("cuda", arch, 32)), timed, and its cubin read by cuobjdump for registers, stack
   and spills. On the GPU machine Triton's cache is shared by the check's steps, so a key
   compiles in the first step that launches it: a step's count is its keys no earlier step had.

Writes <out>/launches.json (every key, the steps that launch it, compile seconds, registers,
stack), <out>/steps.md and steps.json (per step: launches, keys, new keys, compile seconds) and
prints the step table. Differences to keep in mind: the compiler here is this machine's Triton
(the GPU machine's may be older), CPU autocast casts a few ops differently from CUDA autocast,
and the driver's launcher stub (a small C build per new signature on some Triton versions) is
not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The check's steps that launch Triton kernels, in the check's order (profiling/gpu_check.sh).
# Steps not listed launch none (environment, install, bench_fusion: the C++/CUDA op).
STEPS = ("kernels_fast", "bench_adarec", "bench_adarec_dual", "gpu_tests", "bench_trajectory", "bench_catalog",
         "catalog_1m", "deepspeed_bf16", "zero_bf16", "bench_peers", "convergence")


# ---------------------------------------------------------------------------------- workloads
# Each runs in the recording subprocess (interpreter on, CPU). Imports stay inside: the kernel
# modules must be imported after TRITON_INTERPRET is set.

def _tests(name: str):
    sys.path.insert(0, str(REPO / "tests"))
    import importlib

    return importlib.import_module(name)


def _trajectory_gpu_tests(dims=(64, 128, 256), convergence: bool = False) -> None:
    """tests/test_trajectory_kernel.py's GPU tests: bf16 at D 64/128/256 against fp32, the fp32
    RNG path at D=128 (and the fused training curve)."""
    t = _tests("test_trajectory_kernel")
    for dim in dims:
        shape = {"lengths": [1, 50, 13, 7], "depths": [0, 8, 3, 5], "length": 50, "dim": dim, "width": 4 * dim,
                 "max_depth": 8}
        half = t.make_problem(**shape, dtype=t.torch.bfloat16)
        t.run(t.fused_diffusion_trajectory, half, noise=half["noise"])
    problem = t.make_problem(lengths=[5, 50], depths=[8, 3], length=50, dim=128, width=512, max_depth=8)
    t.run(t.fused_diffusion_trajectory, problem, seed=5)
    if convergence:
        t.train_losses("fused", 2)


def _linear_ce_gpu_tests(shapes=((2048, 12101, 64), (333, 5000, 50), (64, 100_000, 128))) -> None:
    """tests/test_linear_ce.py's GPU test: the Triton CE kernels in bf16 at its three shapes
    (rows cut to 64: the rows count is not a compile key beyond its divisibility, kept)."""
    t = _tests("test_linear_ce")
    import torch

    for rows, items, width in shapes:
        rows = 64 if rows % 16 == 0 else 33
        t._run(t._fused(), *t._inputs(rows, items, width, dtype=torch.bfloat16))


def _other_gpu_tests() -> None:
    """The GPU tests outside the fast subset: opcheck of the trajectory op (fp32, bf16), the
    Triton noise at extreme words, captured training steps (adarec, adarec-dual)."""
    _trajectory_gpu_tests(dims=(64, 128), convergence=True)
    _linear_ce_gpu_tests(shapes=((333, 5000, 50),))
    t = _tests("test_draw_extremes")
    t.test_triton_box_muller_matches_the_cpu_and_is_finite_at_extreme_words("cpu")
    for config in ("adarec_beauty", "adarec-dual_beauty"):
        _model_steps(config, "fp32")          # the graph-capture test: fp32, fused


def _model_steps(config: str, weights: str = "bf16", autocast: bool = False, overrides: tuple = (),
                 steps: int = 1) -> None:
    """What a training run of `config` launches on a GPU: `steps` training steps (forward and
    backward of every member, batches from the run's sampler with the GPU's 512-row target
    buckets) and the scoring of a validation batch, on a few users.

    weights="bf16" is DeepSpeed's bf16 engine (the module cast to bf16: the bench's eager and
    fused backends, bf16_mode=deepspeed, ZeRO); weights="fp32" with autocast is bf16_mode=autocast
    (the bench's autocast and graphs backends, the default on one GPU; graphs replay the same
    kernels). CPU autocast stands in for CUDA autocast."""
    import contextlib

    import torch
    from adarec.engine.data_setup import load_split

    from adarec.config import load_config
    from adarec.data import TrainBatchSampler
    from adarec.models import build_members, scorer

    cfg = load_config(REPO / f"configs/{config}.yaml", ["model.kmeans_init=false", "data.max_users=64", *overrides])
    split = load_split(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    members = build_members(cfg.model, split.num_items, split.max_len, "fused")
    trims = all(getattr(net, "trims_batches", True) for net in members.values())
    sampler = TrainBatchSampler(split, 16, seed=0, with_views=any(n.needs_views for n in members.values()),
                                group_by_length=trims, width_buckets=cfg.data.width_buckets if trims else None,
                                target_bucket=512)
    dtype = torch.bfloat16 if weights == "bf16" else torch.float32
    for net in members.values():
        net.to(dtype).train()
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    for _, batch in zip(range(steps), sampler.epoch(0), strict=False):
        for net in members.values():
            with cast:
                loss, _ = net(batch)
            loss.backward()
    for net in members.values():
        net.eval()
    with torch.no_grad(), cast:
        scorer(members).score(split.valid_input[:16])


def _bench_trajectory() -> None:
    from adarec.profiling import bench_trajectory

    with tempfile.TemporaryDirectory() as out:
        bench_trajectory.main(["--batch", "4", "--warmup", "0", "--repeats", "1", "--backends", "fused",
                               "--device", "cpu", "--out", out])


def _bench_catalog() -> None:
    """The Triton CE at the check's catalog sizes in bf16 (rows cut down: not a compile key)."""
    _linear_ce_gpu_tests(shapes=((64, 12101, 64), (64, 100_000, 64), (64, 1_000_000, 64)))


def _smoke() -> None:
    """A few launches at tiny sizes (the test of this tool): the fp32 trajectory and the CE."""
    import torch
    from adarec.kernels.linear_ce import fused_linear_cross_entropy

    t = _tests("test_trajectory_kernel")
    problem = t.make_problem(lengths=[3, 1], depths=[2, 1], length=4, dim=16, width=32, max_depth=2)
    t.run(t.fused_diffusion_trajectory, problem, noise=problem["noise"])
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(5, 16, generator=g), torch.randn(40, 16, generator=g)
    fused_linear_cross_entropy(hidden, weight, torch.tensor([1, 2, 0, 39, 7]))


# Each step's workload as calls (function name, arguments); a call already recorded for an
# earlier step is not run again (its records are read back), as the GPU's cache would not
# compile its keys again either.
RECORDERS = {
    "smoke": [("_smoke",)],
    "kernels_fast": [("_trajectory_gpu_tests", (256,)), ("_linear_ce_gpu_tests", ((2048, 12101, 64),))],
    "bench_adarec": [("_model_steps", "adarec_beauty", "bf16", False), ("_model_steps", "adarec_beauty", "fp32", True)],
    "bench_adarec_dual": [("_model_steps", "adarec-dual_beauty", "bf16", False),
                          ("_model_steps", "adarec-dual_beauty", "fp32", True)],
    "gpu_tests": [("_other_gpu_tests",)],
    "bench_trajectory": [("_bench_trajectory",)],
    "bench_catalog": [("_linear_ce_gpu_tests", ((64, 12101, 64), (64, 100_000, 64), (64, 1_000_000, 64)))],
    # sasrec_synthetic1m trains with bf16 autocast and the fused CE at the 1M-item catalog.
    "catalog_1m": [("_linear_ce_gpu_tests", ((64, 1_000_000, 64),))],
    "deepspeed_bf16": [("_model_steps", "adarec_beauty", "bf16", False)],
    "zero_bf16": [("_model_steps", "adarec_beauty", "bf16", False)],
    "bench_peers": [],                    # the peers' reverse processes are eager PyTorch
    "convergence": [("_model_steps", "adarec_beauty_sparse5", "fp32", True)],
}


def _run_call(call: tuple) -> None:
    name, *args = call
    fn = globals()[name]
    if name == "_trajectory_gpu_tests":
        fn(dims=args[0])
    elif name == "_linear_ce_gpu_tests":
        fn(shapes=args[0])
    elif name == "_model_steps":
        fn(args[0], args[1], autocast=args[2])
    else:
        fn(*args)


def record_step(step: str, out_file: Path) -> None:
    """Run one step's workload through the interpreter and write its launch records (JSON).
    Each call's records are also kept beside out_file, for the later steps that make it."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "the recording process needs TRITON_INTERPRET=1"
    import hashlib

    import torch
    from adarec.profiling.launch_recorder import LaunchRecorder

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    recorder = LaunchRecorder().install()
    started = time.perf_counter()
    records = []
    for call in RECORDERS[step]:
        saved = out_file.parent / f"call_{hashlib.sha1(repr(call).encode()).hexdigest()[:16]}.json"
        if saved.exists():
            records += json.loads(saved.read_text())
            continue
        recorder.reset()
        _run_call(call)
        saved.write_text(json.dumps(recorder.records))
        records += recorder.records
    merged = LaunchRecorder()
    for record in records:
        merged.add(record, record.get("launches", 1))
    out_file.write_text(json.dumps({"step": step, "record_seconds": time.perf_counter() - started,
                                    "records": merged.records}, indent=1))


def record(steps: list[str], work: Path) -> dict[str, dict]:
    """Each step's records, from a subprocess per step (a fresh interpreter, as each check step)."""
    results = {}
    for step in steps:
        out_file = work / f"record_{step}.json"
        env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
        proc = subprocess.run([sys.executable, "-m", "adarec.profiling.aot_compile", "--record-step", step,
                               "--record-out", str(out_file)], env=env, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise SystemExit(f"recording step {step} failed (exit {proc.returncode}):\n{tail}")
        results[step] = json.loads(out_file.read_text())
        print(f"recorded {step}: {len(results[step]['records'])} kernel keys in "
              f"{results[step]['record_seconds']:.0f} s", flush=True)
    return results


# ---------------------------------------------------------------------------------- compiling

def _resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED and LOCAL of the kernel in a cubin, read by the cuobjdump Triton ships."""
    import triton

    tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    usage = {}
    for line in out.splitlines():
        if "REG:" in line:
            for field in line.split():
                name, _, value = field.partition(":")
                if name in ("REG", "STACK", "SHARED", "LOCAL") and value.isdigit():
                    usage[name.lower()] = int(value)
    return usage


def compile_record(record: dict, arch: int) -> dict:
    """triton.compile of one recorded key for sm_<arch>: seconds, shared memory, registers, stack."""
    import importlib
    import inspect

    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    if str(REPO / "tests") not in sys.path:      # kernels defined by the GPU tests themselves
        sys.path.append(str(REPO / "tests"))
    fn = getattr(importlib.import_module(record["module"]), record["kernel"])
    params = list(inspect.signature(fn.fn).parameters)
    constexprs = {(params.index(k),): v for k, v in record["constexprs"].items()}
    attrs = {(params.index(k),): BaseBackend.parse_attr(v) for k, v in record["attrs"].items()}
    src = ASTSource(fn, record["signature"], constexprs=constexprs, attrs=attrs)
    started = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(record["options"]))
    seconds = time.perf_counter() - started
    return {"compile_s": round(seconds, 3), "shared": compiled.metadata.shared,
            "num_warps": compiled.metadata.num_warps, **_resource_usage(compiled.asm["cubin"])}


def short_name(record: dict) -> str:
    dtypes = sorted({v[1:] for v in record["signature"].values() if v.startswith("*") and v[1:] in
                     ("bf16", "fp16", "fp32")} - {"fp32"}) or ["fp32"]
    keys = ",".join(f"{k}={v}" for k, v in sorted(record["constexprs"].items()) if v is not None)
    return f"{record['kernel']}[{'/'.join(dtypes)}; {keys}]"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for an H100")
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=[*STEPS, "smoke"],
                        help="steps to record (smoke: a few tiny launches, to test this tool)")
    parser.add_argument("--out", default=None, help="results folder (default results/bench/aot_sm<arch>)")
    parser.add_argument("--record-only", action="store_true", help="list the keys, compile nothing")
    parser.add_argument("--work", default=None,
                        help="folder for the per-step and per-call records (default: a temporary one); "
                             "records of calls already there are reused")
    parser.add_argument("--record-step", choices=[*STEPS, "smoke"], help=argparse.SUPPRESS)   # internal
    parser.add_argument("--record-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.record_step:
        record_step(args.record_step, Path(args.record_out))
        return []
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the compile phase needs Triton's compiler")
    # A fresh Triton cache: a key compiled before on this machine would otherwise be timed as a
    # cache hit (the GPU machine starts with an empty one).
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="adarec-aot-cache-")
    out = Path(args.out or REPO / f"results/bench/aot_sm{args.arch}")
    out.mkdir(parents=True, exist_ok=True)
    steps = [s for s in (*STEPS, "smoke") if s in args.steps]
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        recorded = record(steps, Path(args.work))
    else:
        with tempfile.TemporaryDirectory() as work:
            recorded = record(steps, Path(work))

    from adarec.profiling.launch_recorder import record_key

    keys: dict[str, dict] = {}
    step_rows = []
    for step in steps:
        records = recorded[step]["records"]
        new = [r for r in records if record_key(r) not in keys]
        for r in records:
            entry = keys.setdefault(record_key(r), {**{k: v for k, v in r.items() if k != "launches"}, "steps": []})
            entry["steps"].append(step)
        compile_s = 0.0
        if not args.record_only:
            for r in new:
                entry = keys[record_key(r)]
                try:
                    entry.update(compile_record(r, args.arch))
                except Exception as exc:  # report every key, then fail
                    cause = exc
                    while cause.__cause__ is not None:
                        cause = cause.__cause__
                    entry["error"] = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
                compile_s += entry.get("compile_s", 0.0)
                print(f"  {step}: {short_name(r)} {entry.get('compile_s', 'FAILED')} s "
                      f"reg {entry.get('reg')} stack {entry.get('stack')} {entry.get('error', '')}", flush=True)
        step_rows.append({"step": step, "launches": sum(r["launches"] for r in records), "keys": len(records),
                          "new_keys": len(new), "compile_s": round(compile_s, 1),
                          "record_s": round(recorded[step]["record_seconds"], 1)})
    failures = [k for k in keys.values() if "error" in k]
    (out / "launches.json").write_text(json.dumps(list(keys.values()), indent=1) + "\n")
    (out / "steps.json").write_text(json.dumps({"arch": args.arch, "steps": step_rows,
                                                 "total_keys": len(keys), "failures": len(failures)}, indent=1) + "\n")
    lines = ["| step | launches | kernel keys | new keys (compiled here) | compile s |", "|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['launches']} | {r['keys']} | {r['new_keys']} | {r['compile_s']} |"
              for r in step_rows]
    lines.append(f"| total | | {len(keys)} distinct | | {sum(r['compile_s'] for r in step_rows):.1f} |")
    (out / "steps.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if failures:
        raise SystemExit(f"{len(failures)} kernel keys failed to compile for sm_{args.arch}")
    return step_rows


if __name__ == "__main__":
    main()
