"""NVTX ranges around the phases of a training step, for Nsight Systems / Nsight Compute.

Off by default and free when off: `phase(name)` then returns one shared no-op context manager
(no call into NVTX, no allocation). `profiling.nvtx: true` in a run config (or
`--set profiling.nvtx=true`) switches them on for the whole process. The ranges are the `nvtx`
package's annotations, so they also work without a GPU (nothing records them unless a profiler
is attached).

Phase names used by the engine and the models: data, forward, controller, trajectory, experts,
fusion, losses, backward, optimizer_step, evaluation; graph_replay for a step replayed as CUDA
graphs (train.cuda_graphs), whose inner phases the graph does not re-enter.
"""

from __future__ import annotations

import contextlib

_NO_RANGE = contextlib.nullcontext()
_enabled = False
_annotate = None


def enable(on: bool = True) -> None:
    """Turn the ranges on or off for this process."""
    global _enabled, _annotate
    if on and _annotate is None:
        import nvtx

        _annotate = nvtx.annotate
    _enabled = bool(on)


def enabled() -> bool:
    return _enabled


def phase(name: str):
    """A context manager marking one phase of the step (a no-op unless enabled)."""
    if not _enabled:
        return _NO_RANGE
    return _annotate(name, domain="adarec")
