"""Signal-free look-ahead probe: does a model's training objective let position i see its target?

    python -m adarec.profiling.leak_probe --model adarec [--steps 1500] [--items 400] [--users 3000]

Every item of every sequence is drawn uniformly at random, so nothing about the item at i + 1
can be inferred from positions <= i. A causal model can only memorise its training rows: its
cross-entropy on fresh random sequences is the same at every position (and above log N, from
over-confidence). A model whose position i reads a later input learns to copy the next item
from it: on fresh sequences its CE at the earlier positions (whose targets sit in the input)
drops below its CE at the last position (whose target is never in the input, the position
evaluation scores). The gap `earlier - last` is the measure; docs/method.md ("Causality")
explains the test.

The model is trained with full-softmax CE, no dropout, and the ELCRec terms switched off, with
plain Adam on the CPU (no DeepSpeed: the probe is about the objective, not the engine).
Per-position CE is measured in evaluation mode (what scoring uses).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
import yaml

from adarec.config import ModelConfig
from adarec.models import build_model


def random_sequences(users: int, length: int, items: int, generator: torch.Generator) -> torch.Tensor:
    """[users, length + 1] item ids in 1..items, every entry independent and uniform."""
    return torch.randint(1, items + 1, (users, length + 1), generator=generator)


def probe_config(model: str, hidden: int, max_depth: int, **overrides) -> ModelConfig:
    cfg = {"name": model, "hidden_size": hidden, "num_layers": 2, "num_heads": 2, "hidden_dropout": 0.0,
           "attn_dropout": 0.0, "rec_loss": "ce", "cf_weight": 0.0, "intent_cf_weight": 0.0, "trade_off": 0.0,
           "kmeans_init": False, "num_intent_clusters": 4}
    if model == "adarec":
        cfg["max_depth"] = max_depth
    cfg.update(overrides)
    return ModelConfig(**cfg)


def batch_of(seqs: torch.Tensor) -> dict[str, torch.Tensor]:
    ids = seqs[:, :-1].contiguous()
    # The views feed the (switched-off) ELCRec terms; they are the input itself.
    return {"input_ids": ids, "target_pos": seqs[:, 1:].contiguous(), "target_neg": torch.ones_like(ids),
            "user": torch.arange(ids.shape[0]), "view1": ids, "view2": ids}


def hidden_states(model, ids: torch.Tensor) -> torch.Tensor:
    """h [B, L, D] at every position: ADARec's fused representation, else the encoder output."""
    if hasattr(model, "user_representation"):
        return model.user_representation(ids)["h"]
    return model.encoder(ids)


@torch.no_grad()
def position_ce(model, seqs: torch.Tensor, items: int, batch: int = 256) -> dict[str, float]:
    """Mean CE at the last position and at all earlier positions (evaluation mode)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    counts = torch.zeros(2, dtype=torch.float64)
    for start in range(0, seqs.shape[0], batch):
        part = seqs[start:start + batch]
        ids, targets = part[:, :-1], part[:, 1:]
        h = hidden_states(model, ids).float()
        weight = model.encoder.item_embeddings.weight[1:items + 1].float()
        ce = F.cross_entropy((h @ weight.t()).flatten(0, 1), (targets - 1).flatten(), reduction="none")
        ce = ce.view(targets.shape).double()
        totals += torch.stack([ce[:, -1].sum(), ce[:, :-1].sum()])
        counts += torch.tensor([ce.shape[0], ce[:, :-1].numel()], dtype=torch.float64)
    model.train(was_training)
    last, earlier = (totals / counts).tolist()
    return {"last": last, "earlier": earlier, "gap": earlier - last}


def run_probe(model_name: str = "adarec", items: int = 400, users: int = 3000, length: int = 20,
              hidden: int = 64, max_depth: int = 8, steps: int = 1500, batch: int = 64, lr: float = 1e-3,
              seed: int = 0, fresh_users: int = 1000, **overrides) -> dict:
    """Train on signal-free sequences and return per-position CE on train and fresh rows."""
    gen = torch.Generator().manual_seed(seed)
    train = random_sequences(users, length, items, gen)
    fresh = random_sequences(fresh_users, length, items, gen)
    torch.manual_seed(seed)
    model = build_model(probe_config(model_name, hidden, max_depth, **overrides), num_items=items,
                        max_len=length, kernel_backend="eager").train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    for step in range(steps):
        rows = torch.randint(0, users, (batch,), generator=gen)
        loss, _ = model(batch_of(train[rows]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not math.isfinite(float(loss.detach())):
            raise RuntimeError(f"non-finite loss at step {step}")
    seconds = time.perf_counter() - start
    return {"model": model_name, "items": items, "users": users, "length": length, "hidden": hidden,
            "steps": steps, "batch": batch, "seed": seed, "log_n": math.log(items), "train_seconds": seconds,
            "train": position_ce(model, train, items), "fresh": position_ce(model, fresh, items)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="adarec", choices=("sasrec", "elcrec", "adarec"))
    parser.add_argument("--items", type=int, default=400)
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--length", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--max-depth", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra model config keys, e.g. depth_gradient=none")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = {}
    for item in args.overrides:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    result = run_probe(args.model, args.items, args.users, args.length, args.hidden, args.max_depth, args.steps,
                       args.batch, args.lr, args.seed, **overrides)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
