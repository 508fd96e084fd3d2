"""Launch/sync counts of the code before the sync-free step, with the new counter's rules."""
import sys, tempfile, types
from pathlib import Path
sys.path.insert(0, "/tmp/base")
import torch
from torch.profiler import record_function
import adarec
assert adarec.__file__.startswith("/tmp/base"), adarec.__file__
from adarec.profiling import opcount_new as oc
from adarec.engine import trainer as T
from adarec.engine.evaluator import evaluate_split

def train_step(self, batch):
    out = {}
    for name, engine in self.engines.items():
        loss, terms = engine(batch)
        engine.backward(loss)
        with record_function(oc.OPTIMIZER_RANGE):
            engine.step()
        out[name] = loss.detach()
    return out

def eval_batch(self, model, inputs):
    from adarec.metrics import mask_scores, metric_sums, target_ranks
    ev, s = self.cfg.eval, self.split
    n = inputs.shape[0]
    scores = model.score(inputs)
    masked = mask_scores(scores, s.valid_history[:n], never_rank=model.never_rank, protocol=ev.protocol)
    return metric_sums(target_ranks(masked, s.valid_target[:n], max(ev.ks)), ev.ks)

T.Trainer.train_step = train_step
T.Trainer.eval_batch = eval_batch
config = sys.argv[1]
trainer = oc._build_trainer(config, sys.argv[2:], Path(tempfile.mkdtemp()))
counts = oc.profile_trainer(trainer)
print(oc.format_table(counts))
