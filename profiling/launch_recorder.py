"""Record the specialisation of every Triton kernel launch while a workload runs through Triton's
interpreter, so the kernels a GPU run will compile can be listed, counted and compiled ahead of
time on a machine without a GPU (profiling/aot_compile.py).

A compiled Triton kernel is keyed by its signature (each argument's type: `*bf16`, `i32`, ...),
its constexpr values (block sizes, flags, integer arguments equal to 1, `None` for an absent
optional pointer), the attributes of its specialised arguments (pointers and integers divisible
by 16) and its launch options (num_warps, num_stages). The recorder computes that key from each
launch's arguments with Triton's own specialisation function, the one the JIT uses on a GPU, so
two launches that would share a compiled kernel on a GPU share a record here.

Use: TRITON_INTERPRET=1 must be set before any kernel module is imported; then

    recorder = LaunchRecorder().install()
    ...run the workload...
    recorder.records  # list of dicts, one per distinct specialisation, with its launch count

What the interpreter runs is not always what a GPU compiles: the kernel wrappers pick a few
constexprs for the interpreter (bf16 products emulated on fp32 copies) and size some grids by
the GPU's SM count. `gpu_equivalent` turns a record into the key the GPU would compile:
- trajectory kernels: UPCAST=True (interpreter) -> UPCAST=False and PRECISION=None (bf16 dots);
  SPLITS of the weights kernel -> the GPU's max(1, 2 * SMs // hidden chunks), its value for any
  batch of more than that many row blocks (kernels/trajectory.py `_weight_splits`);
- linear CE kernels with FP32_EXACT=False, which the wrapper picks for bf16 inputs (the
  interpreter runs them on fp32 copies, kernels/linear_ce.py): bf16 hidden and weight pointers.
"""

from __future__ import annotations

import inspect
import json

LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _specialise(value, specialize: bool, align: bool) -> tuple[str, object]:
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    return native_specialize_impl(BaseBackend, value, False, specialize, align)


def specialisation(fn, args: tuple, kwargs: dict) -> dict:
    """The compile key of one launch of the @triton.jit function `fn` (an interpreted function)."""
    params = inspect.signature(fn.fn).parameters
    options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
    bound = inspect.signature(fn.fn).bind(*args, **{k: v for k, v in kwargs.items() if k not in options})
    bound.apply_defaults()
    no_spec = set(fn.kwargs.get("do_not_specialize") or ())
    no_align = set(fn.kwargs.get("do_not_specialize_on_alignment") or ())
    signature, constexprs, attrs = {}, {}, {}
    for name, param in params.items():
        value = bound.arguments[name]
        if "constexpr" in str(param.annotation):
            signature[name] = "constexpr"
            constexprs[name] = value.value if hasattr(value, "value") else value
            continue
        kind, key = _specialise(value, name not in no_spec, name not in no_align)
        if kind == "constexpr":
            signature[name] = "constexpr"
            constexprs[name] = key
        else:
            signature[name] = kind
            if isinstance(key, str) and key:
                attrs[name] = key
    return {"module": fn.fn.__module__, "kernel": fn.fn.__name__, "signature": signature,
            "constexprs": {k: _plain(v) for k, v in constexprs.items()}, "attrs": attrs, "options": options}


def _plain(value):
    """A constexpr value as JSON holds it (dtypes and other objects by their string)."""
    return value if isinstance(value, (bool, int, float, str, type(None))) else str(value)


def record_key(record: dict) -> str:
    return json.dumps({k: record[k] for k in ("module", "kernel", "signature", "constexprs", "attrs", "options")},
                      sort_keys=True)


def gpu_equivalent(record: dict, sms: int = 132, row_blocks: int | None = None) -> dict:
    """The record as a GPU with `sms` multiprocessors would key it (see the module docstring);
    row_blocks is the grid of the trajectory backward's rows kernel launched just before."""
    record = {**record, "signature": dict(record["signature"]), "constexprs": dict(record["constexprs"])}
    consts, sig = record["constexprs"], record["signature"]
    if record["module"].endswith("kernels.trajectory"):
        if consts.get("UPCAST"):
            consts["UPCAST"], consts["PRECISION"] = False, None
        if "SPLITS" in consts and record.get("grid"):
            chunks = record["grid"][0]
            consts["SPLITS"] = max(1, min(row_blocks or 1 << 30, (2 * sms) // max(1, chunks)))
    if record["module"].endswith("kernels.linear_ce") and consts.get("FP32_EXACT") is False:
        for name in ("h_ptr", "w_ptr"):
            if name in sig:
                sig[name] = "*bf16"
    return record


class LaunchRecorder:
    """Wraps the interpreter's launch entry point; every launch still runs as before. Records
    are kept as a GPU with `sms` multiprocessors would key them (gpu_equivalent)."""

    def __init__(self, sms: int = 132):
        self._by_key: dict[str, dict] = {}
        self.sms = sms
        self._row_blocks: int | None = None

    def install(self) -> LaunchRecorder:
        from triton.runtime.interpreter import InterpretedFunction

        original_run = InterpretedFunction.run
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            record = specialisation(fn, args, kwargs)
            record["grid"] = list(grid) if isinstance(grid, (tuple, list)) else None
            if record["kernel"] == "_trajectory_bwd_rows_kernel" and record["grid"]:
                recorder._row_blocks = record["grid"][0]
            recorder.add(gpu_equivalent(record, recorder.sms, recorder._row_blocks))
            return original_run(fn, *args, grid=grid, warmup=warmup, **kwargs)

        InterpretedFunction.run = run
        return self

    def add(self, record: dict, launches: int = 1) -> None:
        record = {k: v for k, v in record.items() if k not in ("grid", "launches")}
        key = record_key(record)
        if key in self._by_key:
            self._by_key[key]["launches"] += launches
        else:
            self._by_key[key] = {**record, "launches": launches}

    def reset(self) -> None:
        self._by_key.clear()

    @property
    def records(self) -> list[dict]:
        return list(self._by_key.values())
