"""The per-term gradient diagnostic runs and reports every ELCRec term."""

import math
from pathlib import Path

import pytest
import torch
from adarec.profiling.loss_gradients import main, term_gradient_norms
from batches import synthetic_batch

from adarec.config import ModelConfig
from adarec.models import build_model

REPO = Path(__file__).resolve().parents[1]


def test_reports_each_term_and_group(capsys):
    code = main(["--config", str(REPO / "configs/elcrec_beauty.yaml"), "--set", "data.max_users=200",
                 "model.hidden_size=16", "model.num_intent_clusters=4", "train.batch_size=32"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].split()[:2] == ["term", "value"] and "transformer_blocks" in out[0]
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in out[1:]}
    assert set(rows) == {"rec", "cluster", "instance_cl", "intent_cl"}
    assert all(len(v) == 4 and all(math.isfinite(x) for x in v) for v in rows.values())  # value + 3 norms
    assert rows["rec"][1] > 0  # the rec loss reaches the item embeddings


def test_norms_match_a_direct_gradient_and_scale_with_the_term_weight():
    torch.manual_seed(0)
    cfg = ModelConfig(name="elcrec", hidden_size=16, num_layers=1, hidden_dropout=0.0, attn_dropout=0.0,
                      num_intent_clusters=4, trade_off=1.0)
    model = build_model(cfg, num_items=30, max_len=8)
    batch = synthetic_batch()
    rows = term_gradient_norms(model, batch)
    # rec on the item embeddings, computed directly.
    loss = model.rec_loss(model.encoder(batch["input_ids"]), batch)
    (grad,) = torch.autograd.grad(loss, model.encoder.item_embeddings.weight)
    assert rows["rec"]["item_embeddings"] == pytest.approx(float(grad.norm()), rel=1e-5)
    # Doubling the cluster weight doubles its norms; zero weight gives exactly zero.
    model.trade_off = 2.0
    doubled = term_gradient_norms(model, batch)
    model.trade_off = 0.0
    zero = term_gradient_norms(model, batch)
    for group in ("item_embeddings", "transformer_blocks"):
        assert doubled["cluster"][group] == pytest.approx(2 * rows["cluster"][group], rel=1e-5)
        assert zero["cluster"][group] == 0.0
        assert doubled["rec"][group] == pytest.approx(rows["rec"][group], rel=1e-6)
