"""Data parallelism: N ranks at B / N rows each train the model one rank trains at batch B.

The end-to-end test runs tests/data_parallel_worker.py as one process and as two gloo ranks
(dropout 0: dropout streams are per rank) for sasrec, elcrec, adarec, adarec-dual and the peers
(diffurec, adrec with its pcgrad merge and stages, diffuasr) at ZeRO 0 and sasrec / adarec at
ZeRO 1 and 2, and compares the global batch's loss terms after every
step and the validation metrics after 2 epochs. The unit tests check the pieces it rests on:
row-keyed draws, the sampler's rank slices, the global losses.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from adarec.engine.distributed import free_port

from adarec.config import load_config
from adarec.data import TrainBatchSampler
from adarec.keyed_random import GeneratorDraws, KeyedDraws, Streams, row_keys

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "data_parallel_worker.py"
CASES = ["sasrec:0", "elcrec:0", "adarec:0", "adarec-dual:0", "sasrec:1", "adarec:1", "sasrec:2", "adarec:2",
         "diffurec:0", "adrec:0", "diffuasr:0"]



def _run_worker(out: Path, ranks: int, epochs: int = 2) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    procs = []
    for rank in range(ranks):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        if ranks == 1:
            for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
                env.pop(key)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out), str(epochs), *CASES], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]
    return json.loads((out / f"world{ranks}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("data_parallel")
    return _run_worker(root / "one", 1), _run_worker(root / "two", 2)


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_train_the_one_rank_model(runs, case):
    one, two = runs[0][case], runs[1][case]
    assert one["rows_per_step"] == two["rows_per_step"] == 32
    # 90 users: 3 steps an epoch, 2 epochs; DiffuRec trains one row per prefix.
    assert one["rows"] == two["rows"] == (90 if not case.startswith("diffurec") else one["rows"]) >= 90
    assert len(one["steps"]) == len(two["steps"]) == 2 * -(-one["rows"] // 32)
    for step, (a, b) in enumerate(zip(one["steps"], two["steps"], strict=True)):
        assert a.keys() == b.keys()
        for term in a:
            assert b[term] == pytest.approx(a[term], rel=1e-4, abs=1e-4), (step, term)
    # The model trained (its loss moved), and both runs end at the same validation metrics.
    loss = "loss" if "loss" in one["steps"][0] else "e5/loss"
    assert one["steps"][0][loss] != one["steps"][-1][loss]
    for member, metrics in one["valid"].items():
        for name, value in metrics.items():
            assert two["valid"][member][name] == pytest.approx(value, abs=1e-6), (member, name)


def test_zero3_is_refused_with_the_reason(tmp_path):
    from adarec.engine.ds_config import build_ds_config

    from adarec.errors import ConfigError

    overlay = tmp_path / "zero3.json"
    overlay.write_text('{"zero_optimization": {"stage": 3}}')
    cfg = load_config(REPO / "configs/sasrec_beauty.yaml", [f"train.ds_config={overlay}"])
    with pytest.raises(ConfigError, match="outside") as err:
        build_ds_config(cfg.train, 1, torch.device("cpu"))
    assert str(overlay) in str(err.value)
    with pytest.raises(ConfigError, match="ZeRO-3"):
        load_config(REPO / "configs/sasrec_beauty.yaml", ["train.zero_stage=3"])


# -- row-keyed draws -----------------------------------------------------------------------------

def test_keyed_draws_follow_the_row_not_its_position():
    keys = torch.from_numpy(row_keys(7, 3, np.arange(40)))
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    for kind in ("uniform", "normal"):
        whole = getattr(KeyedDraws(keys, Streams.VIEWS), kind)((5, 3))
        shuffled = getattr(KeyedDraws(keys[perm], Streams.VIEWS), kind)((5, 3))
        half = getattr(KeyedDraws(keys[perm[:7]], Streams.VIEWS), kind)((5, 3))
        assert torch.equal(shuffled, whole[perm])
        assert torch.equal(half, whole[perm[:7]])


def test_keyed_draws_streams_calls_and_rows_are_independent():
    keys = torch.from_numpy(row_keys(1, 0, np.arange(2000)))
    draws = KeyedDraws(keys, Streams.NEGATIVES)
    first, second = draws.uniform((64,)), draws.uniform((64,))
    other = KeyedDraws(keys, Streams.GUMBEL).uniform((64,))
    flat = torch.stack([first.flatten(), second.flatten(), other.flatten()])
    corr = torch.corrcoef(flat)
    assert corr.sub(torch.eye(3)).abs().max() < 0.01
    # Uniform on (0, 1): moments and a histogram against the exact expectations.
    assert 0.0 < float(first.min()) and float(first.max()) < 1.0
    assert float(first.mean()) == pytest.approx(0.5, abs=0.005)
    counts = torch.histc(first, bins=10, min=0.0, max=1.0)
    assert (counts / first.numel() - 0.1).abs().max() < 0.005
    wide = KeyedDraws(keys, Streams.NEGATIVES).uniform((64,), torch.float64)
    assert wide.dtype == torch.float64 and float(wide.mean()) == pytest.approx(0.5, abs=0.005)
    normal = KeyedDraws(keys, Streams.DIFFUSION).normal((64,))
    assert float(normal.mean()) == pytest.approx(0.0, abs=0.01)
    assert float(normal.std()) == pytest.approx(1.0, abs=0.01)
    # No two rows share a sequence.
    assert torch.unique(first[:, 0]).numel() == first.shape[0]


def test_row_keys_depend_on_seed_epoch_and_row():
    rows = np.arange(1000)
    base = row_keys(42, 0, rows)
    assert base.dtype == np.int64 and (base >= 0).all() and len(set(base.tolist())) == 1000
    assert not np.isin(row_keys(42, 1, rows), base).any()
    assert not np.isin(row_keys(43, 0, rows), base).any()
    assert np.array_equal(row_keys(42, 0, rows[::-1]), base[::-1])


def test_generator_draws_match_torch_rand():
    g = torch.Generator().manual_seed(3)
    expected = torch.rand((4, 6), generator=torch.Generator().manual_seed(3))
    assert torch.equal(GeneratorDraws(g, 4).uniform((6,)), expected)


# -- the sampler's rank slices ---------------------------------------------------------------

def test_rank_batches_are_slices_of_the_one_rank_batch_with_the_same_draws(tiny_split):
    one = list(TrainBatchSampler(tiny_split, 32, seed=5, with_views=True).epoch(1))
    ranks = [list(TrainBatchSampler(tiny_split, 32, seed=5, rank=r, world_size=2, with_views=True,
                                    pad_ranks=True).epoch(1)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(one)
    for step, whole in enumerate(one):
        parts = [r[step] for r in ranks]
        rows = torch.cat([p["user"] for p in parts])
        assert sorted(rows.tolist()) == sorted(whole["user"].tolist())
        where = {int(u): i for i, u in enumerate(whole["user"])}
        index = torch.tensor([where[int(u)] for u in rows])
        for key in ("input_ids", "target_pos", "target_neg", "view1", "view2", "row_key"):
            assert torch.equal(torch.cat([p[key] for p in parts]), whole[key][index]), key


@pytest.fixture
def tiny_split():
    from adarec.engine.data_setup import load_split

    cfg = load_config(REPO / "configs/elcrec_beauty.yaml", ["data.max_users=90", "train.device=cpu"])
    return load_split(cfg, torch.device("cpu"))


def test_rows_padded_onto_the_epoch_draw_new_numbers(tiny_split):
    """90 rows over 4 ranks: 2 rows are repeated to even the ranks out; the repeats keep their
    data but get keys (and so negatives and views) of their own."""
    ranks = [list(TrainBatchSampler(tiny_split, 32, seed=5, rank=r, world_size=4, with_views=True,
                                    pad_ranks=True).epoch(0)) for r in range(4)]
    users = torch.cat([b["user"] for r in ranks for b in r])
    keys = torch.cat([b["row_key"] for r in ranks for b in r])
    assert users.numel() == 92 and users.unique().numel() == 90
    assert keys.unique().numel() == 92


def test_a_block_of_keyed_draws_is_the_rows_own_whatever_else_is_drawn():
    """A (row, block) pair draws what the whole [row, block] grid holds there: ADARec draws the
    diffusion noise of the (user, level) pairs it computes only."""
    keys = torch.from_numpy(row_keys(3, 0, np.arange(6)))
    levels = 4
    grid = torch.stack([KeyedDraws(keys, Streams.DIFFUSION).normal((5, 3), block=torch.full((6,), k),
                                                                     blocks=levels) for k in range(levels)], 1)
    pair_user = torch.tensor([0, 0, 2, 5, 5, 5])
    pair_level = torch.tensor([0, 1, 3, 0, 2, 3])
    pairs = KeyedDraws(keys[pair_user], Streams.DIFFUSION).normal((5, 3), block=pair_level, blocks=levels)
    assert torch.equal(pairs, grid[pair_user, pair_level])
    assert not torch.equal(grid[:, 0], grid[:, 1])
    # Both Box-Muller outputs are used: an odd count still gives N(0, 1) numbers.
    many = KeyedDraws(torch.from_numpy(row_keys(3, 1, np.arange(500))), Streams.DIFFUSION).normal((101,))
    assert float(many.mean()) == pytest.approx(0.0, abs=0.02) and float(many.std()) == pytest.approx(1.0, abs=0.02)
