"""One process of the data-parallel equivalence test (tests/test_data_parallel.py).

Run once as a single process and once per rank of a gloo group (RANK / WORLD_SIZE / MASTER_*
in the environment). For every case (model, ZeRO stage) it trains a fresh Trainer for the given
epochs, step by step, and records the global batch's loss terms after every step (each rank's
terms are its share of them, averaged over ranks here) and the validation metrics at the end.
Rank 0 writes the record as JSON.
"""

import json
import sys
from pathlib import Path

import torch
from adarec.engine.data_setup import load_split
from adarec.engine.distributed import setup_distributed
from adarec.engine.trainer import Trainer

from adarec.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "data.max_users=90", "model.hidden_size=16", "model.num_layers=1", "model.num_heads=1",
    "model.num_intent_clusters=4", "model.hidden_dropout=0", "model.attn_dropout=0",
    "train.batch_size=32", "train.device=cpu", "train.precision=fp32", "train.num_threads=1",
]

# The peers: their embedding dropout off too, short reverse processes, ADRec's stages crossed.
PEERS = {
    "diffurec": ["model.emb_dropout=0", "model.sample_steps=4", "data.max_users=40"],   # 448 prefix rows: even
    "adrec": ["model.emb_dropout=0", "model.diffusion_steps=4", "model.sample_steps=4", "model.pretrain_epochs=1",
              "model.freeze_epochs=1"],
    "diffuasr": ["model.sample_steps=3", "model.prefix_items=3"],
}


def run_case(model: str, zero_stage: int, epochs: int, out_dir: Path) -> dict:
    cfg = load_config(REPO / f"configs/{model}_beauty.yaml",
                      [*TINY, *PEERS.get(model, []), f"train.zero_stage={zero_stage}"])
    torch.set_num_threads(1)
    split = load_split(cfg, torch.device("cpu"))
    dist = setup_distributed("cpu", cfg.train.dist_timeout_s)
    run_dir = out_dir / f"{model}_zero{zero_stage}_rank{dist.rank}"
    trainer = Trainer(cfg, run_dir, dist, split, resume=False)
    steps = []
    for epoch in range(epochs):
        for engine in trainer.engines.values():
            engine.train()
            if hasattr(engine.module, "begin_epoch"):
                engine.module.begin_epoch(epoch)
        for batch in trainer.sampler.epoch(epoch):
            terms = trainer.train_step(batch)
            names = sorted(terms)
            values = torch.stack([terms[k].double() for k in names])
            if dist.world_size > 1:
                torch.distributed.all_reduce(values)
                values /= dist.world_size
            steps.append(dict(zip(names, values.tolist(), strict=True)))
    valid = {name: trainer.evaluate(engine.module, "valid") for name, engine in trainer.engines.items()}
    return {"steps": steps, "valid": valid, "rows_per_step": trainer.sampler.local_batch * dist.world_size,
            "rows": trainer.sampler.num_rows}


def main() -> None:
    out_dir, epochs, cases = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    record = {}
    for case in cases:
        model, zero = case.split(":")
        record[case] = run_case(model, int(zero), epochs, out_dir)
    if torch.distributed.get_rank() == 0:
        name = f"world{torch.distributed.get_world_size()}.json"
        (out_dir / name).write_text(json.dumps(record))
    # Leave together and tear the group down explicitly: a gloo group left to the interpreter's
    # exit can abort the process ("terminate called without an active exception").
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
