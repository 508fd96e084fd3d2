"""Full-ranking HR@K / NDCG@K: the single place where ranking metrics are computed.

Protocol (docs/method.md section 4): every item is a candidate, the user's history is excluded
(-inf), the padding row 0 and the mask row N+1 are never ranked, one relevant item per user,
NDCG = 1 / log2(rank + 2), averages are over users.

Ties are broken against the target (pessimistic rank: every other candidate scoring at least as
high counts as ranked above it), so a model that scores everything equally earns nothing. The
rank is read off torch.topk of the top K_max + 1 scores, which is exact for ranks below K_max
and costs one top-k per batch on the scores' device.

The compat protocol reproduces the authors' quirk: history items are scored 0 instead of -inf
and the padding/mask rows stay candidates. The unmasked protocol is how DiffuRec and ADRec
evaluate: history items keep their scores and the padding row 0 stays a candidate; rows that are
neither an item nor padding (the mask row) are still never ranked, since those models'
vocabularies have none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

PROTOCOLS = ("full", "compat", "unmasked")


def metric_names(ks: Sequence[int]) -> list[str]:
    """The metric keys in the order they are logged: HR@k for all k, then NDCG@k."""
    return [f"HR@{k}" for k in ks] + [f"NDCG@{k}" for k in ks]


def _exclusion_mask(exclude: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A bool [B, C] mask from either a bool mask or a 0-padded [B, S] index tensor."""
    if exclude.dtype == torch.bool:
        if exclude.shape != shape:
            raise ValueError(f"exclude mask has shape {tuple(exclude.shape)}, scores {tuple(shape)}")
        return exclude
    if exclude.dim() != 2 or exclude.shape[0] != shape[0]:
        raise ValueError(f"exclude index tensor must be [B, S] with B={shape[0]}, got {tuple(exclude.shape)}")
    mask = torch.zeros(shape, dtype=torch.bool, device=exclude.device)
    mask.scatter_(1, exclude.long(), True)
    # Index 0 is the padding of the index list, not an excluded item.
    mask[:, 0] = False
    return mask


def mask_scores(
    scores: torch.Tensor,
    exclude: torch.Tensor | None,
    *,
    never_rank: Sequence[int] = (0,),
    protocol: str = "full",
) -> torch.Tensor:
    """Return a copy of scores with history and never-ranked columns handled per protocol."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    scores = scores.float().clone()
    if protocol == "unmasked":
        never = [c for c in never_rank if c != 0]
        if never:
            scores[:, never] = float("-inf")
        return scores
    if exclude is not None:
        hist = _exclusion_mask(exclude.to(scores.device), scores.shape)
        fill = float("-inf") if protocol == "full" else 0.0
        scores.masked_fill_(hist, fill)
    if protocol == "full" and len(never_rank):
        scores[:, list(never_rank)] = float("-inf")
    return scores


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, k_max: int) -> torch.Tensor:
    """0-based pessimistic rank of each target among the columns, capped at k_max (= a miss).

    scores must already be masked (see mask_scores). Uses topk(k_max + 1): the number of top
    values >= the target's score is rank + 1 whenever rank < k_max.
    """
    k = min(k_max + 1, scores.shape[1])
    top = torch.topk(scores, k, dim=1).values
    target_score = scores.gather(1, targets.long().view(-1, 1))
    at_least = (top >= target_score).sum(dim=1)
    ranks = at_least - 1
    # A target scored -inf (excluded) or NaN is never a hit.
    miss = (at_least > k_max) | ~torch.isfinite(target_score.squeeze(1))
    return torch.where(miss, torch.full_like(ranks, k_max), ranks)


def metrics_from_ranks(ranks: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Average HR@K and NDCG@K over users from 0-based ranks (rank >= K is a miss)."""
    sums = metric_sums(ranks, ks)
    n = max(int(ranks.numel()), 1)
    return {name: float(value) / n for name, value in sums.items()}


def metric_sums(ranks: torch.Tensor, ks: Sequence[int]) -> dict[str, torch.Tensor]:
    """Per-metric sums over users (device tensors), so batches and ranks can be added up."""
    ranks = ranks.double()
    gains = 1.0 / torch.log2(ranks + 2.0)
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        out[f"HR@{k}"] = (ranks < k).double().sum()
    for k in ks:
        out[f"NDCG@{k}"] = torch.where(ranks < k, gains, torch.zeros_like(gains)).sum()
    return out


def rank_metrics(
    scores: torch.Tensor,
    targets: torch.Tensor,
    exclude: torch.Tensor | None = None,
    ks: Sequence[int] = (5, 10, 20),
    *,
    never_rank: Sequence[int] = (0,),
    protocol: str = "full",
) -> dict[str, float]:
    """HR@K and NDCG@K of one batch of full-ranking scores, averaged over its users.

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
