"""The engine seams the peers use (docs/peers.md, "In the engine"): evaluation keys from row
contents, a model's own evaluation view, the per-epoch hook, the training-row layout chosen by
the model, the augmented-prefix split and the peer config keys."""

from pathlib import Path

import numpy as np
import pytest
import torch
from adarec.engine.data_setup import load_split
from adarec.engine.evaluator import evaluate_split
from adarec.engine.trainer import run_training

from adarec.config import load_config
from adarec.data import UserSequences, build_split
from adarec.errors import ConfigError
from adarec.keyed_random import KeyedDraws, Streams, sequence_keys
from adarec.metrics import rank_metrics
from adarec.models import model_class
from adarec.models.sasrec import SASRec

REPO = Path(__file__).resolve().parents[1]


def test_sequence_keys_depend_on_the_row_and_seed_only():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (64, 12), generator=g)
    keys = sequence_keys(ids, seed=7)
    assert keys.dtype == torch.int64 and keys.unique().numel() == 64
    # The same row keys the same whatever batch holds it, so its draws match too.
    assert torch.equal(sequence_keys(ids[10:13], seed=7), keys[10:13])
    assert torch.equal(KeyedDraws(keys[10:13], Streams.REVERSE).normal((5,)),
                       KeyedDraws(keys, Streams.REVERSE).normal((5,))[10:13])
    assert not torch.equal(sequence_keys(ids, seed=8), keys)
    moved = ids.clone()
    moved[:, 3] += 1                                       # one item changed anywhere changes the key
    assert (sequence_keys(moved, seed=7) != keys).all()
    swapped = ids[:, [1, 0, *range(2, 12)]]                # so does the order of two items
    assert (sequence_keys(swapped, seed=7) != keys)[ids[:, 0] != ids[:, 1]].all()


class _ViewModel(torch.nn.Module):
    """Scores item i of a row as -|i - first item of the row|; ranks on a view of its own."""

    never_rank = (0, 11)

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def score(self, input_ids):
        items = torch.arange(12, dtype=torch.float32)
        return -(items[None] - input_ids[:, -1:].float()).abs() + self.w

    def eval_view(self, split, which):
        inputs = torch.tensor([[0, 3], [0, 7], [2, 9]])
        return inputs, torch.zeros(3, 1, dtype=torch.int64), torch.tensor([3, 8, 1])


def test_a_models_eval_view_replaces_the_split_arrays():
    seqs = UserSequences(items=np.arange(1, 11), offsets=np.array([0, 5, 10]), user_ids=np.array([1, 2]),
                         num_items=10, source="mem")
    split = build_split(seqs, max_len=4)
    model = _ViewModel()
    got = evaluate_split(model, split, "valid", [1, 5], protocol="full")
    inputs, history, targets = model.eval_view(split, "valid")
    expect = rank_metrics(model.score(inputs), targets, history, [1, 5], never_rank=model.never_rank)
    assert got == pytest.approx(expect)
    assert got["HR@1"] == pytest.approx(1 / 3)     # row 0 hits (3 == 3); rows 1 and 2 do not


def test_load_split_takes_the_models_training_rows(monkeypatch):
    cfg = load_config(REPO / "configs/sasrec_beauty.yaml", ["data.max_users=40"])
    users = load_split(cfg, torch.device("cpu"))
    assert users.train_input.shape[0] == int((torch.as_tensor(users.valid_history > 0).sum(1) > 1).sum())
    monkeypatch.setattr(SASRec, "training_rows", "prefixes", raising=False)
    prefixes = load_split(cfg, torch.device("cpu"))
    # One row per training target s[1..n-3] of the full sequences (more than the row-per-user
    # windows hold for users longer than max_len), its target in the last column.
    history_lengths = (users.valid_history > 0).sum(1)                 # n - 2, never truncated
    assert prefixes.train_input.shape[0] == int((history_lengths - 1).sum()) > int((users.train_target > 0).sum())
    assert (prefixes.train_target[:, -1] > 0).all() and not prefixes.train_target[:, :-1].any()
    assert torch.equal(prefixes.valid_input, users.valid_input)


def test_the_epoch_hook_is_called_every_epoch_also_after_resume(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(SASRec, "begin_epoch", lambda self, epoch: calls.append(epoch), raising=False)
    small = ["data.max_users=60", "model.hidden_size=8", "model.num_layers=1", "train.batch_size=32",
             "train.device=cpu", "train.precision=fp32"]
    run_training(load_config(REPO / "configs/sasrec_beauty.yaml", [*small, "train.epochs=2"]), tmp_path)
    assert calls == [0, 1]
    cfg = load_config(tmp_path / "config.yaml", ["train.epochs=3"])
    run_training(cfg, tmp_path, resume=True)
    assert calls == [0, 1, 2]


def test_augmented_prefix_keeps_generated_items_out_of_targets_and_histories():
    real = [np.arange(1, 7), np.arange(7, 11)]                     # 6 and 4 real items
    generated = [np.array([20, 21]), np.array([22, 23])]
    rows = [np.concatenate(p) for p in zip(generated, real, strict=True)]
    seqs = UserSequences(items=np.concatenate(rows), offsets=np.array([0, 8, 14]), user_ids=np.array([1, 2]),
                         num_items=30, source="mem")
    aug = build_split(seqs, max_len=10, augmented_prefix=2)
    plain = build_split(UserSequences(items=np.concatenate(real), offsets=np.array([0, 6, 10]),
                                      user_ids=np.array([1, 2]), num_items=30, source="mem"), max_len=10)
    # Inputs keep the generated items; every real training item is a target, the first one too
    # (read after the generated prefix), and no generated item is.
    assert aug.train_input[0, -5:].tolist() == [20, 21, 1, 2, 3]
    for a, p, r in zip(aug.train_target, plain.train_target, real, strict=True):
        assert a[a > 0].tolist() == [int(r[0]), *p[p > 0].tolist()] == r[:-2].tolist()
    for which in ("valid", "test"):
        a, p = getattr(aug, f"{which}_history"), getattr(plain, f"{which}_history")
        assert [r[r > 0].tolist() for r in a] == [r[r > 0].tolist() for r in p]
        assert torch.equal(getattr(aug, f"{which}_target"), getattr(plain, f"{which}_target"))
    short = UserSequences(items=np.arange(1, 5), offsets=np.array([0, 4]), user_ids=np.array([9]),
                          num_items=30, source="f.txt")
    with pytest.raises(Exception, match="user 9 has 4 items.*augmented_prefix"):
        build_split(short, max_len=5, augmented_prefix=2)


@pytest.mark.parametrize("override, key", [
    (["model.sample_steps=0"], "model.sample_steps"),
    (["model.name=diffurec", "model.diffusion_steps=32", "model.sample_steps=33"], "model.sample_steps"),
    (["model.noise_schedule=cosine"], "model.noise_schedule"),
    (["model.emb_dropout=1.0"], "model.emb_dropout"),
    (["train.grad_merge=pcgrad"], "train.grad_merge"),
    (["model.name=adrec", "train.grad_merge=pcgrad", "train.cuda_graphs=true"], "train.grad_merge"),
    (["train.grad_merge=mean"], "train.grad_merge"),
    (["data.augmented_prefix=-1"], "data.augmented_prefix"),
    (["model.prefix_items=0"], "model.prefix_items"),
])
def test_bad_peer_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, override)


def test_every_model_name_has_a_class_and_loads_its_rows():
    from adarec.config import MODEL_NAMES

    for name in MODEL_NAMES:
        assert callable(model_class(name))
    cfg = load_config(REPO / "configs/adarec-dual_beauty.yaml", ["data.max_users=30"])
    assert load_split(cfg, torch.device("cpu")).train_input.shape[0] == 30      # one row per user
    with pytest.raises(ValueError, match="unknown model 'bert4rec'"):
        model_class("bert4rec")
