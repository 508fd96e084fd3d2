"""Native operators from csrc/: the gated expert fusion, as `adarec.ops.gated_fusion`.

Same signature and results as the eager twin `adarec.fusion.gated_fusion`. The operator pair
`torch.ops.adarec.gated_fusion_forward` / `gated_fusion_backward` is registered once in C++ with
a CPU and a CUDA implementation; this module wires them into autograd.

Loading: the install (`pip install --no-build-isolation -e .`) builds `adarec._C`. Where it was
not built (ADAREC_NO_EXT=1, or a wheel built without torch), `load_native(jit=True)`, or the
environment variable ADAREC_JIT=1, compiles csrc/ at run time with
`torch.utils.cpp_extension.load` (needs a compiler and the source checkout).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"
_OP_NAMES = ("gated_fusion_forward", "gated_fusion_backward")


class NativeOpUnavailable(RuntimeError):
    """The native operator library could not be loaded; the message says why and what to do."""


def _registered() -> bool:
    return all(hasattr(torch.ops.adarec, name) for name in _OP_NAMES) if hasattr(torch.ops, "adarec") else False


def _jit_build() -> None:
    from torch.utils import cpp_extension

    sources = [CSRC / "gated_fusion.cpp"]
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        sources.append(CSRC / "gated_fusion_cuda.cu")
    missing = [str(s) for s in sources if not s.exists()]
    if missing:
        raise NativeOpUnavailable(f"cannot JIT-build the native operator: sources not found ({', '.join(missing)}); "
                                  "this needs a source checkout of adarec")
    cpp_extension.load(name="adarec_native_ops", sources=[str(s) for s in sources], extra_include_paths=[str(CSRC)],
                       extra_cflags=["-O3"], with_cuda=with_cuda, is_python_module=False, verbose=False)


@functools.cache
def _load(jit: bool) -> str | None:
    """None when the operators are registered, else the reason they are not."""
    if _registered():
        return None
    try:
        import adarec._C  # noqa: F401  (registers torch.ops.adarec.* on import)
    except ImportError as exc:
        reason = f"adarec._C is not built ({exc})"
        if not jit:
            return f"{reason}; reinstall with `pip install --no-build-isolation -e .` or set ADAREC_JIT=1"
        try:
            _jit_build()
        except Exception as build_exc:  # compiler missing, headers mismatch, ...
            return f"{reason}, and the JIT build failed: {build_exc}"
    return None if _registered() else "the native library loaded but registered no adarec operators"


def load_native(jit: bool | None = None) -> None:
    """Make the native operators available or raise NativeOpUnavailable saying why.
    jit=None follows the environment variable ADAREC_JIT."""
    if jit is None:
        jit = os.environ.get("ADAREC_JIT", "0") not in ("", "0")
    reason = _load(bool(jit))
    if reason is not None:
        raise NativeOpUnavailable(reason)


def native_supports(device: torch.device) -> bool:
    """Whether the loaded library has an implementation for this device type."""
    key = "CUDA" if device.type == "cuda" else "CPU"
    return torch._C._dispatch_has_kernel_for_dispatch_key("adarec::gated_fusion_forward", key)


class _GatedFusion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fin, coar, g, m, offsets, w_gate, b_gate):
        h, z_coar, z_fin, gate, den_fin, den_coar = torch.ops.adarec.gated_fusion_forward(
            fin, coar, g, m, offsets, w_gate, b_gate)
        ctx.save_for_backward(fin, coar, g, m, offsets, w_gate, z_fin, z_coar, gate, den_fin, den_coar)
        return h, z_coar

    @staticmethod
    def backward(ctx, grad_h, grad_z_coar):
        fin, coar, g, m, offsets, w_gate, z_fin, z_coar, gate, den_fin, den_coar = ctx.saved_tensors
        d_fin, d_coar, d_g, d_m, d_w, d_b = torch.ops.adarec.gated_fusion_backward(
            grad_h.contiguous(), grad_z_coar.contiguous(), fin, coar, g, m, offsets, w_gate, z_fin, z_coar, gate,
            den_fin, den_coar)
        return d_fin, d_coar, d_g, d_m, None, d_w, d_b


def gated_fusion(
    fin: torch.Tensor,
    coar: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    offsets: torch.Tensor,
    w_gate: torch.Tensor,
    b_gate: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Native twin of `adarec.fusion.gated_fusion`: (h [B, L, D], z_coar [B, L, D]).

    Inputs are made contiguous here; the C++ entry points check device, dtype and shapes and
    name the argument that is wrong.
    """
    load_native()
    if not native_supports(fin.device):
        raise NativeOpUnavailable(f"the native gated fusion was built without {fin.device.type.upper()} support "
                                  "(a CPU-only build: rebuild on a machine with nvcc and a CUDA torch)")
    return _GatedFusion.apply(fin.contiguous(), coar.contiguous(), g.contiguous(), m.contiguous(),
                              offsets.contiguous(), w_gate.contiguous(), b_gate.contiguous())
