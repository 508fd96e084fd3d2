"""Compile the trajectory kernels for an NVIDIA target without a GPU (Triton's ahead-of-time
path): catches what the interpreter cannot, such as non-constexpr globals, dot shapes and
shared-memory use. Run as a script with TRITON_INTERPRET=0; prints one line per kernel.

    TRITON_INTERPRET=0 python tests/aot_compile_trajectory.py [arch]
"""

import inspect
import sys

import adarec.kernels.trajectory as trajectory
import torch
import triton
from adarec.profiling.trajectory_tiling import trajectory_signature as signature
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_all(arch: int) -> int:
    target = GPUTarget("cuda", arch, 32)
    failures = 0
    # Noise keyed by row keys in one configuration and by batch position in the other: both
    # counter layouts compile, at no extra kernels.
    for dtype, dim, has_keys in (("bf16", 256, True), ("fp32", 64, False)):
        cfg = trajectory._config(dim, 4 * dim, torch.bfloat16 if dtype == "bf16" else torch.float32)
        base = {"R": cfg["R"], "BD": cfg["BD"], "BH": cfg["BH"], "NOISE_MODE": 0, "PRECISION": cfg["PRECISION"],
                "UPCAST": False, "HAS_KEYS": has_keys}
        kernels = [
            (trajectory._trajectory_fwd_kernel, base),
            (trajectory._trajectory_bwd_rows_kernel, base),
            (trajectory._trajectory_bwd_weights_kernel, {**base, "LEVELS": 16, "SPLITS": 4}),
            (trajectory._noise_kernel, {"R": cfg["R"], "BD": cfg["BD"], "MAX_LEVEL": 8, "HAS_KEYS": has_keys}),
        ]
        for fn, constants in kernels:
            params = list(inspect.signature(fn.fn).parameters)
            src = ASTSource(fn, signature(fn, dtype, constants),
                            constexprs={(params.index(k),): v for k, v in constants.items()})
            try:
                compiled = triton.compile(src, target=target, options={"num_warps": cfg["num_warps"]})
                print(f"ok {dtype} D={dim} keys={has_keys} {fn.fn.__name__} shared={compiled.metadata.shared}")
            except Exception as exc:  # report every kernel, then fail
                failures += 1
                cause = exc
                while cause.__cause__ is not None:
                    cause = cause.__cause__
                print(f"FAIL {dtype} D={dim} keys={has_keys} {fn.fn.__name__}: {cause}")
    return failures


if __name__ == "__main__":
    sys.exit(1 if compile_all(int(sys.argv[1]) if len(sys.argv) > 1 else 90) else 0)
