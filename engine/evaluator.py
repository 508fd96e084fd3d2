"""Full-ranking evaluation of a split, batch by batch on the model's device.

Only one batch of scores exists at a time, and within a batch only item_chunk columns of it: a
model with the scoring factors (user_query, item_table; adarec/models/scoring.py) is ranked by
chunked_target_ranks, which holds batch_size x item_chunk scores and a running top-K, never a
users x items matrix. A model with only `score` is ranked on its full score matrix. Per-user
metric sums are accumulated on device and summed across ranks, so the result is an average over
users, not over batches, and no batch waits for the host.

Scores with NaN or +inf are an error, not a number: the users whose ranked scores hold one are
counted with the metric sums (no extra host sync) and, if there are any, the split ends with
NonFiniteScores naming the model, the split and the count. The ranking itself already treats NaN
pessimistically (adarec/metrics.py), so no path lets NaN make a hit.
"""

from __future__ import annotations

import numpy as np
import torch

from adarec.config import EVAL_ITEM_CHUNK
from adarec.data.length_groups import evaluation_batches, sequence_lengths
from adarec.errors import AdarecError
from adarec.metrics import chunked_target_ranks, mask_scores, metric_sums, nonfinite_rows, target_ranks

DEFAULT_ITEM_CHUNK = EVAL_ITEM_CHUNK
NONFINITE = "nonfinite_users"
"""The key of batch_metric_sums' count of users with a NaN or +inf score (not a metric)."""


class NonFiniteScores(AdarecError):
    """A model scored NaN or +inf for some users of a split: its metrics would mean nothing."""


@torch.no_grad()
def batch_metric_sums(model, inputs: torch.Tensor, history: torch.Tensor, targets: torch.Tensor, ks,
                      protocol: str = "full", item_chunk: int = DEFAULT_ITEM_CHUNK,
                      table: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One evaluation batch, on the device and without a host sync: per-metric sums over its users,
    and under NONFINITE the number of its users with a NaN or +inf score.
    table: the model's item_table(), when the caller has it already (it is the same for every batch)."""
    k_max = max(ks)
    if hasattr(model, "user_query"):
        table = model.item_table() if table is None else table
        ranks, nonfinite = chunked_target_ranks(model.user_query(inputs), table, targets, history, k_max,
                                                never_rank=model.never_rank, protocol=protocol,
                                                item_chunk=item_chunk, with_nonfinite=True)
    else:
        masked = mask_scores(model.score(inputs), history, never_rank=model.never_rank, protocol=protocol)
        ranks, nonfinite = target_ranks(masked, targets, k_max), nonfinite_rows(masked)
    return {**metric_sums(ranks, ks), NONFINITE: nonfinite.double().sum()}


@torch.no_grad()
def model_width_buckets(model, buckets):
    """The width buckets a model's batches are trimmed to: none (full width) for a model whose
    reference code reads padding (`trims_batches = False`: DiffuRec and ADRec attend to it)."""
    return buckets if getattr(model, "trims_batches", True) else None


def evaluate_split(model, split, which: str, ks, protocol: str = "full", batch_size: int = 1024,
                   rank: int = 0, world_size: int = 1, item_chunk: int = DEFAULT_ITEM_CHUNK,
                   label: str | None = None, width_buckets=None) -> dict[str, float]:
    """Metrics of `which` split averaged over its users. `label` names the model in the error
    raised when some scores are NaN or +inf (default: the model's class name). `width_buckets`
    (data.width_buckets): batches of users sorted by length, each trimmed to the bucket width of
    its longest input (adarec/data/length_groups.py); None keeps the split's order and width."""
    if which not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {which!r}")
    view = getattr(model, "eval_view", None)
    if view is not None:
        # A model evaluated on another task than the next item (DiffuASR's generator: the items
        # before the sequence) says which inputs, histories and targets rank it.
        inputs, history, targets = view(split, which)
    else:
        inputs = getattr(split, f"{which}_input")
        targets = getattr(split, f"{which}_target")
        history = getattr(split, f"{which}_history")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # Built once per split: an average of models concatenates its members' tables, a cosine
    # model normalises its own; neither depends on the batch.
    table = model.item_table() if hasattr(model, "user_query") else None
    users = np.arange(rank, inputs.shape[0], world_size)
    buckets = model_width_buckets(model, width_buckets)
    # One host read of the lengths per split, then host-side batching (metrics do not depend on order).
    lengths = sequence_lengths(inputs)[users] if buckets is not None else np.zeros(len(users), dtype=np.int64)
    sums = {**metric_sums(torch.empty(0, device=device), ks),
            NONFINITE: torch.zeros((), dtype=torch.float64, device=device)}
    for part, width in evaluation_batches(lengths, batch_size, buckets, inputs.shape[1]):
        idx = torch.from_numpy(users[part]).to(inputs.device)
        batch_sums = batch_metric_sums(model, inputs[:, -width:][idx].to(device), history[idx].to(device),
                                       targets[idx].to(device), ks, protocol, item_chunk, table)
        sums = {k: sums[k] + v for k, v in batch_sums.items()}
    model.train(was_training)
    names = list(sums)
    count = torch.tensor(float(len(users)), dtype=torch.float64, device=device)
    totals = torch.stack([sums[k] for k in names] + [count])
    if world_size > 1:
        torch.distributed.all_reduce(totals)
    totals = totals.cpu()
    users_total = max(float(totals[-1]), 1.0)
    nonfinite = int(totals[names.index(NONFINITE)])
    if nonfinite:
        raise NonFiniteScores(f"{label or type(model).__name__} scored NaN or +inf for {nonfinite} of "
                              f"{int(totals[-1])} users on the {which} split; no metrics are reported for it")
    return {name: float(totals[i]) / users_total for i, name in enumerate(names) if name != NONFINITE}
