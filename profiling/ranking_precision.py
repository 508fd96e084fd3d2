"""How much ranking in bf16 costs: a run's best weights in bf16, scored in bf16 and in fp32.

    python -m adarec.profiling.ranking_precision --run DIR [--split valid] [--device cpu]

A bf16 engine holds bf16 weights. Scoring h · E^T in bf16 rounds the scores to 8 bits of
mantissa, so many candidates tie with the target, and ties count against it (docs/method.md 4).
This runs the same bf16 network twice over a split: once with the scores rounded to bf16 (what
scoring in the training precision did), once in fp32 (what `score` does,
adarec/models/scoring.py), and reports the metrics and the share of users whose target ties
with at least one other candidate. The test split is refused: this is a diagnostic, not an evaluation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from adarec.engine.data_setup import load_split
from adarec.engine.distributed import pick_device
from adarec.engine.trainer import BEST_WEIGHTS

from adarec.cli import run
from adarec.config import load_config
from adarec.errors import AdarecError
from adarec.metrics import mask_scores, metric_sums, target_ranks
from adarec.models import build_members, scorer


@torch.no_grad()
def compare(model, split, which: str, ks, protocol: str, batch_size: int, device) -> dict:
    inputs, targets, history = (getattr(split, f"{which}_{k}") for k in ("input", "target", "history"))
    totals = {name: {} for name in ("bf16", "fp32")}
    ties = {"bf16": 0, "fp32": 0}
    model.eval()
    for start in range(0, inputs.shape[0], batch_size):
        ids = inputs[start:start + batch_size].to(device)
        exact = model.score(ids)                                # fp32 scores of the bf16 network
        for name, scores in (("fp32", exact), ("bf16", exact.to(torch.bfloat16).float())):
            masked = mask_scores(scores, history[start:start + batch_size].to(device),
                                 never_rank=model.never_rank, protocol=protocol)
            target = targets[start:start + batch_size].to(device)
            ranks = target_ranks(masked, target, max(ks))
            for key, value in metric_sums(ranks, ks).items():
                totals[name][key] = totals[name].get(key, 0.0) + float(value)
            target_score = masked.gather(1, target.view(-1, 1))
            ties[name] += int(((masked == target_score).sum(1) > 1).sum())
    users = inputs.shape[0]
    return {name: {**{k: v / users for k, v in totals[name].items()}, "target_tied_frac": ties[name] / users}
            for name in totals}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--split", default="valid", choices=("valid",))
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None)

    def command(args):
        run_dir = Path(args.run)
        if args.threads:
            torch.set_num_threads(args.threads)
        cfg = load_config(run_dir / "config.yaml")
        device = pick_device(args.device)
        split = load_split(cfg, device)
        weights = run_dir / BEST_WEIGHTS
        if not weights.exists():
            raise AdarecError(f"{run_dir}: no {BEST_WEIGHTS}")
        saved = torch.load(weights, map_location=device, weights_only=True)["members"]
        members = build_members(cfg.model, split.num_items, split.max_len, "eager")
        for name, net in members.items():
            net.load_state_dict(saved[name]["model"])
            net.to(device=device, dtype=torch.bfloat16)
        result = compare(scorer(members), split, args.split, cfg.eval.ks, cfg.eval.protocol, cfg.eval.batch_size,
                         device)
        print(json.dumps({"run": str(run_dir), "split": args.split, "weights": "bf16", **result}))
        return 0

    return run(command, parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
