"""Tests for adarec.data: reading, split, augmentation, negative sampling, batch sampler."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from adarec.data import (
    SplitData,
    TrainBatchSampler,
    UserSequences,
    build_split,
    crop,
    mask,
    random_views,
    read_sequences,
    reorder,
    sample_negatives,
)
from adarec.errors import DataError

BEAUTY = Path(__file__).resolve().parents[1] / "data" / "Beauty.txt"


def write(tmp_path: Path, text: str, name: str = "d.txt") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def left_pad(seq: list[int], width: int) -> list[int]:
    return [0] * (width - len(seq)) + list(seq)


# ---------------------------------------------------------------- reading + split


def test_read_plain(tmp_path: Path) -> None:
    p = write(tmp_path, "5 1 2 3\n\n   \n9 4 3 2 1 6\n")
    s = read_sequences(p)
    assert len(s) == 2 and s.num_items == 6 and s.source == str(p)
    assert s.user_ids.tolist() == [5, 9]
    assert s.sequence(1).tolist() == [4, 3, 2, 1, 6]
    assert s.lengths().tolist() == [3, 5]
    assert s.items.dtype == np.int64 and s.offsets.dtype == np.int64
    assert len(read_sequences(p, max_users=1)) == 1


def test_split_hand_computed(tmp_path: Path) -> None:
    long_seq = list(range(1, 9))  # 8 items, longer than max_len 4
    p = write(tmp_path, "1 " + " ".join(map(str, long_seq)) + "\n2 9 10 11\n3 3 9 4 5\n")
    sp = build_split(read_sequences(p), max_len=4)
    assert sp.max_len == 4 and sp.num_items == 11 and sp.num_users() == 3
    # user 0: s[:-3] = 1..5 -> keep last 4; user 1 (3 items) has no training row.
    assert sp.train_user.tolist() == [0, 2]
    assert sp.train_input.tolist() == [[2, 3, 4, 5], [0, 0, 0, 3]]
    assert sp.train_target.tolist() == [[3, 4, 5, 6], [0, 0, 0, 9]]
    assert sp.valid_input.tolist() == [[3, 4, 5, 6], [0, 0, 0, 9], [0, 0, 3, 9]]
    assert sp.valid_target.tolist() == [7, 10, 4]
    assert sp.test_input.tolist() == [[4, 5, 6, 7], [0, 0, 9, 10], [0, 3, 9, 4]]
    assert sp.test_target.tolist() == [8, 11, 5]
    # Histories are not truncated to max_len.
    assert sp.valid_history.tolist() == [[1, 2, 3, 4, 5, 6], left_pad([9], 6), left_pad([3, 9], 6)]
    assert sp.test_history.tolist() == [list(range(1, 8)), left_pad([9, 10], 7),
                                        left_pad([3, 9, 4], 7)]
    sentinel = 2 * 11 + 8 + 1
    assert sp.seen_count.tolist() == [8, 3, 4]
    assert sp.seen_sorted.tolist() == [list(range(1, 9)), [9, 10, 11] + [sentinel] * 5,
                                       [3, 4, 5, 9] + [sentinel] * 4]
    for t in (sp.train_input, sp.valid_target, sp.seen_sorted, sp.train_user):
        assert t.dtype == torch.int64


def test_split_shorten(tmp_path: Path) -> None:
    p = write(tmp_path, "1 1 2 3 4 5 6 7 8\n2 9 10 11\n3 3 9 4 5\n")
    sp = build_split(read_sequences(p), max_len=50, shorten_seq_to=2)
    assert sp.max_len == 5
    assert sp.train_user.tolist() == [0, 2]
    assert sp.train_input.tolist() == [left_pad([4, 5], 5), left_pad([3], 5)]
    assert sp.train_target.tolist() == [left_pad([5, 6], 5), left_pad([9], 5)]
    assert sp.valid_input.tolist() == [left_pad([5, 6], 5), left_pad([9], 5), left_pad([3, 9], 5)]
    assert sp.test_input.tolist() == [left_pad([6, 7], 5), left_pad([9, 10], 5), left_pad([9, 4], 5)]
    assert sp.valid_target.tolist() == [7, 10, 4] and sp.test_target.tolist() == [8, 11, 5]
    assert sp.valid_history.tolist() == [[5, 6], [0, 9], [3, 9]]
    assert sp.test_history.tolist() == [[6, 7], [9, 10], [9, 4]]
    # Negatives must still avoid the whole sequence.
    assert sp.seen_count.tolist() == [8, 3, 4]
    with pytest.raises(ValueError, match="shorten_seq_to"):
        build_split(read_sequences(p), shorten_seq_to=0)


def test_seen_sorted_with_repeats(tmp_path: Path) -> None:
    p = write(tmp_path, "1 7 3 7 3 9 1\n2 4 4 4\n")
    sp = build_split(read_sequences(p), max_len=5)
    sentinel = 2 * 9 + 4 + 1
    assert sp.seen_count.tolist() == [4, 1]
    assert sp.seen_sorted.tolist() == [[1, 3, 7, 9], [4] + [sentinel] * 3]
    assert sp.train_input.tolist() == [[0, 0, 7, 3, 7]]
    assert sp.train_target.tolist() == [[0, 0, 3, 7, 3]]


def test_split_to_device_and_sequences_check() -> None:
    seqs = UserSequences(items=np.array([1, 2], dtype=np.int64), offsets=np.array([0, 2]),
                         user_ids=np.array([4]), num_items=2, source="mem")
    with pytest.raises(DataError, match="user 4 has 2 items"):
        build_split(seqs)
    seqs = UserSequences(items=np.array([1, 2, 3, 4]), offsets=np.array([0, 4]),
                         user_ids=np.array([1]), num_items=4, source="mem")
    sp = build_split(seqs).to("cpu")
    assert isinstance(sp, SplitData) and sp.train_input.shape == (1, 50)


@pytest.mark.parametrize(
    ("text", "lineno", "needle"),
    [
        ("1 1 2 3\n2 4 x5 6\n", 2, "'x5'"),
        ("1 1 2 3\n2 4 1_0 6\n", 2, "'1_0'"),
        ("1 1 2 3\n\n2 4 0 6\n", 3, "item id 0 out of range; item ids start at 1"),
        ("1 1 -2 3\n", 1, "item id -2 out of range"),
        ("1 1 2 3\n2 1 2147483648 3\n", 2, "item id 2147483648 out of range"),
        ("1 1 2 3\n2 1 2\n", 2, "user 2 has 2 items; at least 3 are needed (train/valid/test)"),
        ("5 1 2 3\n6 1 2 3\n5 1 2 3\n", 3, "user id 5 appears again (first on line 1)"),
        ("4294967296 1 2 3\n", 1, "user id 4294967296 out of range"),
    ],
)
def test_bad_plain_lines(tmp_path: Path, text: str, lineno: int, needle: str) -> None:
    p = write(tmp_path, text, "bad.txt")
    with pytest.raises(DataError) as e:
        read_sequences(p)
    assert str(e.value).startswith(f"{p}:{lineno}: ")
    assert needle in str(e.value)


def test_bad_whole_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing.txt: no such file"):
        read_sequences(tmp_path / "missing.txt")
    p = write(tmp_path, "\n  \n", "empty.txt")
    with pytest.raises(DataError, match="empty.txt: no users"):
        read_sequences(p)
    q = tmp_path / "bin.txt"
    q.write_bytes(b"1 2 3 \xff\n")
    with pytest.raises(DataError, match="bin.txt: not a UTF-8"):
        read_sequences(q)


INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def test_inter_file(tmp_path: Path) -> None:
    rows = [
        ("ua", "i1", 5, 30), ("ub", "i2", 4, 10), ("ua", "i3", 3, 10), ("ua", "i2", 1, 20),
        ("ub", "i4", 2, 5), ("ub", "i1", 1, 10), ("ua", "i5", 1, 40), ("ub", "i3", 1, 50),
    ]
    text = INTER_HEADER + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows)
    p = write(tmp_path, text, "x.inter")
    s = read_sequences(p)
    # Items numbered by first appearance in the file: i1=1 i2=2 i3=3 i4=4 i5=5.
    assert s.num_items == 5 and s.user_ids.tolist() == [1, 2]
    # ua by time: i3(10) i2(20) i1(30) i5(40); ub: i4(5) i2(10) i1(10, tie -> file order) i3(50).
    assert s.sequence(0).tolist() == [3, 2, 1, 5]
    assert s.sequence(1).tolist() == [4, 2, 1, 3]
    sp = build_split(s, max_len=3)
    assert sp.train_input.tolist() == [[0, 0, 3], [0, 0, 4]]
    assert sp.train_target.tolist() == [[0, 0, 2], [0, 0, 2]]
    assert sp.valid_target.tolist() == [1, 1] and sp.test_target.tolist() == [5, 3]
    assert sp.test_input.tolist() == [[3, 2, 1], [4, 2, 1]]
    one = read_sequences(p, max_users=1)
    # Only ua's rows count for numbering: i1=1 i3=2 i2=3 i5=4.
    assert len(one) == 1 and one.num_items == 4 and one.sequence(0).tolist() == [2, 3, 1, 4]


@pytest.mark.parametrize(
    ("text", "lineno", "needle"),
    [
        ("user_id:token\titem_id:token\n1\t2\n", 1, "columns found: user_id, item_id"),
        (INTER_HEADER + "1\t2\t3\t4\n1\t2\t3\tsoon\n", 3, "'soon'"),
        (INTER_HEADER + "1\t2\t3\t4\n1\t2\t3\n", 3, "3 fields, the header has 4"),
        (INTER_HEADER + "1\t2\t3\t4\n1\t3\t3\t5\n2\t2\t3\t4\n", 2, "user 1 has 2 items"),
    ],
)
def test_bad_inter(tmp_path: Path, text: str, lineno: int, needle: str) -> None:
    p = write(tmp_path, text, "bad.inter")
    with pytest.raises(DataError) as e:
        read_sequences(p)
    assert str(e.value).startswith(f"{p}:{lineno}: ")
    assert needle in str(e.value)


def test_beauty_smoke() -> None:
    if not BEAUTY.exists():
        pytest.skip("Beauty.txt not present")
    t0 = time.perf_counter()
    s = read_sequences(BEAUTY)
    t1 = time.perf_counter()
    sp = build_split(s)
    t2 = time.perf_counter()
    assert len(s) == 22363 and s.num_items == 12101
    assert t1 - t0 < 1.5 and t2 - t1 < 3.0
    assert sp.valid_input.shape == (22363, 50) and sp.train_input.shape[1] == 50
    for u in range(0, 22363, 997):
        uniq = np.unique(s.sequence(u))
        assert sp.seen_count[u] == len(uniq)
        assert sp.seen_sorted[u, : len(uniq)].tolist() == uniq.tolist()
    lens = torch.from_numpy(s.lengths())
    assert (sp.test_target == torch.from_numpy(s.items[s.offsets[1:] - 1])).all()
    assert ((sp.valid_input > 0).sum(1) == (lens - 2).clamp(max=50)).all()


# ---------------------------------------------------------------- negatives


def test_sample_negatives_exact_and_uniform() -> None:
    n_items = 12
    seen_lists = [[2, 5, 6, 11], list(range(1, 12)), [1], [12], []]
    width = max(map(len, seen_lists))
    sentinel = 2 * n_items + width + 1
    seen = torch.tensor([s + [sentinel] * (width - len(s)) for s in seen_lists])
    count = torch.tensor([len(s) for s in seen_lists])
    gen = torch.Generator().manual_seed(0)
    draws = sample_negatives(seen, count, torch.zeros(5, 6000, dtype=torch.int64), n_items, gen)
    assert draws.shape == (5, 6000) and draws.dtype == torch.int64
    assert int(draws.min()) >= 1 and int(draws.max()) <= n_items
    assert (draws[1] == 12).all()  # the only unseen item
    for row, s in enumerate(seen_lists):
        unseen = [i for i in range(1, n_items + 1) if i not in s]
        counts = torch.bincount(draws[row], minlength=n_items + 1)
        assert counts[s].sum() == 0 and counts[0] == 0
        expected = 6000 / len(unseen)
        chi2 = float(((counts[unseen].double() - expected) ** 2 / expected).sum())
        assert chi2 < 40.0, (row, counts.tolist())  # df <= 11: p ~ 1e-4 at 40


# ---------------------------------------------------------------- augmentation


def make_rows(lengths: list[int], width: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([left_pad(list(range(100 + 10 * i, 100 + 10 * i + n)), width)
                        for i, n in enumerate(lengths)])
    return ids, torch.tensor(lengths)


LENGTHS = [1, 2, 3, 5, 7, 10, 10, 4] * 8


def test_crop_invariants() -> None:
    ids, lens = make_rows(LENGTHS)
    out = crop(ids, lens, 0.2, torch.Generator().manual_seed(1))
    for row, n in enumerate(LENGTHS):
        k = max(1, int(0.2 * n))
        orig = ids[row, 10 - n :].tolist()
        got = out[row].tolist()
        assert got[: 10 - k] == [0] * (10 - k)
        window = got[10 - k :]
        assert any(orig[s : s + k] == window for s in range(n - k + 1))
    assert torch.equal(out, crop(ids, lens, 0.2, torch.Generator().manual_seed(1)))
    # With a large ratio every start must show up eventually (start is uniform over 0..n-k).
    starts = {int(crop(ids[5:6], lens[5:6], 0.5, g)[0, 5]) for g in
              [torch.Generator().manual_seed(i) for i in range(200)]}
    assert starts == set(range(150, 156))


def test_mask_invariants() -> None:
    ids, lens = make_rows(LENGTHS)
    out = mask(ids, lens, 0.7, torch.Generator().manual_seed(2))
    for row, n in enumerate(LENGTHS):
        changed = (out[row] != ids[row]).nonzero().flatten().tolist()
        assert len(changed) == int(0.7 * n)
        assert all(c >= 10 - n for c in changed) and (out[row, changed] == 0).all()
    assert torch.equal(out, mask(ids, lens, 0.7, torch.Generator().manual_seed(2)))
    assert (mask(ids, lens, 0.7, torch.Generator().manual_seed(2), mask_id=99) == 99).sum() == \
        (out == 0).sum() - (ids == 0).sum()


def test_reorder_invariants() -> None:
    ids, lens = make_rows(LENGTHS)
    out = reorder(ids, lens, 0.5, torch.Generator().manual_seed(3))
    moved_any = False
    for row, n in enumerate(LENGTHS):
        k = int(0.5 * n)
        assert sorted(out[row].tolist()) == sorted(ids[row].tolist())
        diff = (out[row] != ids[row]).nonzero().flatten().tolist()
        if diff:
            moved_any = True
            assert diff[0] >= 10 - n and diff[-1] - diff[0] + 1 <= k
            assert sorted(out[row, diff].tolist()) == sorted(ids[row, diff].tolist())
        if k <= 1:
            assert diff == []
    assert moved_any
    assert torch.equal(out, reorder(ids, lens, 0.5, torch.Generator().manual_seed(3)))


def test_random_views_mix_and_determinism() -> None:
    ids, _ = make_rows([10] * 300)
    out = random_views(ids, torch.Generator().manual_seed(4))
    n_zero = (out == 0).sum(1)
    cropped = (n_zero == 8).sum()  # crop keeps 2 of 10
    masked = (n_zero == 7).sum()  # mask zeroes 7 of 10
    reordered = (n_zero == 0).sum()
    assert cropped + masked + reordered == 300 and min(cropped, masked, reordered) > 60
    assert torch.equal(out, random_views(ids, torch.Generator().manual_seed(4)))
    assert not torch.equal(out, random_views(ids, torch.Generator().manual_seed(5)))


# ---------------------------------------------------------------- batch sampler


@pytest.fixture
def small_split(tmp_path: Path) -> SplitData:
    rng = np.random.default_rng(0)
    lines = []
    for u in range(1, 38):
        n = int(rng.integers(3, 15))
        lines.append(f"{u} " + " ".join(map(str, rng.choice(np.arange(1, 31), n, replace=False))))
    return build_split(read_sequences(write(tmp_path, "\n".join(lines) + "\n")), max_len=8)


def collect(sampler: TrainBatchSampler, epoch: int) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in b.items()} for b in sampler.epoch(epoch)]


def test_sampler_covers_rows_and_negatives(small_split: SplitData) -> None:
    sp = small_split
    ut = sp.train_input.shape[0]
    sampler = TrainBatchSampler(sp, batch_size=8, seed=7, with_views=True)
    batches = collect(sampler, 0)
    assert len(batches) == len(sampler) == -(-ut // 8)
    users = torch.cat([b["user"] for b in batches])
    assert sorted(users.tolist()) == sp.train_user.tolist()
    for b in batches:
        rows = torch.searchsorted(sp.train_user, b["user"])
        assert torch.equal(b["input_ids"], sp.train_input[rows])
        assert torch.equal(b["target_pos"], sp.train_target[rows])
        neg, pos = b["target_neg"], b["target_pos"]
        assert ((neg > 0) == (pos > 0)).all() and int(neg.max()) <= sp.num_items
        for r, u in enumerate(b["user"].tolist()):
            seen = set(sp.seen_sorted[u, : sp.seen_count[u]].tolist())
            assert not seen & set(neg[r][neg[r] > 0].tolist())
        assert b["view1"].shape == b["input_ids"].shape == b["view2"].shape
        assert not torch.equal(b["view1"], b["view2"])
    assert batches[-1]["user"].shape[0] == ut - 8 * (len(batches) - 1)
    other = collect(sampler, 1)
    assert not torch.equal(other[0]["user"], batches[0]["user"])


@pytest.mark.parametrize("pad", [False, True])
def test_sampler_two_ranks(small_split: SplitData, pad: bool) -> None:
    sp = small_split
    ut = sp.train_input.shape[0]
    ranks = [TrainBatchSampler(sp, 8, seed=3, rank=r, world_size=2, pad_ranks=pad) for r in (0, 1)]
    got = [torch.cat([b["user"] for b in s.epoch(2)]).tolist() for s in ranks]
    assert all(b["input_ids"].shape[0] <= 4 for b in ranks[0].epoch(2))
    if pad:
        assert len(ranks[0]) == len(ranks[1]) and len(got[0]) == len(got[1])
        assert set(got[0]) | set(got[1]) == set(sp.train_user.tolist())
    else:
        assert sorted(got[0] + got[1]) == sp.train_user.tolist()
        assert [len(s) for s in ranks] == [-(-len(g) // 4) for g in got]
    assert len(got[0]) + len(got[1]) >= ut
    neg = [next(iter(s.epoch(2)))["target_neg"] for s in ranks]
    assert not torch.equal(neg[0], neg[1])


def test_sampler_state_round_trip(small_split: SplitData) -> None:
    a = TrainBatchSampler(small_split, 8, seed=11, with_views=True)
    for e in range(2):
        collect(a, e)
    state = a.state_dict()
    expected = collect(a, 2)
    b = TrainBatchSampler(small_split, 8, seed=11, with_views=True)
    b.load_state_dict(state)
    resumed = collect(b, 2)
    assert len(resumed) == len(expected)
    for x, y in zip(resumed, expected, strict=True):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    with pytest.raises(ValueError, match="seed"):
        TrainBatchSampler(small_split, 8, seed=12).load_state_dict(state)


def test_target_rows_lists_every_target_first_then_padding() -> None:
    from adarec.data.sampler import target_rows

    pos = torch.tensor([[0, 0, 3, 4], [0, 5, 0, 6], [0, 0, 0, 0]])
    rows = target_rows(pos, 7)
    assert rows[:4].tolist() == [2, 3, 5, 7]            # the flat positions with a target, in order
    assert rows.numel() == 7 and len(set(rows.tolist())) == 7
    assert (pos.reshape(-1)[rows[4:]] == 0).all()       # then positions without one


@pytest.mark.parametrize("bucket", [1, 16, 512])
def test_sampler_target_rows_are_bucketed_and_the_loss_is_unchanged(small_split: SplitData, bucket: int) -> None:
    """Every batch's target_rows cover all its targets, padded to a multiple of the bucket (or to
    all B L positions, the cap), and the cross-entropy over them equals the one over every
    position."""
    from adarec.models.losses import ce_next_item_loss

    sampler = TrainBatchSampler(small_split, batch_size=8, seed=7, target_bucket=bucket)
    sizes = set()
    gen = torch.Generator().manual_seed(0)
    for batch in sampler.epoch(0):
        pos, rows = batch["target_pos"], batch["target_rows"]
        positions = pos.numel()
        targets = int((pos > 0).sum())
        assert rows.numel() == min(-(-targets // bucket) * bucket, positions)
        sizes.add(rows.numel())
        assert set(torch.nonzero(pos.reshape(-1) > 0).flatten().tolist()) <= set(rows.tolist())
        hidden = torch.randn(*pos.shape, 6, generator=gen, dtype=torch.float64)
        weight = torch.randn(small_split.num_items + 2, 6, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(ce_next_item_loss(hidden, weight, pos, rows), ce_next_item_loss(hidden, weight, pos))
    assert bucket > 64 or len(sizes) > 1              # a small bucket gives batches of several shapes
    if bucket == 1:                                   # exact: only the targets are scored
        assert all(int((b["target_pos"] > 0).sum()) == b["target_rows"].numel() for b in sampler.epoch(1))



# ---------------------------------------------------------------- data filters (k-core)


def reference_kcore(rows: dict[int, list[int]], min_user: int, min_item: int) -> dict[int, list[int]]:
    """An independent k-core: one interaction at a time, recounted from scratch every round."""
    kept = {u: list(seq) for u, seq in rows.items()}
    while True:
        item_count: dict[int, int] = {}
        for seq in kept.values():
            for i in seq:
                item_count[i] = item_count.get(i, 0) + 1
        new = {}
        for u, seq in kept.items():
            if len(seq) < min_user:
                continue
            left = [i for i in seq if item_count[i] >= min_item]
            if left:
                new[u] = left
        if new == kept:
            return kept
        kept = new


def as_rows(s: UserSequences) -> dict[int, list[int]]:
    """{file user id: the file's item ids} (mapped back through item_ids where items were renumbered)."""
    back = (lambda i: int(s.item_ids[i - 1])) if s.item_ids is not None else int
    return {int(u): [back(i) for i in s.sequence(r).tolist()] for r, u in enumerate(s.user_ids)}


@pytest.mark.parametrize(("min_user", "min_item"), [(3, 0), (0, 2), (4, 3), (5, 5), (3, 4)])
def test_kcore_matches_an_independent_computation(tmp_path: Path, min_user: int, min_item: int) -> None:
    rng = np.random.default_rng(min_user * 10 + min_item)
    rows = {}
    for u in range(1, 121):
        # Lengths 1..12, items skewed towards small ids (rare items exist), repeats allowed.
        rows[u * 3] = (np.minimum(rng.zipf(1.6, size=int(rng.integers(1, 13))), 60)).tolist()
    p = write(tmp_path, "".join(f"{u} {' '.join(map(str, seq))}\n" for u, seq in rows.items()))
    want = reference_kcore(rows, min_user, min_item)
    if any(len(seq) < 3 for seq in want.values()):
        with pytest.raises(DataError, match=r"items after the data filters .*--set data\.min_user_items=3"):
            read_sequences(p, min_user_items=min_user, min_item_users=min_item)
        return
    s = read_sequences(p, min_user_items=min_user, min_item_users=min_item)
    assert as_rows(s) == want
    kept_items = sorted({i for seq in want.values() for i in seq})
    all_items = sorted({i for seq in rows.values() for i in seq})
    if kept_items != all_items:          # renumbered 1..N in the order of the old ids
        assert s.num_items == len(kept_items) and s.item_ids.tolist() == kept_items
        assert sorted(set(s.items.tolist())) == list(range(1, len(kept_items) + 1))
    build_split(s)                       # the split takes the filtered sequences


def test_kcore_iterates_until_nothing_changes(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Items 2 and 4 have one interaction each; dropping them leaves user 30 with two items, so
    it goes in the second round, which leaves item 5 with one user (10), dropped in the third."""
    text = ("10 1 3 5 6\n"        # keeps 1 3 5 6 until item 5 goes
            "20 1 3 6 2\n"        # loses item 2 (round 1)
            "30 1 5 4\n"          # loses item 4 (round 1): 2 items, dropped in round 2
            "40 1 3 6\n")
    p = write(tmp_path, text)
    one_round = {10: [1, 3, 5, 6], 20: [1, 3, 6], 30: [1, 5], 40: [1, 3, 6]}
    assert reference_kcore({10: [1, 3, 5, 6], 20: [1, 3, 6, 2], 30: [1, 5, 4], 40: [1, 3, 6]}, 3, 2) \
        == {10: [1, 3, 6], 20: [1, 3, 6], 40: [1, 3, 6]} != one_round
    import logging

    # A run's logging setup (engine/run_log.py) stops the adarec loggers at their own handlers.
    monkeypatch.setattr(logging.getLogger("adarec"), "propagate", True)
    with caplog.at_level("INFO", logger="adarec.data"):
        s = read_sequences(p, min_user_items=3, min_item_users=2)
    assert s.user_ids.tolist() == [10, 20, 40]
    # Items 1 3 6 are left, renumbered 1 2 3.
    assert s.num_items == 3 and s.item_ids.tolist() == [1, 3, 6]
    assert [s.sequence(u).tolist() for u in range(3)] == [[1, 2, 3]] * 3
    lines = [r.getMessage() for r in caplog.records if r.name == "adarec.data"]
    assert len(lines) == 1
    # Round 1 drops items 2 and 4, round 2 user 30, round 3 item 5 (one user left), round 4 nothing.
    assert lines[0] == ("data filters (data.min_user_items=3, data.min_item_users=2, 4 rounds): dropped 1 of 4 users, "
                        "3 of 6 items, 5 of 14 interactions; items renumbered 1..3")


def test_filters_of_zero_leave_the_shipped_data_as_it_was() -> None:
    """data/Beauty.txt read and split through the filter code with the defaults (and with 5/5:
    it is a 5-core) gives exactly the arrays the reader gave before the filters existed (the
    digest was computed with that reader)."""
    import dataclasses
    import hashlib

    if not BEAUTY.exists():
        pytest.skip("Beauty.txt not present")

    def digest(seqs: UserSequences) -> str:
        h = hashlib.sha256()
        for a in (seqs.items, seqs.offsets, seqs.user_ids):
            h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
        h.update(str(seqs.num_items).encode())
        sp = build_split(seqs)
        for f in dataclasses.fields(sp):
            v = getattr(sp, f.name)
            h.update(v.numpy().astype(np.int64).tobytes() if isinstance(v, torch.Tensor) else str(v).encode())
        return h.hexdigest()

    before = "c2a79d0d78748facc6a997071e3768901b52b3cd761ec221e1202425efd19141"
    default = read_sequences(BEAUTY, min_user_items=0, min_item_users=0)
    assert default.item_ids is None and digest(default) == before
    five = read_sequences(BEAUTY, min_user_items=5, min_item_users=5)
    assert five.item_ids is None and digest(five) == before


def test_short_users_are_an_error_that_suggests_the_filter_and_the_filter_drops_them(tmp_path: Path) -> None:
    inter = write(tmp_path, INTER_HEADER + "1\t2\t3\t4\n1\t3\t3\t5\n2\t2\t3\t4\n2\t5\t3\t6\n2\t6\t3\t7\n"
                  "3\t5\t1\t1\n3\t2\t1\t2\n3\t6\t1\t3\n3\t7\t1\t4\n", "short.inter")
    with pytest.raises(DataError, match=r"user 1 has 2 items; .*--set data\.min_user_items=3"):
        read_sequences(inter)
    s = read_sequences(inter, min_user_items=3)
    # Users 2 and 3 are left (numbered by first appearance: 2, 3); item "3" (number 2) was only user 1's.
    assert s.user_ids.tolist() == [2, 3] and s.num_items == 4 and s.item_ids.tolist() == [1, 3, 4, 5]
    assert s.sequence(0).tolist() == [1, 2, 3] and s.sequence(1).tolist() == [2, 1, 3, 4]
    build_split(s)
    lines = write(tmp_path, "1 5 6\n2 5 6 7\n", "short.txt")
    with pytest.raises(DataError, match=r"short\.txt:1: user 1 has 2 items; .*--set data\.min_user_items=3"):
        read_sequences(lines)
    assert read_sequences(lines, min_user_items=3).user_ids.tolist() == [2]
    # An item filter alone can leave a user short: named, with the bound that fixes it.
    with pytest.raises(DataError, match=r"user 1 has 2 items after the data filters .*min_user_items=3"):
        read_sequences(write(tmp_path, "1 5 6 7\n2 5 6 9\n", "items.txt"), min_item_users=2)
