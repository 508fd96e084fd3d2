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

