"""Registers, stack (spills) and shared memory of the trajectory kernels for each candidate tiling,
compiled ahead of time for an NVIDIA target without a GPU.

    TRITON_INTERPRET=0 python -m adarec.profiling.trajectory_tiling --arch 90 --dim 256 --dtype bf16 \
        --out results/bench/aot_sm90

A thread that needs more than the register file gives it (255 on sm_90) keeps the rest on its
stack in local memory: STACK > 0 in `cuobjdump -res-usage` is the spill the device check's
ahead-of-time compile flagged for bf16 at D = 256. The tiling is the rows per program (R), the
hidden chunk (BH) and the warps per program (more warps: the same tile over more threads, fewer
registers each). Each kernel of each tiling is compiled for the RNG path with row keys (what
training launches); the table gives REG, STACK and SHARED per kernel and tiling, and which tiling
kernels/trajectory.py `_config` picks. What a CPU compile cannot say is the speed: the GPU
decides between the spill-free tilings (profiling/bench_trajectory.py, the device check).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
from pathlib import Path

INT32_POINTERS = {"row_user_ptr", "row_pos_ptr", "num_rows_ptr", "depth_ptr", "offsets_ptr"}
FP32_POINTERS = {"sqrt_abar_ptr", "sqrt_1m_abar_ptr", "loss_part_ptr", "loss_coef_ptr", "deps_hat_ptr", "loss_w_ptr"}
KERNELS = ("_trajectory_fwd_kernel", "_trajectory_bwd_rows_kernel", "_trajectory_bwd_weights_kernel")
# (R, BH, num_warps): the current choice first, then smaller rows or chunks and more warps.
CANDIDATES = ((16, 32, 4), (16, 32, 8), (16, 16, 4), (16, 16, 8), (8, 32, 4), (32, 32, 8), (16, 64, 8))


def trajectory_signature(fn, dtype: str, constants: dict) -> dict:
    """The argument types of a trajectory kernel launched on `dtype` (bf16/fp32) tensors."""
    import adarec.kernels.trajectory as trajectory

    types = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in constants:
            types[name] = "constexpr"
        elif name in INT32_POINTERS:
            types[name] = "*i32"
        elif name in ("seed_ptr", "keys_ptr"):
            types[name] = "*i64"
        elif name in FP32_POINTERS or name.endswith("_part_ptr") or (fn is trajectory._noise_kernel
                                                                       and name == "noise_ptr"):
            types[name] = "*fp32"
        elif name.endswith("_ptr"):
            types[name] = "*" + dtype
        else:
            types[name] = "i32"
    return types


def kernel_record(kernel: str, dtype: str, dim: int, rows: int, block_h: int, num_warps: int,
                  has_keys: bool = True, splits: int = 8) -> dict:
    """A launch record (profiling/launch_recorder.py format) of one trajectory kernel and tiling."""
    import adarec.kernels.trajectory as trajectory
    import triton

    fn = getattr(trajectory, kernel)
    consts = {"R": rows, "BD": max(16, triton.next_power_of_2(dim)), "BH": block_h, "NOISE_MODE": 0,
              "PRECISION": "ieee" if dtype == "fp32" else None, "UPCAST": False, "HAS_KEYS": has_keys}
    if kernel == "_trajectory_bwd_weights_kernel":
        consts.update(LEVELS=16, SPLITS=splits)
    return {"module": trajectory.__name__, "kernel": kernel, "signature": trajectory_signature(fn, dtype, consts),
            "constexprs": consts, "attrs": {}, "options": {"num_warps": num_warps}}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--candidates", default=None, help="R,BH,warps;R,BH,warps;... (default: CANDIDATES)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: this compiles for the GPU target")
    import tempfile

    import torch

    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="adarec-tiling-cache-")   # times without cache hits
    import adarec.kernels.trajectory as trajectory
    from adarec.profiling.aot_compile import compile_record

    candidates = (tuple(tuple(int(x) for x in c.split(",")) for c in args.candidates.split(";"))
                  if args.candidates else CANDIDATES)
    picked = trajectory._config(args.dim, 4 * args.dim, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    rows = []
    for r, bh, warps in candidates:
        for kernel in KERNELS:
            record = kernel_record(kernel, args.dtype, args.dim, r, bh, warps)
            try:
                result = compile_record(record, args.arch)
            except Exception as exc:  # e.g. out of shared memory: a row saying so
                result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]}
            current = (r, bh, warps) == (picked["R"], picked["BH"], picked.get("num_warps", 4))
            row = {"dtype": args.dtype, "D": args.dim, "R": r, "BH": bh, "num_warps": warps,
                   "kernel": kernel.strip("_").replace("trajectory_", "").replace("_kernel", ""),
                   "picked": current, **result}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"tiling_{args.dtype}_D{args.dim}.json").write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
