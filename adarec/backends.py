"""Choosing between a fused op and its eager twin (`kernels.backend`, env ADAREC_KERNELS).

auto   the fused op where it can run and has been verified, else the eager twin. The native gated
       fusion's C++ CPU path is verified by the CPU test suite. The GPU paths (the Triton
       trajectory compiled for CUDA, the CUDA gated fusion) stay opt-in (`fused`) until a GPU run
       of the device check (profiling/gpu_check.sh) has passed them: then GPU_PATHS_VERIFIED
       becomes True. A fallback that costs speed is logged once.
fused  the fused op, or a clear error saying why it cannot run here. On CPU the Triton kernels
       run only under TRITON_INTERPRET=1 (tests).
eager  the reference PyTorch functions in adarec/diffusion.py and adarec/fusion.py.

The linear cross-entropy (adarec/linear_ce.py) has four implementations: eager (full logits),
kept-softmax (full logits, fewer passes over them), chunked (PyTorch, bounded memory) and fused
(Triton). auto takes the Triton one on CUDA once a GPU run has verified it
(LINEAR_CE_GPU_VERIFIED), else the chunked one when the catalog is larger than
kernels.ce_item_chunk, else, on a CPU, the kept-softmax one and on CUDA the eager one.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from collections.abc import Callable

import torch

from adarec.diffusion import diffusion_trajectory
from adarec.errors import BackendError, UnknownBackend
from adarec.fusion import gated_fusion
from adarec.linear_ce import (
    FUSED_MAX_WIDTH,
    chunked_linear_cross_entropy,
    kept_softmax_linear_cross_entropy,
    linear_cross_entropy,
)

BACKENDS = ("auto", "fused", "eager")
ENV_VAR = "ADAREC_KERNELS"
# No GPU run of the device check has passed the compiled Triton trajectory and the CUDA gated
# fusion yet (README, "Fused kernels"): `auto` keeps the eager twins on CUDA until one has.
GPU_PATHS_VERIFIED = False
# Likewise for the Triton linear cross-entropy (kernels/linear_ce.py), a later addition.
LINEAR_CE_GPU_VERIFIED = False
_UNVERIFIED = ("kernels.backend=auto: using the eager {op} on CUDA; the fused GPU kernels are opt-in "
               "(kernels.backend=fused) until a GPU run of the device check has passed them")
log = logging.getLogger(__name__)


def resolve_backend(configured: str = "auto") -> str:
    """The backend in force: ADAREC_KERNELS when set, else the configured value."""
    name = os.environ.get(ENV_VAR, "").strip().lower() or configured
    if name not in BACKENDS:
        source = ENV_VAR if os.environ.get(ENV_VAR, "").strip() else "kernels.backend"
        raise UnknownBackend(f"{source} must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def check_backend_runs_here(configured: str, device: torch.device) -> str:
    """The backend in force, checked before a run starts: an unknown name, or `fused` where the
    Triton kernels cannot run (a CPU without the interpreter), is a one-line BackendError here
    rather than an error at the first step. Every model has a Triton op on its fused path (the
    trajectory, or the linear cross-entropy of a CE loss), so `fused` means a CUDA device."""
    backend = resolve_backend(configured)
    if backend == "fused" and device.type != "cuda" and not _interpreter_on():
        source = ENV_VAR if os.environ.get(ENV_VAR, "").strip() else "kernels.backend"
        raise BackendError(f"{source}=fused runs the Triton kernels, which need a CUDA device (this run is on "
                           f"{device.type}; TRITON_INTERPRET=1 runs them slowly on a CPU, for tests); use "
                           "kernels.backend=auto, which takes the fused ops that can run here")
    return backend


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _load_triton(module: str, attr: str) -> Callable | str:
    """A Triton op from its module, or the reason it cannot be imported."""
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception as exc:  # triton missing or broken: report, do not crash an auto run
        return f"{type(exc).__name__}: {exc}"


def _triton_op(backend: str, device: torch.device, what: str, module: str, attr: str) -> Callable | str | None:
    """The Triton op `what` for tensors on ``device``: the function, the reason it cannot be
    loaded, or None where it cannot run (a CPU without the interpreter). With backend fused
    anything but the function is a clear error."""
    runnable_here = device.type == "cuda" or _interpreter_on()
    fused = _load_triton(module, attr) if runnable_here else None
    if backend == "fused":
        if not runnable_here:
            raise BackendError(f"kernels.backend=fused: the Triton {what} needs CUDA tensors (got {device}); "
                               "on CPU it runs only under TRITON_INTERPRET=1")
        if isinstance(fused, str):
            raise BackendError(f"kernels.backend=fused: the Triton {what} cannot be loaded ({fused})")
    return fused


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def trajectory_function(backend: str, device: torch.device) -> Callable:
    """The diffusion-trajectory implementation to use for tensors on ``device``."""
    backend = resolve_backend(backend)
    if backend == "eager":
        return diffusion_trajectory
    fused = _triton_op(backend, device, "trajectory", "adarec.kernels.trajectory", "fused_diffusion_trajectory")
    if backend == "fused":
        return fused
    if device.type != "cuda":
        return diffusion_trajectory
    if not GPU_PATHS_VERIFIED:
        _warn_once(_UNVERIFIED.format(op="trajectory"))
        return diffusion_trajectory
    if isinstance(fused, str):
        _warn_once(f"kernels.backend=auto: using the eager trajectory, the fused one cannot be loaded ({fused})")
        return diffusion_trajectory
    return fused


def _native_fusion_problem(device: torch.device) -> str | None:
    from adarec import ops

    try:
        ops.load_native()
    except ops.NativeOpUnavailable as exc:
        return str(exc)
    if not ops.native_supports(device):
        return f"the native library has no {device.type.upper()} kernel (a CPU-only build)"
    return None


def fusion_function(backend: str, device: torch.device) -> Callable:
    """The gated-fusion implementation to use for tensors on ``device``."""
    backend = resolve_backend(backend)
    if backend == "eager":
        return gated_fusion
    from adarec import ops

    if backend == "auto" and device.type == "cuda" and not GPU_PATHS_VERIFIED:
        _warn_once(_UNVERIFIED.format(op="gated fusion"))
        return gated_fusion
    problem = _native_fusion_problem(device)
    if problem is None:
        return ops.gated_fusion
    if backend == "fused":
        raise BackendError(f"kernels.backend=fused: the native gated fusion cannot run here: {problem}")
    _warn_once(f"kernels.backend=auto: using the eager gated fusion ({problem})")
    return gated_fusion


def linear_ce_function(backend: str, device: torch.device, num_items: int, item_chunk: int,
                       width: int = 0) -> Callable:
    """The linear cross-entropy implementation for a [num_items, width] table on ``device``
    (module docstring); every one takes (hidden, weight, target, ignore_index, reduction, item_chunk)."""
    backend = resolve_backend(backend)
    if backend == "eager":
        return linear_cross_entropy
    fused = _triton_op(backend, device, "linear cross-entropy", "adarec.kernels.linear_ce",
                       "fused_linear_cross_entropy")
    if backend == "fused":
        return fused
    if device.type == "cuda" and LINEAR_CE_GPU_VERIFIED and not isinstance(fused, str) and width <= FUSED_MAX_WIDTH:
        return fused
    if device.type == "cuda" and not LINEAR_CE_GPU_VERIFIED:
        _warn_once(_UNVERIFIED.format(op="linear cross-entropy (chunked PyTorch above kernels.ce_item_chunk)"))
    if num_items > item_chunk:
        return chunked_linear_cross_entropy
    # On a CPU the logits' memory passes cost as much as the products (docs/method.md, "Trimmed
    # batches"); on CUDA the eager one until the kept-softmax one has been timed there.
    return kept_softmax_linear_cross_entropy if device.type == "cpu" else linear_cross_entropy
