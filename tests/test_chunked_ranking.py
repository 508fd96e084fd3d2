"""Chunked ranking (chunked_target_ranks, the evaluator's path) against the full score matrix.

The ranks must be identical to target_ranks(mask_scores(query @ table.T)) and to a per-user
brute force, for every protocol, history format and chunk size; integer-valued factors make the
scores exact whatever the chunking and make the target tie with other candidates on purpose. On
the shipped Beauty data, evaluate_split gives exactly the metrics of the full-matrix path, and a
recorder of every tensor the evaluation creates shows that none is as wide as the catalog.
"""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from adarec.engine.data_setup import load_split
from adarec.engine.evaluator import evaluate_split
from torch.utils._python_dispatch import TorchDispatchMode

from adarec.config import load_config
from adarec.metrics import chunked_target_ranks, mask_scores, target_ranks
from adarec.models import build_members, scorer

REPO = Path(__file__).resolve().parents[1]
N_ITEMS = 29                       # table rows 0..30: padding 0, items 1..29, mask row 30
COLS = N_ITEMS + 2
NEVER = (0, N_ITEMS + 1)
CHUNKS = (1, 3, 7, COLS, COLS + 9)


def tied_case(seed: int = 0):
    """Every item is the target of one user (so targets fall in the first and last chunk and on
    every chunk boundary), plus users whose target is in their history. Scores are small integers."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.cat([torch.arange(1, N_ITEMS + 1), torch.tensor([1, 7, N_ITEMS, 14])])
    users = targets.numel()
    query = torch.randint(-1, 2, (users, 3), generator=g).float()
    table = torch.randint(-2, 3, (COLS, 3), generator=g).float()
    lengths = torch.randint(0, 6, (users,), generator=g)
    hist = [torch.randperm(N_ITEMS, generator=g)[: int(n)].add(1).tolist() for n in lengths]
    for u in range(N_ITEMS, users):          # the last four: target in the history
        hist[u].append(int(targets[u]))
    width = max(len(h) for h in hist)
    index = torch.tensor([h + [0] * (width - len(h)) for h in hist])
    mask = torch.zeros(users, COLS, dtype=torch.bool).scatter_(1, index, True)
    mask[:, 0] = False
    return query, table, targets, hist, index, mask


def brute_ranks(scores, targets, hist, k_max, protocol):
    """Per user: the candidates other than the target scoring at least as high (pessimistic)."""
    out = []
    for u in range(scores.shape[0]):
        h, t = set(hist[u]), int(targets[u])
        cand = {}
        for c in range(scores.shape[1]):
            s = float(scores[u, c])
            if protocol == "full" and (c in NEVER or c in h):
                continue
            if protocol == "unmasked" and c in NEVER and c != 0:
                continue
            cand[c] = 0.0 if (protocol == "compat" and c in h) else s
        if t not in cand:
            out.append(k_max)
            continue
        rank = sum(1 for c, v in cand.items() if c != t and v >= cand[t])
        out.append(min(rank, k_max))
    return out


@pytest.mark.parametrize("protocol", ["full", "compat", "unmasked"])
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("history_format", ["index", "mask"])
@pytest.mark.parametrize("k_max", [1, 5, 40])
def test_chunked_ranks_equal_full_matrix_ranks(protocol, chunk, history_format, k_max):
    query, table, targets, hist, index, mask = tied_case()
    history = index if history_format == "index" else mask
    scores = query @ table.t()
    full = target_ranks(mask_scores(scores, history, never_rank=NEVER, protocol=protocol), targets, k_max)
    got = chunked_target_ranks(query, table, targets, history, k_max, never_rank=NEVER, protocol=protocol,
                               item_chunk=chunk)
    assert got.tolist() == full.tolist()
    assert got.tolist() == brute_ranks(scores, targets, hist, k_max, protocol)


def test_the_tied_case_has_ties_with_the_target_and_hits_at_every_rank():
    """Guards the test above against a case too easy to tell paths apart."""
    query, table, targets, _, _, _ = tied_case()
    scores = query @ table.t()
    target_score = scores.gather(1, targets.view(-1, 1))
    assert ((scores == target_score).sum(1) > 2).sum() > 10
    ranks = chunked_target_ranks(query, table, targets, None, 40, never_rank=NEVER, item_chunk=7)
    assert len(set(ranks.tolist())) > 5


def test_a_target_in_the_history_is_a_miss_under_full_and_scored_zero_under_compat():
    query = torch.tensor([[1.0]])
    table = torch.tensor([[0.0], [3.0], [2.0], [-1.0], [0.0]])    # pad, items 1..3, mask
    target, history = torch.tensor([2]), torch.tensor([[2, 0]])
    for chunk in (1, 2, 5):
        def rank(protocol, chunk=chunk):
            return int(chunked_target_ranks(query, table, target, history, 5, never_rank=(0, 4),
                                            protocol=protocol, item_chunk=chunk))
        assert rank("full") == 5                  # excluded target: a miss (rank capped at k_max)
        assert rank("compat") == 3                # scored 0: item 1 (3), pad (0) and mask (0) beat or tie it
        assert rank("unmasked") == 1              # keeps its score 2: only item 1 (3) is above


def test_bad_arguments_raise():
    query, table, targets = torch.zeros(2, 3), torch.zeros(6, 3), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="item_chunk"):
        chunked_target_ranks(query, table, targets, None, 5, item_chunk=0)
    with pytest.raises(ValueError, match="protocol"):
        chunked_target_ranks(query, table, targets, None, 5, protocol="sampled")
    with pytest.raises(ValueError, match="never_rank"):
        chunked_target_ranks(query, table, targets, None, 5, never_rank=(0, 6))
    with pytest.raises(ValueError, match="exclude mask"):
        chunked_target_ranks(query, table, targets, torch.zeros(2, 5, dtype=torch.bool), 5)
    with pytest.raises(RuntimeError, match="targets"):
        chunked_target_ranks(query, table, torch.tensor([1, 6]), None, 5)


class WidthRecorder(TorchDispatchMode):
    """Records the shape of every tensor any op creates while it is active."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out

    def too_wide(self, bound: int, rows: set[int]) -> list[tuple]:
        """Per-user tensors (dim 0 a batch's row count) with another dimension over bound."""
        return [s for s in self.shapes if len(s) >= 2 and s[0] in rows and max(s[1:]) > bound]


def test_no_tensor_wider_than_a_chunk_is_created():
    g = torch.Generator().manual_seed(3)
    rows, cols, chunk, k_max = 5, 103, 16, 3
    query, table = torch.randn(rows, 4, generator=g), torch.randn(cols, 4, generator=g)
    targets = torch.randint(1, cols - 1, (rows,), generator=g)
    history = torch.randint(0, cols - 1, (rows, 6), generator=g)
    # Scores are [B, chunk]; the history mask of a chunk has one spare column; the running top
    # merge concatenates two tops of k_max + 1.
    bound = max(chunk + 1, 2 * (k_max + 1))
    with WidthRecorder() as rec:
        chunked_target_ranks(query, table, targets, history, k_max, never_rank=(0, cols - 1), item_chunk=chunk)
    assert rec.shapes and rec.too_wide(bound, {rows}) == []
    with WidthRecorder() as control:                      # the recorder does see a full matrix
        target_ranks(mask_scores(query @ table.t(), history, never_rank=(0, cols - 1)), targets, k_max)
    assert (rows, cols) in control.too_wide(bound, {rows})


# ---- evaluate_split on the shipped Beauty data ------------------------------------------------

USERS = 1000
KS = (1, 10, 100, 500)      # deep cut-offs: an untrained model still has hits to compare


class FullMatrixOnly(torch.nn.Module):
    """The model seen through `score` only: the evaluator ranks its full [B, N+2] matrix."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def never_rank(self):
        return self.model.never_rank

    def score(self, input_ids):
        return self.model.score(input_ids)


@pytest.fixture(scope="module")
def beauty():
    cfg = load_config(REPO / "configs" / "quickstart_beauty.yaml")
    split = load_split(cfg, torch.device("cpu"))
    few = {f"valid_{k}": getattr(split, f"valid_{k}")[:USERS] for k in ("input", "target", "history")}
    return SimpleNamespace(**few), split.num_items, split.max_len


def build(name, num_items, max_len, *overrides):
    model_cfg = load_config(REPO / "configs" / "quickstart_beauty.yaml",
                            [f"model.name={name}", "model.hidden_size=32", "model.num_layers=1", *overrides]).model
    torch.manual_seed(0)
    return scorer(build_members(model_cfg, num_items, max_len, "eager"))


@pytest.mark.parametrize(("name", "protocol", "overrides"), [
    ("sasrec", "full", ()),
    ("diffurec", "unmasked", ("model.sample_steps=2", "model.diffusion_steps=4")),
    ("adarec-dual", "full", ("model.rec_loss=bce",)),
])
def test_evaluate_split_on_beauty_matches_the_full_matrix_exactly(beauty, name, protocol, overrides):
    split, num_items, max_len = beauty
    model = build(name, num_items, max_len, *overrides)
    assert hasattr(model, "user_query")
    want = evaluate_split(FullMatrixOnly(model), split, "valid", KS, protocol, batch_size=512)
    assert 0 < want["HR@500"] < 1          # an untrained model: some hits, not all
    for chunk in (num_items + 2, 1000, 4096):
        got = evaluate_split(model, split, "valid", KS, protocol, batch_size=512, item_chunk=chunk)
        assert got == want, chunk


def test_evaluate_split_never_builds_a_users_by_items_matrix(beauty):
    split, num_items, max_len = beauty
    model = build("adarec-dual", num_items, max_len, "model.rec_loss=bce")
    chunk, ks = 1000, (5, 20)
    few = SimpleNamespace(**{k: v[:300] for k, v in vars(split).items()})
    batches = {128, 300 - 2 * 128}
    with WidthRecorder() as rec:
        got = evaluate_split(model, few, "valid", ks, "full", batch_size=128, item_chunk=chunk)
    # The widest per-user tensor is a chunk's history mask (chunk + 1 columns).
    assert rec.too_wide(chunk + 1, batches) == []
    with WidthRecorder() as control:
        want = evaluate_split(FullMatrixOnly(model), few, "valid", ks, "full", batch_size=128)
    assert (128, num_items + 2) in control.too_wide(chunk + 1, batches)
    assert got == want


# ---- NaN scores never make a hit ---------------------------------------------------------------

def nan_case():
    """Target scores and candidates arranged so that each user's true pessimistic rank is known:
    user u's target has `above[u]` finite candidates above it, and the table has NAN_ITEMS items
    scoring NaN for every user (a NaN factor row)."""
    dim, items = 2, 60
    table = torch.zeros(items + 2, dim)
    table[1:items + 1, 0] = torch.arange(items, 0, -1).float()      # item i scores (items + 1 - i) * q0
    nan_items = [5, 11, 40]
    table[nan_items, 1] = float("nan")
    targets = torch.tensor([50, 20, 2, 57, 45])
    query = torch.tensor([[1.0, 0.0]] * targets.numel())
    return query, table, targets, nan_items


def expected_ranks(table, targets, nan_items, k_max):
    """Pessimistic rank with NaN counted above the target: the finite items scoring at least the
    target's score (excluding it), plus the NaN items; never-ranked rows 0 and N+1 left out."""
    out = []
    for t in targets.tolist():
        finite_above = sum(1 for i in range(1, table.shape[0] - 1)
                           if i != t and i not in nan_items and float(table[i, 0]) >= float(table[t, 0]))
        out.append(min(finite_above + len(nan_items), k_max))
    return out


@pytest.mark.parametrize("k_max", [3, 20, 100])
@pytest.mark.parametrize("chunk", [1, 7, 62, 100])
def test_nan_candidates_rank_above_the_target_in_full_and_chunked_ranking(k_max, chunk):
    query, table, targets, nan_items = nan_case()
    never = (0, table.shape[0] - 1)
    want = expected_ranks(table, targets, nan_items, k_max)
    full = target_ranks(mask_scores(query @ table.t(), None, never_rank=never), targets, k_max)
    chunked = chunked_target_ranks(query, table, targets, None, k_max, never_rank=never, item_chunk=chunk)
    assert full.tolist() == want and chunked.tolist() == want
    # The true rank with the NaN items ignored would be lower for every user: NaN never helps.
    assert all(w >= min(r, k_max) for w, r in zip(want, [49, 19, 1, 56, 44], strict=True))


def test_a_nan_target_is_a_miss_and_its_users_are_reported():
    query, table, targets, _ = nan_case()
    query[1] = float("nan")                                     # every score of user 1 is NaN
    never = (0, table.shape[0] - 1)
    ranks, nonfinite = chunked_target_ranks(query, table, targets, None, 20, never_rank=never, item_chunk=9,
                                            with_nonfinite=True)
    assert int(ranks[1]) == 20
    assert nonfinite.tolist() == [True] * targets.numel()      # the NaN items are in every row
    table[[5, 11, 40], 1] = 0.0
    _, nonfinite = chunked_target_ranks(query, table, targets, None, 20, never_rank=never, item_chunk=9,
                                        with_nonfinite=True)
    assert nonfinite.tolist() == [False, True, False, False, False]
