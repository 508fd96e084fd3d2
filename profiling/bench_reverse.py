"""The peers' reverse processes: time per evaluation batch, and what ADRec's last-row path saves.

    python -m adarec.profiling.bench_reverse --out results/bench/reverse
    python -m adarec.profiling.bench_reverse --batch 1024 --device cuda --dtype bf16

Scores one batch of real Beauty validation inputs (the first --batch users) with untrained
models at the configs' sizes (the time does not depend on the weights):
- `adrec`: the last-row reverse process (`score`: the history's keys and values once, then one
  row per step) against the all-rows recomputation of ADRec's public code (`score_recomputed`);
- `diffurec`: the reverse process at 32 steps and, respaced, at 8 (a full Transformer pass per step);
- `diffuasr`: 5 DDIM steps of the U-Net.
Reports median / spread per row and the speed-up of each row over the first row of its model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from adarec.profiling.timing import RowWriter, environment, summarize, time_callable

from adarec.config import load_config
from adarec.data import build_split, read_sequences
from adarec.models import build_model

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# (row name, config, overrides, method): the first row of each model is its baseline.
CASES = [
    ("adrec, all rows every step (public code)", "adrec", ["model.pretrain_epochs=0"], "score_recomputed"),
    ("adrec, last row only", "adrec", ["model.pretrain_epochs=0"], "score"),
    ("diffurec, 32 steps", "diffurec", [], "score"),
    ("diffurec, 8 steps (respaced)", "diffurec", ["model.sample_steps=8"], "score"),
    ("diffuasr, 5 DDIM steps", "diffuasr", [], "score"),
]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256, help="users per evaluation batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="autocast dtype on CUDA")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["adrec", "diffurec", "diffuasr"])
    parser.add_argument("--out", default="results/bench/reverse")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    env = environment(device)
    writer, baselines = RowWriter(args.out, "reverse"), {}
    for name, model_name, overrides, method in CASES:
        if model_name not in args.models:
            continue
        cfg = load_config(REPO / f"configs/{model_name}_beauty.yaml", overrides)
        split = build_split(read_sequences(REPO / cfg.data.path), cfg.data.max_len)
        inputs = split.valid_input[: args.batch].to(device)
        torch.manual_seed(0)
        model = build_model(cfg.model, split.num_items, split.max_len).to(device).eval()
        score = getattr(model, method)
        autocast = torch.autocast(device.type, dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32")

        def call(score=score, autocast=autocast, inputs=inputs):
            with autocast:
                return score(inputs)

        stats = summarize(time_callable(call, device, warmup=args.warmup, repeats=args.repeats))
        baselines.setdefault(model_name, stats["median_ms"])
        writer.add({"case": name, "batch": inputs.shape[0], "dtype": args.dtype, **stats,
                     "speedup_vs_first": baselines[model_name] / stats["median_ms"], **env})
        print(f"{name}: {stats['median_ms']:.1f} ms", flush=True)
    rows = writer.rows
    paths = writer.finish()
    print(paths["md"].read_text(), end="")
    return rows


if __name__ == "__main__":
    main()
