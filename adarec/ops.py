"""Native operators from csrc/: the gated expert fusion, as `adarec.ops.gated_fusion`.

Same signature and results as the eager twin `adarec.fusion.gated_fusion`. The operator pair
`torch.ops.adarec.gated_fusion_forward` / `gated_fusion_backward` is defined once in C++ with a
CPU and a CUDA implementation. This module adds what torch.library needs on top, once the
library is loaded: a fake (meta) implementation of each op, which gives output shapes and
dtypes without running a kernel, and an autograd formula on the forward op that calls the
backward op. With these, the ops are registered custom ops that `torch.compile` traces through
as single graph nodes (no graph break) and that pass `torch.library.opcheck`.

Loading: the install (`pip install --no-build-isolation -e .`) builds `adarec._C`. Where it was
not built (ADAREC_NO_EXT=1, or a wheel built without torch), `load_native(jit=True)`, or the
environment variable ADAREC_JIT=1, compiles csrc/ at run time with
`torch.utils.cpp_extension.load` (needs a compiler and the source checkout).
"""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"
_OP_NAMES = ("gated_fusion_forward", "gated_fusion_backward")
FORWARD_OP = "adarec::gated_fusion_forward"
BACKWARD_OP = "adarec::gated_fusion_backward"


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
    jit=None follows the environment variable ADAREC_JIT.

    On success the Python parts of the ops (fake implementations, autograd) are registered too;
    that happens once per process, however often this is called."""
    if jit is None:
        jit = os.environ.get("ADAREC_JIT", "0") not in ("", "0")
    reason = _load(bool(jit))
    if reason is not None:
        raise NativeOpUnavailable(reason)
    _register_python_impls()


def native_supports(device: torch.device) -> bool:
    """Whether the loaded library has an implementation for this device type."""
    key = "CUDA" if device.type == "cuda" else "CPU"
    return torch._C._dispatch_has_kernel_for_dispatch_key(FORWARD_OP, key)


# ----------------------------------------------------------------------------- fake implementations


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The C++ `accumulate_type`: the dtype of the saved denominators (and internal sums)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward_fake(fin, coar, g, m, offsets, w_gate, b_gate):
    """Outputs of gated_fusion_forward without computing them: h, z_coar, z_fin and gate are
    [B, L, D] in fin's dtype, den_fin and den_coar [B, L] in the accumulation dtype, B being
    offsets.numel() - 1 (a shape, so no data is read). All are new contiguous tensors."""
    torch._check(fin.dim() == 3, lambda: f"gated_fusion: fin must be [P, L, D], got {tuple(fin.shape)}")
    torch._check(offsets.dim() == 1 and offsets.shape[0] >= 1,
                 lambda: f"gated_fusion: offsets must be [B + 1], got {tuple(offsets.shape)}")
    users, length, dim = offsets.shape[0] - 1, fin.shape[1], fin.shape[2]
    per_position = [fin.new_empty((users, length, dim)) for _ in range(4)]
    den = [fin.new_empty((users, length), dtype=_accumulate_dtype(fin.dtype)) for _ in range(2)]
    return (*per_position, *den)


def _backward_fake(grad_h, grad_z_coar, fin, coar, g, m, offsets, w_gate, z_fin, z_coar, gate, den_fin, den_coar):
    """Outputs of gated_fusion_backward: one contiguous gradient per differentiable input, with
    that input's shape and dtype (fin, coar, g, m, w_gate, and b_gate [D] in w_gate's dtype)."""
    grads = [t.new_empty(t.shape) for t in (fin, coar, g, m, w_gate)]
    return (*grads, w_gate.new_empty((w_gate.shape[0],)))


# ----------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output) -> None:
    """Saves what gated_fusion_backward reads: the inputs and the forward's intermediates.

    Only h and z_coar are results for the user; z_fin, gate and the denominators are returned
    by the op only to be saved here, so they are marked non-differentiable."""
    fin, coar, g, m, offsets, w_gate, _b_gate = inputs
    _h, z_coar, z_fin, gate, den_fin, den_coar = output
    ctx.save_for_backward(fin, coar, g, m, offsets, w_gate, z_fin, z_coar, gate, den_fin, den_coar)
    ctx.mark_non_differentiable(z_fin, gate, den_fin, den_coar)


def _backward(ctx, grad_h, grad_z_coar, *_grads_of_saved):
    """Gradients of (fin, coar, g, m, offsets, w_gate, b_gate); offsets get none.

    The backward kernel wants contiguous incoming gradients of exactly the outputs' shapes (a
    `.sum()` upstream hands in an expanded, zero-stride one) and both of them, so an output that
    did not reach the loss contributes zeros."""
    fin, coar, g, m, offsets, w_gate, z_fin, z_coar, gate, den_fin, den_coar = ctx.saved_tensors
    grad_h = torch.zeros_like(z_fin) if grad_h is None else grad_h.contiguous()
    grad_z_coar = torch.zeros_like(z_coar) if grad_z_coar is None else grad_z_coar.contiguous()
    d_fin, d_coar, d_g, d_m, d_w, d_b = torch.ops.adarec.gated_fusion_backward(
        grad_h, grad_z_coar, fin, coar, g, m, offsets, w_gate, z_fin, z_coar, gate, den_fin, den_coar)
    return d_fin, d_coar, d_g, d_m, None, d_w, d_b


_REGISTRATION_LOCK = threading.Lock()
_PYTHON_IMPLS_REGISTERED = False


def _register_python_impls() -> None:
    """Registers the fake implementations and the autograd formula, once per process.

    Must run after the C++ library defined the ops (torch.library can only add to an existing
    op); a second registration of a fake impl would raise, hence the guard."""
    global _PYTHON_IMPLS_REGISTERED
    if _PYTHON_IMPLS_REGISTERED:  # the common case, on every call of gated_fusion: no lock taken
        return
    with _REGISTRATION_LOCK:
        if _PYTHON_IMPLS_REGISTERED:
            return
        torch.library.register_fake(FORWARD_OP)(_forward_fake)
        torch.library.register_fake(BACKWARD_OP)(_backward_fake)
        torch.library.register_autograd(FORWARD_OP, _backward, setup_context=_setup_context)
        # Under torch.autocast (train.bf16_mode=autocast) the experts arrive in mixed dtypes;
        # the fusion is a reduction, so it runs in fp32, as autocast runs sums and norms.
        for device_type in ("cpu", "cuda"):
            torch.library.register_autocast(FORWARD_OP, device_type, torch.float32)
        _PYTHON_IMPLS_REGISTERED = True


# ----------------------------------------------------------------------------- public entry point


@torch.compiler.assume_constant_result
def _native_problem(device_type: str) -> str | None:
    """Why the native op cannot run on this device type, or None (then the ops are registered).

    Marked constant for torch.compile: the answer cannot change within a process, and it makes
    the compiler call this once while tracing (loading the library and registering the ops)
    instead of tracing into the loader, which it cannot."""
    try:
        load_native()
    except NativeOpUnavailable as exc:
        return str(exc)
    if not native_supports(torch.device(device_type)):
        return (f"the native gated fusion was built without {device_type.upper()} support "
                "(a CPU-only build: rebuild on a machine with nvcc and a CUDA torch)")
    return None


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
    problem = _native_problem(fin.device.type)
    if problem is not None:
        raise NativeOpUnavailable(problem)
    h, z_coar, *_saved = torch.ops.adarec.gated_fusion_forward(
        fin.contiguous(), coar.contiguous(), g.contiguous(), m.contiguous(), offsets.contiguous(),
        w_gate.contiguous(), b_gate.contiguous())
    return h, z_coar
