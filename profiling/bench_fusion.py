"""Native (C++/CUDA) vs eager gated expert fusion, forward + backward, at Beauty shapes.

    python -m adarec.profiling.bench_fusion --out results/bench/fusion

Packed layout of B users with depths uniform in 0..T_max (P = sum (T_u + 1) pairs), fine- and
coarse-expert outputs [P, L, D], router weights and straight-through masks [P, L] (the
per-position contract of docs/method.md 2.3). One call = forward, a random linear functional of
(h, z_coar), backward to every input.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from adarec.profiling.timing import RowWriter, add_speedups, environment, peak_memory_mib, summarize, time_callable

from adarec.fusion import gated_fusion as eager_gated_fusion

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


def packed_inputs(args, device: torch.device) -> dict:
    rng = np.random.default_rng(args.seed)
    counts = torch.from_numpy(rng.integers(0, args.max_depth + 1, size=args.batch) + 1)
    pairs = int(counts.sum())
    g = torch.Generator().manual_seed(args.seed)
    dtype = DTYPES[args.dtype]

    def leaf(*shape, scale=1.0, shift=0.0):
        return (shift + scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype).requires_grad_()

    return {
        "fin": leaf(pairs, args.max_len, args.dim), "coar": leaf(pairs, args.max_len, args.dim),
        "g": torch.rand(pairs, args.max_len, generator=g).to(device=device, dtype=dtype).requires_grad_(),
        "m": leaf(pairs, args.max_len, scale=0.0, shift=1.0), "offsets": F.pad(counts.cumsum(0), (1, 0)).to(device),
        "w_gate": leaf(args.dim, args.dim, scale=args.dim**-0.5), "b_gate": leaf(args.dim, scale=0.02),
    }


def step_fn(fn, inputs: dict, probe_h: torch.Tensor, probe_z: torch.Tensor):
    leaves = [v for v in inputs.values() if v.requires_grad]

    def step():
        for leaf in leaves:
            leaf.grad = None
        h, z = fn(**inputs)
        ((h * probe_h).sum() + (z * probe_z).sum()).backward()

    return step


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--max-depth", type=int, default=8)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--backends", nargs="+", default=["eager", "native"], choices=["eager", "native"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench/fusion")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    inputs = packed_inputs(args, device)
    g = torch.Generator().manual_seed(1)
    probe_h = torch.randn(args.batch, args.max_len, args.dim, generator=g).to(device=device, dtype=DTYPES[args.dtype])
    probe_z = torch.randn(args.batch, args.max_len, args.dim, generator=g).to(device=device, dtype=DTYPES[args.dtype])
    impls = {"eager": eager_gated_fusion}
    if "native" in args.backends:
        from adarec import ops

        impls["native"] = ops.gated_fusion
    shape = {"B": args.batch, "L": args.max_len, "D": args.dim, "T_max": args.max_depth,
             "pairs": inputs["m"].shape[0], "dtype": args.dtype}
    env = environment(device)
    writer = RowWriter(args.out, f"fusion_{args.dtype}_D{args.dim}_{device.type}")
    for name in args.backends:
        step = step_fn(impls[name], inputs, probe_h, probe_z)
        timing = summarize(time_callable(step, device, args.warmup, args.repeats))
        writer.add({"op": "gated fusion fwd+bwd", "backend": name, **shape, **timing,
                    "peak_mem_mib": peak_memory_mib(step, device), **env})
        print(f"{name}: {timing['median_ms']:.3f} ms", flush=True)
    rows = writer.rows
    add_speedups(rows, "median_ms")
    paths = writer.finish()
    print(paths["md"].read_text(), end="")
    return rows


if __name__ == "__main__":
    main()
