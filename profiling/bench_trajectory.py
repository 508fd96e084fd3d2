"""Fused (Triton) vs eager diffusion trajectory, forward + backward, at Beauty shapes.

    python -m adarec.profiling.bench_trajectory --out results/bench/trajectory
    python -m adarec.profiling.bench_trajectory --batch 256 --dim 256 --max-depth 8 --dtype bf16

Inputs: B users drawn from the real training-input length distribution of the dataset
(len(s) - 3, capped at max_len), depths uniform in 0..T_max (what an untrained controller
picks; `--depth` fixes one), E^0 and denoiser weights random. One call = forward, the loss
L_deno plus a random linear functional of Ehat, backward. Reports median / spread of the step
time and the peak memory above the inputs, per backend, with the speed-up over eager.
"""

from __future__ import annotations

import argparse
import contextlib
import os

import numpy as np
import torch
from adarec.profiling.timing import RowWriter, add_speedups, environment, peak_memory_mib, summarize, time_callable

from adarec.data.io import read_sequences
from adarec.diffusion import diffusion_trajectory, level_tables, pack_levels

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def beauty_like_inputs(args, device: torch.device) -> dict:
    rng = np.random.default_rng(args.seed)
    seq_lengths = read_sequences(args.data).lengths()
    lengths = np.clip(seq_lengths - 3, 1, args.max_len)
    lengths = torch.from_numpy(rng.choice(lengths, size=args.batch)).to(device)
    if args.depth is None:
        depths = torch.from_numpy(rng.integers(0, args.max_depth + 1, size=args.batch))
    else:
        depths = torch.full((args.batch,), args.depth)
    packed = pack_levels(depths.to(device))
    g = torch.Generator().manual_seed(args.seed)
    dtype, dim, width = DTYPES[args.dtype], args.dim, args.mult * args.dim
    e0 = torch.randn(args.batch, args.max_len, dim, generator=g)
    e0[torch.arange(args.max_len)[None, :] < (args.max_len - lengths.cpu())[:, None]] = 0.0
    sqrt_abar, sqrt_one_minus = level_tables(args.max_depth)

    def param(*shape, scale):
        return (scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype).requires_grad_()

    return {
        "e0": e0.to(device=device, dtype=dtype).requires_grad_(), "lengths": lengths,
        "pair_user": packed.pair_user, "pair_level": packed.pair_level,
        "sqrt_abar": sqrt_abar.to(device), "sqrt_one_minus_abar": sqrt_one_minus.to(device),
        "w1": param(width, dim, scale=dim**-0.5), "b1": param(width, scale=0.02),
        "step_table": param(args.max_depth + 1, width, scale=0.02), "w2": param(dim, width, scale=width**-0.5),
        "b2": param(dim, scale=0.02),
    }


def step_fn(fn, inputs: dict, grad_probe: torch.Tensor):
    leaves = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]

    def step():
        for leaf in leaves:
            leaf.grad = None
        ehat, loss = fn(**inputs)
        (loss + (ehat * grad_probe).sum()).backward()

    return step


@contextlib.contextmanager
def tiling_override(tiling: str):
    """ADAREC_TRAJECTORY_TILING set to `tiling` ("R,BH,WARPS") for the block; 'default' unsets it."""
    before = os.environ.pop("ADAREC_TRAJECTORY_TILING", None)
    if tiling != "default":
        os.environ["ADAREC_TRAJECTORY_TILING"] = tiling
    try:
        yield
    finally:
        os.environ.pop("ADAREC_TRAJECTORY_TILING", None)
        if before is not None:
            os.environ["ADAREC_TRAJECTORY_TILING"] = before


def backends(device: torch.device, requested: list[str]) -> dict:
    table = {"eager": diffusion_trajectory}
    if "fused" in requested:
        from adarec.kernels.trajectory import fused_diffusion_trajectory

        table["fused"] = fused_diffusion_trajectory
    return {name: table[name] for name in requested}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/Beauty.txt")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--mult", type=int, default=4, help="denoiser width H = mult * D")
    parser.add_argument("--max-depth", type=int, default=8)
    parser.add_argument("--depth", type=int, default=None, help="give every user this depth (default: uniform)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--backends", nargs="+", default=["eager", "fused"], choices=["eager", "fused"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tilings", nargs="+", default=["default"], metavar="R,BH,WARPS",
                        help="fused backend: time each tiling of the kernels (ADAREC_TRAJECTORY_TILING; "
                             "'default' is kernels/trajectory.py's own choice), one row each")
    parser.add_argument("--out", default="results/bench/trajectory")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    inputs = beauty_like_inputs(args, device)
    probe = torch.randn(inputs["pair_user"].numel(), args.max_len, args.dim,
                        generator=torch.Generator().manual_seed(1)).to(device=device, dtype=DTYPES[args.dtype])
    pairs, valid_rows = inputs["pair_user"].numel(), int(inputs["lengths"][inputs["pair_user"]].sum())
    shape = {"B": args.batch, "L": args.max_len, "D": args.dim, "H": args.mult * args.dim,
             "T_max": args.max_depth, "pairs": pairs, "valid_rows": valid_rows, "dtype": args.dtype}
    env = environment(device)
    writer = RowWriter(args.out, f"trajectory_{args.dtype}_D{args.dim}")
    for name, fn in backends(device, args.backends).items():
        for tiling in args.tilings if name == "fused" else ["default"]:
            with tiling_override(tiling):
                step = step_fn(fn, inputs, probe)
                timing = summarize(time_callable(step, device, args.warmup, args.repeats))
                memory = peak_memory_mib(step, device)
            writer.add({"op": "trajectory fwd+bwd", "backend": name, "tiling": tiling, **shape, **timing,
                        "peak_mem_mib": memory, **env})
            print(f"{name} ({tiling}): {timing['median_ms']:.3f} ms", flush=True)
    rows = writer.rows
    add_speedups(rows, "median_ms")
    paths = writer.finish()
    print(paths["md"].read_text(), end="")
    return rows


if __name__ == "__main__":
    main()
