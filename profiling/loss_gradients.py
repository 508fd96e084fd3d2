"""Gradient norm of each weighted loss term, per parameter group, on one training batch.

    python -m adarec.profiling.loss_gradients --config configs/elcrec_beauty.yaml [--set k=v ...]

Answers "which term drives the update?" when a multi-term model (ELCRec, ADARec) learns its
recommendation task slowly: a term whose gradient is orders of magnitude larger than L_rec's
sets Adam's direction. Runs on the CPU with the model's own initialisation (incl. k-means).
"""

from __future__ import annotations

import argparse

import torch
from adarec.engine.data_setup import load_split

from adarec.cli import run
from adarec.config import load_config
from adarec.data import TrainBatchSampler
from adarec.models import build_members

WEIGHTS = {"rec": lambda m: 1.0, "instance_cl": lambda m: m.cf_weight, "intent_cl": lambda m: m.intent_cf_weight,
           "cluster": lambda m: m.trade_off}


def parameter_groups(model) -> dict[str, list[torch.nn.Parameter]]:
    enc = model.encoder
    return {
        "item_embeddings": [enc.item_embeddings.weight],
        "position+input_norm": [*enc.position_embeddings.parameters(), *enc.embed_norm.parameters()],
        "transformer_blocks": list(enc.blocks.parameters()),
    }


def term_gradient_norms(model, batch) -> dict[str, dict[str, float]]:
    """{term: {"value": v, group: ||d(weight * term)/d group||}} for rec and the ELCRec terms."""
    ids = batch["input_ids"]
    if hasattr(model, "elcrec_terms"):
        # As ELCRec's forward: the full-width outputs give the item outputs and the representation.
        full = model.full_width_outputs(ids)
        hidden = full[:, full.shape[1] - ids.shape[1]:]
        terms = {"rec": model.rec_loss(hidden, batch), **model.elcrec_terms(batch, full.mean(1))}
    else:
        hidden = model.encoder(ids)
        terms = {"rec": model.rec_loss(hidden, batch)}
    out = {}
    for name, value in terms.items():
        weighted = WEIGHTS.get(name, lambda m: 1.0)(model) * value
        row = {"value": float(value.detach())}
        for group, params in parameter_groups(model).items():
            grads = torch.autograd.grad(weighted, params, retain_graph=True, allow_unused=True)
            row[group] = float(sum(g.pow(2).sum() for g in grads if g is not None) ** 0.5)
        out[name] = row
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[])
    parser.add_argument("--seed", type=int, default=0)

    def command(args):
        cfg = load_config(args.config, [*args.overrides, "train.device=cpu"])
        torch.manual_seed(args.seed)
        split = load_split(cfg, torch.device("cpu"))
        model = next(iter(build_members(cfg.model, split.num_items, split.max_len).values()))
        model.prepare(split, torch.device("cpu"), args.seed)
        sampler = TrainBatchSampler(split, cfg.train.batch_size, args.seed, with_views=model.needs_views)
        batch = next(iter(sampler.epoch(0)))
        rows = term_gradient_norms(model, batch)
        groups = list(parameter_groups(model))
        print(f"{'term':12s} {'value':>9s} " + " ".join(f"{g:>20s}" for g in groups))
        for name, row in rows.items():
            print(f"{name:12s} {row['value']:9.3f} " + " ".join(f"{row[g]:20.4f}" for g in groups))
        return 0

    return run(command, parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
