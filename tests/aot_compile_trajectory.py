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
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

INT32_POINTERS = {"row_user_ptr", "row_pos_ptr", "num_rows_ptr", "depth_ptr", "offsets_ptr"}
FP32_POINTERS = {"sqrt_abar_ptr", "sqrt_1m_abar_ptr", "loss_part_ptr", "loss_coef_ptr", "deps_hat_ptr", "loss_w_ptr"}


def signature(fn, dtype: str, constants: dict) -> dict:
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
                compiled = triton.compile(src, target=target)
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
