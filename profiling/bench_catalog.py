"""Catalog size against memory and time: full-softmax CE training and one evaluation pass.

    python -m adarec.profiling.bench_catalog --out results/bench/catalog
    python -m adarec.profiling.bench_catalog --device cuda --dtype bf16 --rows 12800 --items 12101 100000 1000000

For each catalog size N (--items) it measures, on random inputs of the engine's shapes:
- `ce step`: forward + backward of the cross-entropy of R = --rows hidden rows [R, D] against an
  item table [N, D] (R = 256 x 50 is a batch of 256 sequences of length 50 with a target at every
  position), for each implementation of adarec/linear_ce.py: `eager` (the R x N logits),
  `chunked` (PyTorch, kernels.ce_item_chunk items at a time) and, on CUDA, `fused` (Triton). On
  CUDA two reference rows time cuBLAS alone: `matmul` (the R x N logits, H @ W.T) and
  `matmul x3` (the logits plus the two gradient products, what any CE step must compute);
- `eval pass`: ranking --users users against the N + 2 table rows (history of 20 items
  excluded), `full` (the users x items score matrix, today's path for models without the
  scoring contract) against `chunked` (eval.item_chunk items at a time with a running top-K).
Peak memory is what the step adds above its inputs: on CUDA torch's peak allocation; on the CPU
the peak resident set (VmHWM, reset before the step) of a fresh child process per measurement,
so one case's freed memory does not hide the next one's. An eager case whose logits would not
fit (estimated above --memory-limit-gib) is reported as skipped with the size it would need,
and a CUDA out-of-memory error is reported as such. Writes catalog.{csv,md,json} and a plot of
peak memory against N (catalog_memory.png) under --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from adarec.profiling.timing import RowWriter, environment, summarize, time_callable

from adarec.backends import linear_ce_function
from adarec.config import CE_ITEM_CHUNK, EVAL_ITEM_CHUNK
from adarec.linear_ce import chunked_linear_cross_entropy, linear_cross_entropy

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
HISTORY = 20


def _ce_inputs(rows: int, items: int, dim: int, dtype, device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = (torch.randn(rows, dim, generator=g, device=device) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(items, dim, generator=g, device=device) * 0.5).to(dtype).requires_grad_()
    target = torch.randint(0, items, (rows,), generator=g, device=device)
    return hidden, weight, target


def _ce_step(impl: str, hidden, weight, target, item_chunk: int):
    if impl == "matmul":
        return lambda: hidden.detach() @ weight.detach().t()
    if impl == "matmul x3":
        def three_products():
            logits = hidden.detach() @ weight.detach().t()
            return logits @ weight.detach(), logits.t() @ hidden.detach()
        return three_products
    fn = {"eager": linear_cross_entropy, "chunked": chunked_linear_cross_entropy}.get(impl)
    if fn is None:                                      # "fused": the Triton kernels
        fn = linear_ce_function("fused", hidden.device, weight.shape[0], item_chunk)

    def step():
        hidden.grad = weight.grad = None
        fn(hidden, weight, target, item_chunk=item_chunk).backward()
    return step


class _Scorer:
    """A model reduced to its scoring factors (adarec/models/scoring.py); with factors=False it
    offers only score(), so the evaluator takes its full-matrix path."""

    def __init__(self, query: torch.Tensor, table: torch.Tensor, factors: bool):
        self.query, self.table = query, table
        self.never_rank = (0, table.shape[0] - 1)
        if factors:
            self.user_query = lambda ids: self.query
            self.item_table = lambda: self.table

    def score(self, ids):
        return self.query @ self.table.t()


def _eval_pass(impl: str, users: int, items: int, dim: int, device, item_chunk: int):
    from adarec.engine.evaluator import batch_metric_sums

    g = torch.Generator(device=device).manual_seed(1)
    query = torch.randn(users, dim, generator=g, device=device)
    table = torch.randn(items + 2, dim, generator=g, device=device)
    history = torch.randint(1, items + 1, (users, HISTORY), generator=g, device=device)
    targets = torch.randint(1, items + 1, (users,), generator=g, device=device)
    scorer = _Scorer(query, table, factors=impl == "chunked")
    ids = history                                            # unused by the factors
    return lambda: batch_metric_sums(scorer, ids, history, targets, (5, 10, 20), "full", item_chunk=item_chunk)


def _eager_bytes(case: dict) -> int:
    """What the full matrices need: for the CE step, the logits, their float32 copy and the
    softmax gradient; for the evaluation pass, the scores, their masked copy and the mask."""
    if case["phase"] == "ce step":
        return case["rows"] * case["items"] * (4 * 3)
    return case["users"] * (case["items"] + 2) * (4 * 2 + 1)


def measure(case: dict) -> dict:
    """Time and peak memory of one case, in this process."""
    device = torch.device(case["device"])
    dtype = DTYPES[case["dtype"]]
    if case["phase"] == "ce step":
        inputs = _ce_inputs(case["rows"], case["items"], case["dim"], dtype, device)
        fn = _ce_step(case["impl"], *inputs, case["item_chunk"])
    else:
        fn = _eval_pass(case["impl"], case["users"], case["items"], case["dim"], device, case["item_chunk"])
    peak = _peak_mib(fn, device)
    times = time_callable(fn, device, warmup=0, repeats=case["repeats"])
    return {"peak_mib": peak, **summarize(times)}


def _peak_mib(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")            # VmHWM := VmRSS
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def _available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 8.0


def run_case(case: dict, memory_limit_gib: float) -> dict:
    if case["impl"] in ("eager", "full") and _eager_bytes(case) > memory_limit_gib * 2**30:
        return {"status": f"skipped: needs ~{_eager_bytes(case) / 2**30:.1f} GiB (limit {memory_limit_gib:.1f})"}
    if case["device"] == "cuda":
        try:
            result = measure(case)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return {"status": "out of memory"}
        torch.cuda.empty_cache()
        return {"status": "ok", **result}
    # A fresh process per CPU case: its peak resident set is this case's alone.
    child = subprocess.run([sys.executable, "-m", "adarec.profiling.bench_catalog", "--case", json.dumps(case)],
                           capture_output=True, text=True)
    if child.returncode != 0:
        return {"status": f"failed (exit {child.returncode}): {child.stderr.strip().splitlines()[-1:]}"}
    return {"status": "ok", **json.loads(child.stdout.strip().splitlines()[-1])}


def cases(args) -> list[dict]:
    device = torch.device(args.device)
    ce_impls = ["eager", "chunked"] + (["fused", "matmul", "matmul x3"] if device.type == "cuda" else [])
    common = {"device": args.device, "dtype": args.dtype, "dim": args.dim, "repeats": args.repeats}
    out = []
    for items in args.items:
        for impl in ce_impls:
            out.append({"phase": "ce step", "impl": impl, "items": items, "rows": args.rows,
                        "item_chunk": args.ce_item_chunk, **common})
        for impl in ("full", "chunked"):
            out.append({"phase": "eval pass", "impl": impl, "items": items, "users": args.users,
                        "item_chunk": args.eval_item_chunk, **common, "dtype": "fp32"})
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, phase in zip(axes, ("ce step", "eval pass"), strict=True):
        for impl in dict.fromkeys(r["impl"] for r in rows if r["phase"] == phase):
            points = [(r["items"], r["peak_mib"]) for r in rows
                      if r["phase"] == phase and r["impl"] == impl and r.get("peak_mib") is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=impl)
        ax.set(xscale="log", yscale="log", xlabel="items N", ylabel="peak memory above inputs (MiB)", title=phase)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    device = rows[0]["device"] if rows else ""
    fig.suptitle(f"adarec bench_catalog on {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, nargs="+", default=[12101, 100_000, 1_000_000])
    parser.add_argument("--rows", type=int, default=2048, help="hidden rows per CE step (256 x 50 = 12800 on a GPU)")
    parser.add_argument("--users", type=int, default=256, help="users per evaluation batch")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--ce-item-chunk", type=int, default=CE_ITEM_CHUNK)
    parser.add_argument("--eval-item-chunk", type=int, default=EVAL_ITEM_CHUNK)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="CE inputs (bf16 on a GPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-limit-gib", type=float, default=None,
                        help="skip eager cases estimated above this (default: half the available memory)")
    parser.add_argument("--out", default="results/bench/catalog")
    parser.add_argument("--case", help=argparse.SUPPRESS)          # internal: measure one case, print JSON
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(measure(json.loads(args.case))))
        return []
    device = torch.device(args.device)
    if args.memory_limit_gib is None:
        total = (torch.cuda.mem_get_info(device)[0] / 2**30) if device.type == "cuda" else _available_gib()
        args.memory_limit_gib = total / 2
    env = environment(device)
    writer = RowWriter(args.out, "catalog")
    for case in cases(args):
        result = run_case(case, args.memory_limit_gib)
        row = {k: v for k, v in case.items() if k not in ("device", "repeats")}
        writer.add({**row, **result, **env})
        shown = f"{result['median_ms']:.1f} ms, {result['peak_mib']:.1f} MiB" if result["status"] == "ok" else ""
        print(f"{case['phase']:9s} {case['impl']:9s} N={case['items']:>9,d}  {result['status']} {shown}", flush=True)
    rows = writer.rows
    paths = writer.finish()
    figure = Path(args.out) / "catalog_memory.png"
    try:
        plot(rows, figure)
    except ImportError as exc:   # matplotlib is the optional [plots] extra; the tables are the record
        print(f"no {figure.name}: {exc}")
        figure = None
    print(f"wrote {paths['md']}" + (f" and {figure}" if figure else ""))
    return rows


if __name__ == "__main__":
    main()
