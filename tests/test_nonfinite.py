"""What a diverging run reports, and what evaluation does with NaN scores.

The divergence message names what went non-finite first: the loss terms by name, or, when the
loss was still finite, the first parameter whose gradient was not (engine/nonfinite_watch.py).
Evaluation never turns a NaN score into a hit: the ranking counts a NaN candidate above the
target, and the evaluator refuses to report metrics of a model that scores NaN.
"""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from adarec.engine.evaluator import NonFiniteScores, evaluate_split
from adarec.engine.nonfinite_watch import NonFiniteWatch, gradient_norms
from adarec.engine.trainer import TrainingDiverged, run_training

from adarec.config import load_config

REPO = Path(__file__).resolve().parents[1]
SMALL = ["data.max_users=300", "model.hidden_size=16", "model.num_layers=1", "model.num_intent_clusters=8",
         "train.batch_size=64", "train.log_every=2", "train.device=cpu", "train.precision=fp32", "train.epochs=1"]


def message_of(excinfo) -> str:
    return str(excinfo.value)


def test_the_message_names_the_loss_term_that_went_non_finite_first(tmp_path, monkeypatch):
    """The cluster term alone turns NaN at step 3; by the log point at step 4 every term and
    weight is NaN, and the message still says it began with the cluster term."""
    import adarec.models.elcrec as elcrec

    real, calls = elcrec.cluster_loss, {"n": 0}

    def cluster_loss(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(elcrec, "cluster_loss", cluster_loss)
    cfg = load_config(REPO / "configs/elcrec_beauty.yaml", SMALL)
    with pytest.raises(TrainingDiverged) as excinfo:
        run_training(cfg, tmp_path / "run")
    text = message_of(excinfo)
    assert "non-finite training loss at epoch 1, step 4" in text
    first = text.split("First non-finite in epoch 1: ")[1].split(";")[0]
    assert first == "step 3: loss terms loss, cluster"                 # not rec, not the CL terms
    assert "checkpoint" in text


def test_a_non_finite_gradient_under_a_finite_loss_names_its_parameter(tmp_path, monkeypatch):
    """An infinite gradient of one parameter at step 3, the loss finite: the message names that
    parameter; the NaN losses that follow from the update come later."""
    from adarec.models.sasrec import SASRec

    real_forward, calls = SASRec.forward, {"n": 0, "hook": None}

    def forward(self, batch):
        calls["n"] += 1
        if calls["hook"] is not None:
            calls["hook"].remove()
            calls["hook"] = None
        if calls["n"] == 3:
            weight = self.encoder.blocks[0].ffn_out.weight
            calls["hook"] = weight.register_hook(lambda g: torch.full_like(g, float("inf")))
        return real_forward(self, batch)

    monkeypatch.setattr(SASRec, "forward", forward)
    cfg = load_config(REPO / "configs/sasrec_beauty.yaml", SMALL)
    with pytest.raises(TrainingDiverged) as excinfo:
        run_training(cfg, tmp_path / "run")
    text = message_of(excinfo)
    assert "non-finite gradient at epoch 1, step 4" in text
    first = text.split("First non-finite in epoch 1: ")[1].split("; ")[0]
    assert first == "step 3: the gradient of encoder.blocks.0.ffn_out.weight"
    assert "step 4: loss terms" in text


def test_watch_records_the_first_step_per_value_and_reads_nothing_until_asked():
    watch = NonFiniteWatch()
    nan, one = torch.tensor(float("nan")), torch.tensor(1.0)
    watch.observe_terms({"loss": one, "rec": one}, 1)
    assert watch.report() is None
    watch.observe_terms({"loss": nan, "rec": one}, 2)
    watch.observe_terms({"loss": nan, "rec": nan}, 3)
    module = torch.nn.Linear(2, 1)
    module(torch.ones(1, 2)).sum().backward()
    module.bias.grad.fill_(float("inf"))
    watch.observe_gradients(gradient_norms(module), 3, member="e5")
    kind, text = watch.report()
    assert kind == "loss term"
    assert text == "step 2: loss terms loss; step 3: the gradient of bias of member e5"
    watch.reset()
    assert watch.report() is None


def test_gradient_norms_match_torch_norms():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    module(torch.randn(5, 3)).pow(2).sum().backward()
    names, norms = gradient_norms(module)
    assert names == tuple(n for n, _ in module.named_parameters())
    torch.testing.assert_close(norms, torch.stack([p.grad.norm() for p in module.parameters()]))
    assert gradient_norms(torch.nn.Linear(2, 2)) is None          # no gradients yet


# -- NaN scores at evaluation ------------------------------------------------------------------

class FactorModel(torch.nn.Module):
    """A scorer by factors whose queries are given (NaN rows included)."""

    never_rank = (0,)

    def __init__(self, queries: torch.Tensor, table: torch.Tensor):
        super().__init__()
        self.queries, self.table = queries, table
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def user_query(self, ids):
        return self.queries[ids[:, -1]]

    def item_table(self):
        return self.table


def test_the_evaluator_refuses_nan_scores_naming_model_split_and_count():
    g = torch.Generator().manual_seed(0)
    users, items = 10, 30
    queries, table = torch.randn(users, 4, generator=g), torch.randn(items + 1, 4, generator=g)
    queries[[3, 7]] = float("nan")
    # The last input column holds the user's index, which is what user_query reads.
    split = SimpleNamespace(valid_input=torch.arange(users)[:, None], valid_target=torch.randint(1, items, (users,)),
                            valid_history=torch.zeros(users, 1, dtype=torch.long))
    model = FactorModel(queries, table)
    with pytest.raises(NonFiniteScores, match=r"^stub scored NaN or \+inf for 2 of 10 users on the valid split"):
        evaluate_split(model, split, "valid", (5, 10), batch_size=4, label="stub")
    queries[[3, 7]] = 0.0
    metrics = evaluate_split(model, split, "valid", (5, 10), batch_size=4, label="stub")
    assert set(metrics) == {"HR@5", "HR@10", "NDCG@5", "NDCG@10", "MRR@5", "MRR@10"}
