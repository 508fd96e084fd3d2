"""Launch budget of a training step and an evaluation batch, counted from a CPU profile.

    python -m adarec.profiling.opcount --config configs/adarec_beauty.yaml
    python -m adarec.profiling.opcount --config ... --set model.hidden_size=64 --top 20

A GPU step is launch- and sync-bound long before it is compute-bound (docs/method.md,
"The training step on a GPU"), so the numbers that matter are how many kernels one step
launches and how often it waits for the device. Both can be read off a CPU profile of the same
Python code: every ATen op that does work on a GPU is a *leaf* op (no ATen op below it), and a
host sync is one of a few ops that must read device memory on the host.

Counting rules, so that the CPU count stands for the GPU launches:
- a leaf op is an ATen op with no ATen op inside it, except ops that only make views or
  metadata (view, reshape of a contiguous tensor, transpose, expand, empty, ...), which launch
  nothing;
- an RNN call (`aten::gru`, `aten::lstm`, ...) counts as one launch, and its backward as one
  more: the CPU kernel unrolls over the sequence, cuDNN runs it as one call; likewise an
  attention call (`aten::scaled_dot_product_attention`): with a mask and dropout the CPU takes
  its math path (a dozen ops each way), a GPU one fused kernel each way (flash or
  memory-efficient attention), and a dropout (`aten::dropout`: bernoulli, scale and multiply on
  the CPU, one `native_dropout` kernel each way on a GPU); the backward ops of such a call are
  found through the autograd sequence numbers of the ops inside its forward;
- an optimizer step (the `optimizer_step` range around it) counts as one launch: a fused
  multi-tensor Adam is one kernel on a GPU, whatever the CPU loop does;
- a Triton kernel launch (the `triton::<kernel>` range around it) counts as one launch, and
  what runs inside the range (the interpreter's copies, on a CPU) is not counted;
- a sync op is `aten::_local_scalar_dense` (`.item()`, `int(t)`, a size read inside
  `repeat_interleave`, ...), `aten::nonzero` (boolean indexing) or `aten::masked_select`,
  counted once at its outermost occurrence and only outside the optimizer step; the scalar read
  inside `aten::_assert_async` is not one, since on a GPU that assertion is a kernel that
  checks on the device without stopping the host.

The step is built as on a GPU (the static level grid of ADARec, `model.level_layout=grid`) but
on the CPU in fp32. Prints one table (training step and evaluation batch: launches, syncs, the
sync ops by name);
`--top N` adds the N most frequent leaf ops. `count_ops(fn)` is what the sync test uses.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

SYNC_OPS = frozenset({"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select"})
# Device-side assertions: a CPU reads the scalar, a GPU checks it in a kernel (module docstring).
DEVICE_ASSERTS = frozenset({"aten::_assert_async"})
# Ops a GPU runs as one fused call each way (module docstring).
FUSED_OPS = frozenset({"aten::gru", "aten::lstm", "aten::rnn_tanh", "aten::rnn_relu",
                       "aten::scaled_dot_product_attention", "aten::dropout"})
OPTIMIZER_RANGE = "optimizer_step"
# Prefix of the profiler range around each Triton kernel launch (kernels/trajectory.py): the
# profiler sees no ATen op for a Triton kernel, so the range is what is counted.
TRITON_LAUNCH = "triton::"
BACKWARD_PREFIX = "autograd::engine::evaluate_function: "
# Ops that create views or read metadata: nothing runs on the device for them.
NO_LAUNCH = frozenset({
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided",
    "aten::t", "aten::transpose", "aten::permute", "aten::expand", "aten::expand_as", "aten::slice",
    "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::flatten", "aten::unflatten", "aten::unbind",
    "aten::split", "aten::split_with_sizes", "aten::chunk", "aten::narrow", "aten::alias", "aten::detach",
    "aten::detach_", "aten::lift_fresh", "aten::empty", "aten::empty_like", "aten::empty_strided",
    "aten::resize_", "aten::result_type", "aten::size", "aten::stride", "aten::numel", "aten::dim",
    "aten::is_nonzero", "aten::view_as", "aten::contiguous", "aten::to", "aten::_to_copy_noop",
    "aten::is_same_size", "aten::_has_compatible_shallow_copy_type", "aten::set_", "aten::diagonal",
    "aten::movedim", "aten::swapaxes", "aten::unfold", "aten::real", "aten::conj", "aten::_conj",
    "aten::resolve_conj", "aten::resolve_neg", "aten::_nested_tensor_size", "aten::align_to",
    "aten::_unsafe_split", "aten::as_strided_", "aten::requires_grad_", "aten::retain_grad", "aten::new_empty",
    "aten::new_empty_strided",
})


@dataclass
class OpCount:
    launches: int = 0
    syncs: int = 0
    sync_ops: collections.Counter = field(default_factory=collections.Counter)
    leaf_ops: collections.Counter = field(default_factory=collections.Counter)


def _intervals(events, name: str) -> list[tuple[int, int, int]]:
    return [(e.time_range.start, e.time_range.end, e.thread) for e in events if e.name == name]


def _inside(event, ranges) -> bool:
    start, end = event.time_range.start, event.time_range.end
    return any(s <= start and end <= e for s, e, _ in ranges)


def _ancestors(event) -> list[str]:
    names, parent = [], event.cpu_parent
    while parent is not None:
        names.append(parent.name)
        parent = parent.cpu_parent
    return names


def _launches_below(event, memo: dict) -> bool:
    """Whether some op below event launches work (then event itself is not a leaf)."""
    key = id(event)
    if key not in memo:
        memo[key] = any((child.name.startswith("aten::") and child.name not in NO_LAUNCH)
                        or _launches_below(child, memo) for child in event.cpu_children)
    return memo[key]


def _fused_backward_roots(events) -> tuple[set[int], int]:
    """The backward-function events that belong to fused calls (linked to the forward ops inside
    such a call by their autograd sequence number), and the number of calls that have a backward."""
    by_call: dict[int, set[int]] = {}
    for event in events:
        if event.sequence_nr < 0 or not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and parent.name not in FUSED_OPS:
            parent = parent.cpu_parent
        if parent is not None:
            by_call.setdefault(id(parent), set()).add(event.sequence_nr)
    roots, calls_with_backward = set(), 0
    backward = [e for e in events if e.name.startswith(BACKWARD_PREFIX)]
    for seqs in by_call.values():
        mine = [e for e in backward if e.sequence_nr in seqs]
        roots.update(id(e) for e in mine)
        calls_with_backward += bool(mine)
    return roots, calls_with_backward


def count_events(events) -> OpCount:
    """Launches and syncs of a list of profiler FunctionEvents (see the module docstring)."""
    optimizer = _intervals(events, OPTIMIZER_RANGE)
    fused_backward, fused_backward_calls = _fused_backward_roots(events)
    triton = [e for e in events if e.name.startswith(TRITON_LAUNCH)]
    counted = OpCount(launches=len(optimizer) + fused_backward_calls + len(triton))
    for event in triton:
        counted.leaf_ops[event.name] += 1
    # Whatever runs inside a Triton range is the launcher's (or, on CPU, the interpreter's) work.
    optimizer += [(e.time_range.start, e.time_range.end, e.thread) for e in triton]
    memo: dict = {}
    for event in events:
        if not event.name.startswith("aten::") or _inside(event, optimizer):
            continue
        ancestors = _ancestors(event)
        if event.name in SYNC_OPS and not any(a in SYNC_OPS or a in DEVICE_ASSERTS for a in ancestors):
            counted.syncs += 1
            top = next((a for a in reversed(ancestors) if a.startswith("aten::")), event.name)
            counted.sync_ops[f"{event.name} (in {top})" if top != event.name else event.name] += 1
        if any(a in FUSED_OPS for a in ancestors) or _under(event, fused_backward):
            continue
        if event.name in FUSED_OPS or (event.name not in NO_LAUNCH and not _launches_below(event, memo)):
            counted.launches += 1
            counted.leaf_ops[event.name] += 1
    return counted


def _under(event, roots: set[int]) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if id(parent) in roots:
            return True
        parent = parent.cpu_parent
    return False


def count_ops(fn) -> OpCount:
    """Profile one call of fn on the CPU and count its launches and syncs."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return count_events(prof.events())


def optimizer_range():
    """The range whose ops count as one launch (wrap the optimizer step in it)."""
    return record_function(OPTIMIZER_RANGE)


def _build_trainer(config: str, overrides: list[str], run_dir: Path):
    from adarec.engine.data_setup import load_split
    from adarec.engine.distributed import setup_distributed
    from adarec.engine.trainer import Trainer

    from adarec.config import apply_overrides, load_config

    # The GPU's level layout (model.level_layout=auto would pick the compact one on the CPU).
    base = ["train.device=cpu", "train.precision=fp32", "model.level_layout=grid"]
    cfg = apply_overrides(load_config(config), [*base, *overrides])
    dist = setup_distributed(cfg.train.device, cfg.train.dist_timeout_s)
    split = load_split(cfg, dist.device)
    return Trainer(cfg, run_dir, dist, split, resume=False)


def profile_trainer(trainer, warmup: int = 1) -> dict[str, OpCount]:
    """Counts for one training step and one evaluation batch of a built Trainer."""
    from adarec.models import scorer

    batches = iter(trainer.sampler.epoch(0))
    for _ in range(warmup):
        trainer.train_step(next(batches))
    batch = next(batches)
    step = count_ops(lambda: trainer.train_step(batch))
    model = scorer({name: engine.module for name, engine in trainer.engines.items()})
    model.eval()
    inputs = trainer.split.valid_input[: trainer.cfg.eval.batch_size].to(trainer.device)
    with torch.no_grad():
        model.score(inputs)
        evaluation = count_ops(lambda: trainer.eval_batch(model, inputs))
    return {"training step": step, "evaluation batch": evaluation}


def format_table(counts: dict[str, OpCount], top: int = 0) -> str:
    lines = ["| | launches | host syncs | sync ops |", "|---|---|---|---|"]
    for name, c in counts.items():
        ops = ", ".join(f"{op} x{n}" for op, n in c.sync_ops.most_common()) or "none"
        lines.append(f"| {name} | {c.launches} | {c.syncs} | {ops} |")
    if top:
        for name, c in counts.items():
            lines.append(f"\n{name}, most frequent leaf ops:")
            lines += [f"  {n:5d}  {op}" for op, n in c.leaf_ops.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, OpCount]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    parser.add_argument("--top", type=int, default=0, help="also list the N most frequent leaf ops")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="adarec-opcount-") as run_dir:
        trainer = _build_trainer(args.config, args.set, Path(run_dir))
        counts = profile_trainer(trainer)
    print(f"{Path(args.config).stem}: {trainer.cfg.model.name}, batch {trainer.cfg.train.batch_size}, "
          f"hidden {trainer.cfg.model.hidden_size}, CPU profile (see the counting rules in the module docstring)")
    print(format_table(counts, args.top))
    return counts


if __name__ == "__main__":
    main()
