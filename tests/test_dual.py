"""adarec-dual: the noised ELCRec experts, their score average, and the two-member engine."""

import json
import math
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
    # docs/method.md 3: "noise std about .053/.068 and .124/.138"
    assert stds["e5"] == pytest.approx([0.053, 0.068], abs=1e-3)
    assert stds["e10"] == pytest.approx([0.124, 0.138], abs=1e-3)


def test_noised_path_mixes_the_copies_per_position_with_the_drawn_noise():
    """paths() against the mixture built by hand from its own weights and the same noise draw
    (the first random draw of the call: dropout is 0)."""
    torch.manual_seed(0)
    expert = NoisedELCRec(tiny_cfg(), num_items=9, max_len=5, steps=(3, 4)).train()
    ids = tiny_batch()["input_ids"]
    torch.manual_seed(5)
    out = expert.paths(ids)
    torch.manual_seed(5)
    noise = torch.randn(2, 3, 5, 8)
    with torch.no_grad():
        e0 = expert.encoder.embed(ids)
        abar = [math.prod(1 - b for b in torch.linspace(1e-4, 0.02, 50, dtype=torch.float64)[: s + 1].tolist())
                for s in (3, 4)]
        mixed = torch.zeros_like(e0)
        for b in range(3):
            for i in range(5):
                for c in range(2):
                    copy = abar[c] ** 0.5 * e0[b, i] + (1 - abar[c]) ** 0.5 * noise[c, b, i]
                    mixed[b, i] += out["weights"][b, i, c] * copy
        want = expert.encoder.encode(mixed, ids)
    torch.testing.assert_close(out["noised"], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["weights"].sum(-1), torch.ones(3, 5))


def test_expert_loss_terms_against_loops_and_their_weights(monkeypatch):
    """consistency and expl against loops over the item positions; each weight checked by
    switching it to 1 and reading the change of the loss."""
    from adarec.models import dual

    torch.manual_seed(0)
    expert = NoisedELCRec(tiny_cfg(), num_items=9, max_len=5, steps=(3, 4)).train()
    batch = tiny_batch()
    ids = batch["input_ids"]

    def run():
        torch.manual_seed(5)
        loss, terms = expert(batch)
        torch.manual_seed(5)
        return float(loss.detach()), terms, expert.paths(ids)

    loss, terms, out = run()
    assert {"rec", "rec_noised", "consistency", "expl", "cluster", "instance_cl", "intent_cl"} <= set(terms)
    positions = [(b, i) for b in range(3) for i in range(5) if ids[b, i] > 0]
    with torch.no_grad():
        consistency = sum(float((out["noised"][b, i] - out["raw"][b, i]).pow(2).mean()) for b, i in positions)
        entropy = sum(-sum(float(w) * math.log(float(w)) for w in out["weights"][b, i]) for b, i in positions)
    assert float(terms["consistency"]) == pytest.approx(consistency / len(positions), rel=1e-5)
    assert float(terms["expl"]) == pytest.approx(-entropy / len(positions), rel=1e-5)
    for name, term in (("CONSISTENCY_WEIGHT", "consistency"), ("EXPLORATION_WEIGHT", "expl"),
                       ("NOISED_REC_WEIGHT", "rec_noised")):
        monkeypatch.setattr(dual, name, getattr(dual, name) + 1.0)
        changed, _, _ = run()
        monkeypatch.undo()
        assert changed - loss == pytest.approx(float(terms[term]), rel=1e-4, abs=1e-6), name
    torch.manual_seed(5)
    loss_t, _ = expert(batch)
    loss_t.backward()
    assert expert.copy_controller.head.weight.grad.abs().sum() > 0  # the soft controller is trained


def test_score_average_is_the_mean_of_the_experts():
    class Fixed(torch.nn.Module):
        never_rank = (0, 10)

        def __init__(self, dim, seed):
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            self.query, self.table = torch.randn(3, dim, generator=g), torch.randn(11, dim, generator=g)

        def user_query(self, ids):
            return self.query

        def item_table(self):
            return self.table

    a, b = Fixed(4, 0), Fixed(6, 1)          # members of different widths
    avg = ScoreAverage({"e5": a, "e10": b})
    assert avg.never_rank == (0, 10)
    mean = (a.query @ a.table.t() + b.query @ b.table.t()) / 2
    torch.testing.assert_close(avg.score(tiny_batch()["input_ids"]), mean)
    assert avg.user_query(None).shape == (3, 10) and avg.item_table().shape == (11, 10)
    members = build_members(tiny_cfg(), num_items=9, max_len=5)
    assert isinstance(scorer(members), ScoreAverage)
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


def test_the_two_experts_draw_different_noise_for_the_same_row():
    """Both experts see the same batches and row keys; each must still draw its own noise."""
    torch.manual_seed(0)
    e5 = NoisedELCRec(tiny_cfg(), num_items=9, max_len=5, steps=(3, 4)).train()
    e10 = NoisedELCRec(tiny_cfg(), num_items=9, max_len=5, steps=(8, 9)).train()
    e10.load_state_dict(e5.state_dict())
    e10.sqrt_abar, e10.sqrt_one_minus_abar = e5.sqrt_abar, e5.sqrt_one_minus_abar   # same schedule too
    ids = tiny_batch()["input_ids"]
    keys = torch.tensor([11, 22, 33])
    a, b = e5.paths(ids, keys), e10.paths(ids, keys)
    assert torch.equal(a["raw"], b["raw"])
    assert not torch.allclose(a["noised"], b["noised"])
    # The same expert and keys: the same noise (keyed, not drawn from torch's RNG).
    assert torch.equal(e5.paths(ids, keys)["noised"], a["noised"])
