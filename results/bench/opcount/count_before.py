"""Launches and syncs of the code of commit 51066e0 (before Trainer.train_step existed), counted
with the current rules of profiling/opcount.py.

Run from a worktree of 51066e0 in which adarec/kernels, adarec/engine and adarec/profiling link
to ../kernels, ../engine and ../profiling, with the current profiling/opcount.py copied there as
profiling/opcount_new.py and the extension built in place:

    cd /tmp/base && PYTHONPATH=/tmp/base python count_before.py configs/adarec_beauty.yaml model.kmeans_init=false

The old step (every member: forward, DeepSpeed backward, step) and evaluation batch are
re-created here as the two methods the counter calls.
"""

import sys
import tempfile
from pathlib import Path

from adarec.engine import trainer as trainer_module
from adarec.profiling import opcount_new as opcount
from torch.profiler import record_function

import adarec
from adarec.metrics import mask_scores, metric_sums, target_ranks


def train_step(self, batch):
    losses = {}
    for name, engine in self.engines.items():
        loss, _ = engine(batch)
        engine.backward(loss)
        with record_function(opcount.OPTIMIZER_RANGE):
            engine.step()
        losses[name] = loss.detach()
    return losses


def eval_batch(self, model, inputs):
    ev, split = self.cfg.eval, self.split
    n = inputs.shape[0]
    masked = mask_scores(model.score(inputs), split.valid_history[:n], never_rank=model.never_rank,
                         protocol=ev.protocol)
    return metric_sums(target_ranks(masked, split.valid_target[:n], max(ev.ks)), ev.ks)


def main() -> None:
    if "/work/main" in adarec.__file__:
        raise SystemExit(f"this counts the old code; adarec was imported from {adarec.__file__}")
    trainer_module.Trainer.train_step = train_step
    trainer_module.Trainer.eval_batch = eval_batch
    trainer = opcount._build_trainer(sys.argv[1], sys.argv[2:], Path(tempfile.mkdtemp()))
    print(opcount.format_table(opcount.profile_trainer(trainer)))


if __name__ == "__main__":
    main()
