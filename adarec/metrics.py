"""Full-ranking HR@K / NDCG@K / MRR@K: the single place where ranking metrics are computed.

Protocol (docs/method.md section 4): every item is a candidate, the user's history is excluded
(-inf), the padding row 0 and the mask row N+1 are never ranked, one relevant item per user,
NDCG = 1 / log2(rank + 2), MRR = 1 / (rank + 1) (both 0 from rank K on, like HR), averages are
over users.

Ties are broken against the target (pessimistic rank: every other candidate scoring at least as
high counts as ranked above it), so a model that scores everything equally earns nothing. A NaN
score is pessimistic too: a NaN candidate counts as ranked above the target and a NaN target is a
miss, so NaN can only lower a metric, never make a hit. (The evaluator refuses to report metrics
of scores with NaN at all: engine/evaluator.py, `nonfinite_rows`.) The
rank is read off torch.topk of the top K_max + 1 scores, which is exact for ranks below K_max
and costs one top-k per batch on the scores' device.

The compat protocol reproduces the authors' quirk: history items are scored 0 instead of -inf
and the padding/mask rows stay candidates. The unmasked protocol is how DiffuRec and ADRec
evaluate: history items keep their scores and the padding row 0 stays a candidate; rows that are
neither an item nor padding (the mask row) are still never ranked, since those models'
vocabularies have none.

Chunked ranking (chunked_target_ranks, what the evaluator uses): a catalog of a million items
cannot afford a users x items score matrix, so the columns are scored item_chunk at a time from
the model's factors (query @ table[chunk].T), each block is masked by the same mask_block_ that
mask_scores applies to a whole matrix, and a running top-(K_max + 1) of values is kept. Ranks
only depend on the multiset of the top values and on the target's score, both of which the
blocks give exactly, so the ranks are identical to the full matrix's for the same scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from adarec.config import EVAL_ITEM_CHUNK
from adarec.models.scoring import inner_product_scores

PROTOCOLS = ("full", "compat", "unmasked")


METRICS = ("HR", "NDCG", "MRR")
"""The ranking metrics, in the order they are logged."""


def metric_names(ks: Sequence[int]) -> list[str]:
    """The metric keys in the order they are logged: HR@k for all k, then NDCG@k, then MRR@k."""
    return [f"{metric}@{k}" for metric in METRICS for k in ks]


def _check_exclude(exclude: torch.Tensor, rows: int, num_cols: int) -> None:
    """A bool mask must cover every column; an index list must have one row per user."""
    if exclude.dtype == torch.bool:
        if tuple(exclude.shape) != (rows, num_cols):
            raise ValueError(f"exclude mask has shape {tuple(exclude.shape)}, scores {(rows, num_cols)}")
    elif exclude.dim() != 2 or exclude.shape[0] != rows:
        raise ValueError(f"exclude index tensor must be [B, S] with B={rows}, got {tuple(exclude.shape)}")


def _block_exclusion(exclude: torch.Tensor, start: int, width: int) -> torch.Tensor:
    """The bool [B, width] exclusion of columns [start, start + width) from either a full-width
    bool mask or a 0-padded [B, S] index list."""
    if exclude.dtype == torch.bool:
        return exclude[:, start:start + width]
    local = exclude.long() - start
    # Index 0 is the padding of the index list, not an excluded item. Indices outside the block
    # (and the padding) are sent to a spare column past its end, which is then dropped: a scatter
    # with no host-side filtering and no data-dependent shapes.
    inside = (local >= 0) & (local < width) & (exclude != 0)
    mask = torch.zeros((exclude.shape[0], width + 1), dtype=torch.bool, device=exclude.device)
    mask.scatter_(1, torch.where(inside, local, width), True)
    return mask[:, :width]


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")


def _check_never_rank(never_rank: Sequence[int], num_cols: int) -> None:
    bad = [c for c in never_rank if not 0 <= c < num_cols]
    if bad:
        raise ValueError(f"never_rank columns {bad} are outside the {num_cols} scored rows")


def mask_block_(
    block: torch.Tensor,
    start: int,
    exclude: torch.Tensor | None,
    *,
    num_cols: int,
    never_rank: Sequence[int] = (0,),
    protocol: str = "full",
) -> torch.Tensor:
    """Mask, in place, the float block [B, width] holding columns [start, start + width) of a
    [B, num_cols] score matrix, per protocol (module docstring); returns the block.

    The one implementation of the masking rules: mask_scores is this applied to a single block
    starting at column 0, the chunked ranking to each block in turn. exclude: a bool [B, num_cols]
    mask or a 0-padded [B, S] index list (on the block's device), or None.
    """
    _check_protocol(protocol)
    _check_never_rank(never_rank, num_cols)
    width = block.shape[1]
    if start < 0 or start + width > num_cols:
        raise ValueError(f"block [{start}, {start + width}) is outside the {num_cols} columns")
    if protocol == "unmasked":
        # History keeps its scores and padding row 0 stays a candidate; the mask row never ranks.
        never = [c for c in never_rank if c != 0]
    else:
        if exclude is not None:
            _check_exclude(exclude, block.shape[0], num_cols)
            fill = float("-inf") if protocol == "full" else 0.0
            block.masked_fill_(_block_exclusion(exclude, start, width), fill)
        never = list(never_rank) if protocol == "full" else []
    for c in never:
        if start <= c < start + width:
            block[:, c - start] = float("-inf")
    return block


def mask_scores(
    scores: torch.Tensor,
    exclude: torch.Tensor | None,
    *,
    never_rank: Sequence[int] = (0,),
    protocol: str = "full",
) -> torch.Tensor:
    """Return a copy of scores with history and never-ranked columns handled per protocol."""
    if exclude is not None:
        exclude = exclude.to(scores.device)
    return mask_block_(scores.float().clone(), 0, exclude, num_cols=scores.shape[1], never_rank=never_rank,
                       protocol=protocol)


def nonfinite_rows(scores: torch.Tensor) -> torch.Tensor:
    """bool [B]: the rows of a masked score block [B, width] holding NaN or +inf. Masking only ever
    writes -inf (or 0 under compat), so these come from the model."""
    return (torch.isnan(scores) | torch.isposinf(scores)).any(dim=1)


def _ranks_from_top(top: torch.Tensor, target_score: torch.Tensor, k_max: int) -> torch.Tensor:
    """Pessimistic 0-based ranks from the top min(k_max + 1, C) values [B, k] and the target's
    score [B]: the number of top values >= the target's is rank + 1 whenever rank < k_max.

    torch.topk orders NaN above every number, so NaN candidates fill the first top slots; each
    counts as at least the target's score (a comparison with NaN is false, hence the isnan)."""
    at_least = ((top >= target_score.unsqueeze(1)) | torch.isnan(top)).sum(dim=1)
    ranks = at_least - 1
    # A target scored -inf (excluded) or NaN is never a hit.
    miss = (at_least > k_max) | ~torch.isfinite(target_score)
    return torch.where(miss, torch.full_like(ranks, k_max), ranks)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, k_max: int) -> torch.Tensor:
    """0-based pessimistic rank of each target among the columns, capped at k_max (= a miss).

    scores must already be masked (see mask_scores). Uses topk(k_max + 1): the number of top
    values >= the target's score is rank + 1 whenever rank < k_max.
    """
    k = min(k_max + 1, scores.shape[1])
    top = torch.topk(scores, k, dim=1).values
    target_score = scores.gather(1, targets.long().view(-1, 1)).squeeze(1)
    return _ranks_from_top(top, target_score, k_max)


def merge_top(running: torch.Tensor | None, block: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest values per row [B, <=k] of the running top and a new block [B, width].

    Only values are kept: the pessimistic rank counts values >= the target's, so which column
    a tied value came from does not matter, and the merged values equal topk over all columns
    (torch.topk orders NaN above everything, in a block as in the whole row)."""
    top = torch.topk(block, min(k, block.shape[1]), dim=1).values
    if running is None:
        return top
    both = torch.cat([running, top], dim=1)
    return torch.topk(both, min(k, both.shape[1]), dim=1).values


def chunked_target_ranks(
    query: torch.Tensor,
    table: torch.Tensor,
    targets: torch.Tensor,
    exclude: torch.Tensor | None,
    k_max: int,
    *,
    never_rank: Sequence[int] = (0,),
    protocol: str = "full",
    item_chunk: int = EVAL_ITEM_CHUNK,
    with_nonfinite: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """target_ranks(mask_scores(query @ table.T, ...)) without the [B, N+2] score matrix; with
    `with_nonfinite`, also nonfinite_rows of that matrix (bool [B]), gathered block by block.

    query [B, D] and table [C, D] are a model's scoring factors (adarec/models/scoring.py). The
    columns are scored item_chunk at a time with the same inner_product_scores the models use,
    each block is masked by mask_block_, its top values are merged into a running
    top-(k_max + 1), and the target's score is read out of the block that holds it, so it is the
    very value the candidates are compared with. No device value steers Python: the loop runs
    over column offsets only, and the target is picked out of every block with torch.where.
    """
    if item_chunk < 1:
        raise ValueError(f"item_chunk must be >= 1, got {item_chunk}")
    if query.dim() != 2 or table.dim() != 2 or query.shape[1] != table.shape[1]:
        raise ValueError(f"query must be [B, D] and table [C, D]; got {tuple(query.shape)}, {tuple(table.shape)}")
    rows, num_cols = query.shape[0], table.shape[0]
    if targets.shape != (rows,):
        raise ValueError(f"targets must be [B] with B={rows}, got {tuple(targets.shape)}")
    _check_protocol(protocol)
    _check_never_rank(never_rank, num_cols)
    targets = targets.to(query.device).long()
    if exclude is not None:
        exclude = exclude.to(query.device)
        _check_exclude(exclude, rows, num_cols)
    # The full matrix's gather fails on a target outside the columns; here no block would hold
    # it. Asserted on the device, so the batch still runs without a host sync.
    torch._assert_async(((targets >= 0) & (targets < num_cols)).all(),
                        f"targets must be row ids in [0, {num_cols})")
    k = min(k_max + 1, num_cols)
    top = None
    target_score = torch.full((rows,), float("nan"), device=query.device)
    nonfinite = torch.zeros(rows, dtype=torch.bool, device=query.device)
    for start in range(0, num_cols, item_chunk):
        block = inner_product_scores(query, table[start:start + item_chunk])
        width = block.shape[1]
        mask_block_(block, start, exclude, num_cols=num_cols, never_rank=never_rank, protocol=protocol)
        local = targets - start
        held = (local >= 0) & (local < width)
        picked = block.gather(1, local.clamp(0, width - 1).unsqueeze(1)).squeeze(1)
        target_score = torch.where(held, picked, target_score)
        top = merge_top(top, block, k)
        if with_nonfinite:
            nonfinite |= nonfinite_rows(block)
    ranks = _ranks_from_top(top, target_score, k_max)
    return (ranks, nonfinite) if with_nonfinite else ranks


def metrics_from_ranks(ranks: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Average HR@K, NDCG@K and MRR@K over users from 0-based ranks (rank >= K is a miss)."""
    sums = metric_sums(ranks, ks)
    n = max(int(ranks.numel()), 1)
    return {name: float(value) / n for name, value in sums.items()}


def metric_sums(ranks: torch.Tensor, ks: Sequence[int]) -> dict[str, torch.Tensor]:
    """Per-metric sums over users (device tensors), so batches and ranks can be added up; keys
    in metric_names order."""
    ranks = ranks.double()
    per_user = {"HR": torch.ones_like(ranks), "NDCG": 1.0 / torch.log2(ranks + 2.0), "MRR": 1.0 / (ranks + 1.0)}
    zeros = torch.zeros_like(ranks)
    return {f"{metric}@{k}": torch.where(ranks < k, per_user[metric], zeros).sum()
            for metric in METRICS for k in ks}


def rank_metrics(
    scores: torch.Tensor,
    targets: torch.Tensor,
    exclude: torch.Tensor | None = None,
    ks: Sequence[int] = (5, 10, 20),
    *,
    never_rank: Sequence[int] = (0,),
    protocol: str = "full",
) -> dict[str, float]:
    """HR@K, NDCG@K and MRR@K of one batch of full-ranking scores, averaged over its users.

    scores: [B, C] with column c = item id c (column 0 = padding; the mask row, if the model
    scores it, is passed in never_rank). targets: [B] item ids. exclude: bool [B, C] or a
    0-padded [B, S] tensor of item ids to remove from ranking (the user's history).
    """
    if scores.dim() != 2 or targets.shape != (scores.shape[0],):
        raise ValueError(f"scores must be [B, C] and targets [B]; got {tuple(scores.shape)}, {tuple(targets.shape)}")
    if not ks or min(ks) <= 0:
        raise ValueError(f"ks must be positive, got {list(ks)}")
    masked = mask_scores(scores, exclude, never_rank=never_rank, protocol=protocol)
    return metrics_from_ranks(target_ranks(masked, targets, max(ks)), ks)


def ndcg_gain(rank: int) -> float:
    """NDCG of one hit at 0-based rank (for documentation and brute-force checks)."""
    return 1.0 / math.log2(rank + 2)


def reciprocal_rank(rank: int) -> float:
    """MRR of one hit at 0-based rank (for documentation and brute-force checks)."""
    return 1.0 / (rank + 1)
