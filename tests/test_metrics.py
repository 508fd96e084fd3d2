"""rank_metrics (and the chunked ranking) against a brute-force per-user computation."""

import math

import pytest
import torch

from adarec.metrics import (
    chunked_target_ranks,
    metric_names,
    metrics_from_ranks,
    rank_metrics,
    reciprocal_rank,
    target_ranks,
)


def brute_ranks(scores, targets, exclude_lists, never_rank=(0,), protocol="full"):
    """Per user, the explicit 0-based pessimistic rank of the target (None: a miss at every K).
    Loops over users and candidates, independent of the implementation: a candidate other than
    the target counts above it when it scores at least as high or is NaN; a NaN or excluded
    target is a miss."""
    out = []
    n_users, n_cols = scores.shape
    for u in range(n_users):
        s = [float(v) for v in scores[u]]
        hist = {int(i) for i in exclude_lists[u] if int(i) > 0}
        cand = []
        for c in range(n_cols):
            if protocol == "full" and (c in never_rank or c in hist):
                continue
            if protocol == "unmasked" and c in never_rank and c != 0:
                continue
            cand.append((c, 0.0 if (protocol == "compat" and c in hist) else s[c]))
        t = int(targets[u])
        score_of = dict(cand)
        if t not in score_of or math.isnan(score_of[t]):
            out.append(None)
            continue
        out.append(sum(1 for c, v in cand if c != t and (math.isnan(v) or v >= score_of[t])))
    return out


def brute_force(scores, targets, exclude_lists, ks, never_rank=(0,), protocol="full"):
    """HR, NDCG and MRR averaged over users from brute_ranks, written out per metric."""
    sums = dict.fromkeys(metric_names(ks), 0.0)
    ranks = brute_ranks(scores, targets, exclude_lists, never_rank, protocol)
    for rank in ranks:
        if rank is None:
            continue  # excluded or NaN target: a miss for every K
        for k in ks:
            if rank < k:
                sums[f"HR@{k}"] += 1
                sums[f"NDCG@{k}"] += 1 / math.log2(rank + 2)
                sums[f"MRR@{k}"] += 1 / (rank + 1)
    return {k: v / len(ranks) for k, v in sums.items()}


def padded(lists):
    width = max(1, max(len(x) for x in lists))
    return torch.tensor([list(x) + [0] * (width - len(x)) for x in lists], dtype=torch.long)


@pytest.mark.parametrize("protocol", ["full", "compat", "unmasked"])
def test_matches_brute_force_with_ties_and_exclusions(protocol):
    gen = torch.Generator().manual_seed(0)
    n_users, n_cols = 37, 30
    # Integer-valued scores make ties frequent.
    scores = torch.randint(-3, 4, (n_users, n_cols), generator=gen).float()
    targets = torch.randint(1, n_cols - 1, (n_users,), generator=gen)
    exclude = [torch.randperm(n_cols - 2, generator=gen)[: u % 6].add(1).tolist() for u in range(n_users)]
    # Some users have their target in the history (must be a miss under "full").
    exclude[3].append(int(targets[3]))
    ks = (1, 5, 10, 40)  # 40 > number of candidates: every non-excluded target is a hit
    never = (0, n_cols - 1)
    got = rank_metrics(scores, targets, padded(exclude), ks, never_rank=never, protocol=protocol)
    want = brute_force(scores, targets, exclude, ks, never_rank=never, protocol=protocol)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name], abs=1e-12), name


def test_bool_mask_equals_index_list():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(8, 20, generator=gen)
    targets = torch.randint(1, 20, (8,), generator=gen)
    idx = torch.randint(1, 20, (8, 4), generator=gen)
    mask = torch.zeros(8, 20, dtype=torch.bool).scatter_(1, idx, True)
    assert rank_metrics(scores, targets, idx) == rank_metrics(scores, targets, mask)


def test_known_ranks_and_gains():
    scores = torch.tensor([[0.0, 5.0, 4.0, 3.0, 2.0, 1.0]] * 3)
    targets = torch.tensor([1, 3, 5])  # ranks 0, 2, 4 among columns 1..5
    ranks = target_ranks(scores.clone().index_fill_(1, torch.tensor([0]), float("-inf")), targets, 20)
    assert ranks.tolist() == [0, 2, 4]
    m = rank_metrics(scores, targets, ks=(1, 3))
    assert m["HR@1"] == pytest.approx(1 / 3)
    assert m["HR@3"] == pytest.approx(2 / 3)
    assert m["NDCG@3"] == pytest.approx((1 + 1 / math.log2(4)) / 3)


def test_all_equal_scores_earn_nothing():
    scores = torch.zeros(4, 50)
    targets = torch.tensor([1, 2, 3, 4])
    m = rank_metrics(scores, targets, ks=(5, 20))
    assert all(v == 0 for v in m.values())


def test_padding_column_never_ranked_under_full():
    scores = torch.tensor([[9.0, 1.0, 0.5]])
    assert rank_metrics(scores, torch.tensor([1]), ks=(1,))["HR@1"] == 1.0
    assert rank_metrics(scores, torch.tensor([1]), ks=(1,), protocol="compat")["HR@1"] == 0.0


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        rank_metrics(torch.zeros(3, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        rank_metrics(torch.zeros(3, 5), torch.zeros(3, dtype=torch.long), ks=())


def test_unmasked_keeps_history_and_padding_as_scored_candidates():
    """DiffuRec's and ADRec's evaluation: a history item or the padding row scoring above the
    target pushes it down; the mask row (not in their vocabularies) still never ranks."""
    scores = torch.tensor([[9.0, 1.0, 5.0, 3.0, 8.0]])       # rows: pad, items 1..3, mask
    target, history = torch.tensor([3]), torch.tensor([[2]])
    full = rank_metrics(scores, target, history, ks=(1, 2, 3), never_rank=(0, 4), protocol="full")
    unmasked = rank_metrics(scores, target, history, ks=(1, 2, 3), never_rank=(0, 4), protocol="unmasked")
    assert full["HR@1"] == 1.0                                # item 3 beats item 1 once 2, pad, mask are out
    assert unmasked["HR@2"] == 0.0 and unmasked["HR@3"] == 1.0   # pad (9) and item 2 (5) rank above it


def test_metric_names_order():
    assert metric_names((5, 20)) == ["HR@5", "HR@20", "NDCG@5", "NDCG@20", "MRR@5", "MRR@20"]


def test_mrr_from_explicit_ranks():
    """Ranks 0, 1, 3, 9 and a miss: MRR@K is 1 / (rank + 1) below K, 0 from K on."""
    ranks = torch.tensor([0, 1, 3, 9, 20])
    m = metrics_from_ranks(ranks, (1, 4, 10))
    assert m["MRR@1"] == pytest.approx(1 / 5)
    assert m["MRR@4"] == pytest.approx((1 + 1 / 2 + 1 / 4) / 5)
    assert m["MRR@10"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 1 / 10) / 5)
    assert [reciprocal_rank(r) for r in (0, 1, 3)] == [1.0, 0.5, 0.25]
    assert list(m) == metric_names((1, 4, 10))


def test_mrr_known_ranks_with_ties_and_history():
    """Pessimistic ties: a target tied with two other items has rank 2, not 0."""
    scores = torch.tensor([[0.0, 5.0, 5.0, 5.0, 1.0, 0.5],      # target 2 tied with 1 and 3: rank 2
                           [0.0, 9.0, 5.0, 4.0, 1.0, 0.5],      # target 3 under 1 (history) and 2: rank 1
                           [0.0, 9.0, 5.0, 4.0, 1.0, 0.5]])     # target 1 in the history: a miss
    targets, history = torch.tensor([2, 3, 1]), torch.tensor([[0], [1], [1]])
    m = rank_metrics(scores, targets, history, ks=(1, 2, 3))
    assert m["MRR@1"] == 0.0
    assert m["MRR@2"] == pytest.approx((1 / 2) / 3)
    assert m["MRR@3"] == pytest.approx((1 / 3 + 1 / 2) / 3)
    assert m["MRR@3"] == pytest.approx(brute_force(scores, targets, [[], [1], [1]], (3,))["MRR@3"])


def nan_case(seed: int):
    """Integer factors (exact scores, many ties), a NaN item column and a user whose scores are
    all NaN, histories of varying length, one user with the target in the history."""
    g = torch.Generator().manual_seed(seed)
    users, cols = 23, 17                       # columns: padding 0, items 1..15, mask 16
    query = torch.randint(-1, 2, (users, 3), generator=g).float()
    table = torch.randint(-2, 3, (cols, 3), generator=g).float()
    table[5] = float("nan")                    # item 5 scores NaN for every user
    query[4] = float("nan")                    # user 4 scores NaN everywhere (a NaN target: a miss)
    targets = torch.randint(1, cols - 1, (users,), generator=g)
    targets[7] = 5                             # a NaN target
    hist = [torch.randperm(cols - 2, generator=g)[: u % 5].add(1).tolist() for u in range(users)]
    hist[2].append(int(targets[2]))
    return query, table, targets, hist


@pytest.mark.parametrize("protocol", ["full", "compat", "unmasked"])
@pytest.mark.parametrize("seed", [0, 1])
def test_all_metrics_with_nan_match_brute_force_full_and_chunked(protocol, seed):
    """MRR (with HR and NDCG) of NaN-holding, tied scores: the full matrix and the chunked ranking
    at several chunk sizes equal the brute force, for every protocol."""
    query, table, targets, hist = nan_case(seed)
    scores = query @ table.t()
    never, ks = (0, table.shape[0] - 1), (1, 3, 5, 30)
    want = brute_force(scores, targets, hist, ks, never_rank=never, protocol=protocol)
    assert any(v > 0 for k, v in want.items() if k.startswith("MRR@"))
    got = rank_metrics(scores, targets, padded(hist), ks, never_rank=never, protocol=protocol)
    assert list(got) == list(want)
    for name in want:
        assert got[name] == pytest.approx(want[name], abs=1e-12), name
    expected_ranks = [max(ks) if r is None else min(r, max(ks))
                      for r in brute_ranks(scores, targets, hist, never, protocol)]
    for chunk in (1, 4, table.shape[0]):
        ranks = chunked_target_ranks(query, table, targets, padded(hist), max(ks), never_rank=never,
                                     protocol=protocol, item_chunk=chunk)
        assert ranks.tolist() == expected_ranks, chunk
        assert metrics_from_ranks(ranks, ks) == pytest.approx(got, abs=1e-12), chunk
