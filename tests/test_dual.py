"""adarec-dual: the noised ELCRec experts, their score average, and the two-member engine."""

import json
from pathlib import Path

import pytest
import torch

from adarec.config import ModelConfig, apply_overrides, load_config
from adarec.models import ScoreAverage, build_members, scorer
from adarec.models.dual import EXPERT_STEPS, NoisedELCRec

REPO = Path(__file__).resolve().parents[1]


def tiny_cfg(**kw):
    base = {"name": "adarec-dual", "hidden_size": 8, "num_layers": 1, "hidden_dropout": 0.0,
            "attn_dropout": 0.0, "num_intent_clusters": 2}
    return ModelConfig(**{**base, **kw})


def tiny_batch():
    ids = torch.tensor([[0, 0, 3, 4, 5], [0, 0, 0, 7, 2], [1, 2, 3, 4, 5]])
    target = torch.where(ids > 0, (ids % 9) + 1, 0)
    return {"input_ids": ids, "target_pos": target, "target_neg": torch.where(ids > 0, 8, 0),
            "user": torch.arange(3), "view1": ids.roll(1, 0), "view2": ids.roll(2, 0)}


def test_expert_noise_levels_match_the_released_code():
    members = build_members(tiny_cfg(), num_items=9, max_len=5)
    assert list(members) == ["e5", "e10"] and EXPERT_STEPS == {"e5": (3, 4), "e10": (8, 9)}
    stds = {n: m.sqrt_one_minus_abar.tolist() for n, m in members.items()}
    # METHOD.md 3: "noise std about .053/.068 and .124/.138"
    assert stds["e5"] == pytest.approx([0.053, 0.068], abs=1e-3)
    assert stds["e10"] == pytest.approx([0.124, 0.138], abs=1e-3)


def test_expert_loss_terms_and_weights():
    torch.manual_seed(0)
    expert = NoisedELCRec(tiny_cfg(), num_items=9, max_len=5, steps=(3, 4))
    loss, terms = expert(tiny_batch())
    assert {"rec", "rec_noised", "consistency", "expl", "cluster", "instance_cl", "intent_cl"} <= set(terms)
    want = (terms["rec"] + 0.5 * terms["rec_noised"] + 1e-4 * terms["consistency"] + 1e-4 * terms["expl"]
            + 0.1 * terms["instance_cl"] + 0.1 * terms["intent_cl"] + 1.0 * terms["cluster"])
    torch.testing.assert_close(loss.detach(), want)
    loss.backward()
    assert expert.copy_controller.head.weight.grad.abs().sum() > 0  # the soft controller is trained


def test_score_average_is_the_mean_of_the_experts():
    torch.manual_seed(0)
    members = {n: m.eval() for n, m in build_members(tiny_cfg(), num_items=9, max_len=5).items()}
    ids = tiny_batch()["input_ids"]
    avg = scorer(members)
    assert isinstance(avg, ScoreAverage) and avg.never_rank == (0, 10)
    torch.testing.assert_close(avg.score(ids), (members["e5"].score(ids) + members["e10"].score(ids)) / 2)
    single = build_members(tiny_cfg(name="elcrec"), num_items=9, max_len=5)
    assert list(single) == ["model"] and scorer(single) is single["model"]


def test_two_member_run_resumes_exactly_and_evaluates_offline(tmp_path):
    from adarec.engine.offline import evaluate_run
    from adarec.engine.trainer import run_training

    small = ["data.max_users=200", "model.hidden_size=16", "model.num_intent_clusters=4",
             "train.batch_size=64", "train.device=cpu", "train.precision=fp32"]
    cfg = load_config(REPO / "configs/adarec-dual_beauty.yaml", [*small, "train.epochs=2"])
    result = run_training(cfg, tmp_path / "a")
    metrics = [json.loads(line) for line in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    assert [m["split"] for m in metrics] == ["valid/e5", "valid/e10", "valid/e5", "valid/e10", "test"]
    for member in ("e5", "e10"):
        assert (tmp_path / "a/checkpoints" / member / "latest").exists()
    epochs = [json.loads(line) for line in (tmp_path / "a/epochs.jsonl").read_text().splitlines()]
    assert {"e5/rec", "e10/rec_noised", "loss"} <= set(epochs[0])

    run_training(load_config(REPO / "configs/adarec-dual_beauty.yaml", [*small, "train.epochs=1"]), tmp_path / "b")
    resumed = run_training(apply_overrides(load_config(tmp_path / "b/config.yaml"), ["train.epochs=2"]),
                           tmp_path / "b", resume=True)
    assert resumed == result
    offline = evaluate_run(tmp_path / "a", "test", "cpu")
    assert offline["NDCG@20"] == pytest.approx(result["NDCG@20"], abs=1e-9)
