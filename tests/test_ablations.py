"""ADARec's level schedules, the paper's Table 4 ablations and the hierarchy diagnostics
(docs/method.md 2.2, "Ablations", "Diagnostics").

Each ablation is checked for what it removes (its modules and loss term are gone) and for what
it keeps (the rest computes what the full model computes with the same weights and draws, the
removed part replaced by what the ablation says stands in for it)."""

import json
import math

import pytest
import torch
from batches import synthetic_batch

from adarec.config import ConfigError, ModelConfig, load_config
from adarec.diffusion import level_tables
from adarec.models import build_model
from adarec.models.controller import fixed_decision
from adarec.models.hierarchy_diagnostics import hierarchy_diagnostics

NUM_ITEMS, MAX_LEN, T_MAX, HIDDEN = 30, 8, 3, 8


def cfg(**kw):
    base = {"name": "adarec", "hidden_size": HIDDEN, "num_layers": 1, "num_heads": 2, "hidden_dropout": 0.0,
            "attn_dropout": 0.0, "num_intent_clusters": 3, "max_depth": T_MAX, "level_layout": "grid"}
    base.update(kw)
    return ModelConfig(**base)


def pair(ablate, **kw):
    """(full model, ablated model) with the same weights wherever both have them."""
    torch.manual_seed(0)
    full = build_model(cfg(**kw), num_items=NUM_ITEMS, max_len=MAX_LEN, kernel_backend="eager").train()
    ablated = build_model(cfg(ablate=ablate, **kw), num_items=NUM_ITEMS, max_len=MAX_LEN,
                          kernel_backend="eager").train()
    own = ablated.state_dict()
    shared = {k: v for k, v in full.state_dict().items() if k in own and own[k].shape == v.shape}
    ablated.load_state_dict({**own, **shared})
    return full, ablated


def batch(seed=0):
    b = synthetic_batch(NUM_ITEMS, 5, MAX_LEN, seed)
    b["row_key"] = torch.tensor([11, 2**40 + 3, 5, 99, 2**61 + 1], dtype=torch.int64)
    return b


def param_names(model):
    return {n.split(".")[0] for n, _ in model.named_parameters()}


# -- level schedules ----------------------------------------------------------------------------

def test_span_levels_fall_linearly_in_abar_to_the_final_signal():
    a, s = level_tables(8, 50, "span", 0.2)
    abar = a.double() ** 2
    assert float(a[0]) == 1 and float(s[0]) == 0 and float(a[-1]) == pytest.approx(0.2)
    steps = abar[:-1] - abar[1:]
    torch.testing.assert_close(steps, torch.full_like(steps, (1 - 0.04) / 8), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.double() ** 2 + s.double() ** 2, torch.ones(9, dtype=torch.float64), rtol=0, atol=1e-6)


def test_authors_levels_are_the_first_steps_of_the_50_step_schedule():
    a, s = level_tables(8, 50, "authors")
    betas = torch.linspace(1e-4, 0.02, 50, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)[:8]
    torch.testing.assert_close(a[1:].double(), abar.sqrt(), rtol=1e-6, atol=1e-7)
    assert float(s[-1]) == pytest.approx(0.11, abs=0.005)          # at most 0.11 of noise


@pytest.mark.parametrize(("override", "message"), [
    ("model.level_schedule=cosine", "model.level_schedule must be one of authors, span"),
    ("model.final_signal=1.0", "model.final_signal must be in (0, 1)"),
    ("model.ablate=[hda,tree]", "model.ablate must list distinct components among adc, hda, hpmoe, router, cont"),
    ("model.fixed_depth=9", "model.fixed_depth must be in [0, model.max_depth]"),
])
def test_bad_schedule_and_ablation_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        load_config(None, ["model.name=adarec", override])


def test_span_allows_more_levels_than_the_authors_schedule_has_steps():
    load_config(None, ["model.name=adarec", "model.level_schedule=span", "model.max_depth=60",
                       "model.diffusion_steps=50"])
    with pytest.raises(ConfigError, match="model.max_depth"):
        load_config(None, ["model.name=adarec", "model.max_depth=60", "model.diffusion_steps=50"])


# -- ablations ------------------------------------------------------------------------------------

def test_without_adc_every_prefix_gets_the_fixed_depth_and_the_rest_is_unchanged(monkeypatch):
    full, ablated = pair(["adc"], fixed_depth=2)
    assert "controller" not in param_names(ablated)
    b = batch()
    _, terms = ablated(b)
    assert "expl" not in terms and {"rec", "deno", "cont"} <= set(terms)
    out = ablated.user_representation(b["input_ids"], row_keys=b["row_key"])
    items = b["input_ids"] > 0
    assert (out["decision"].depths[items] == 2).all() and (out["decision"].depths[~items] == 0).all()
    # The full model with its controller's decision replaced by the fixed one: the same terms.
    monkeypatch.setattr(type(full.controller), "forward", lambda self, e0, ids, g=None: fixed_decision(ids, 2, T_MAX))
    _, want = full(b)
    for key in terms:
        torch.testing.assert_close(terms[key], want[key], rtol=1e-6, atol=1e-7)


def test_without_hda_every_level_is_the_clean_sequence(monkeypatch):
    full, ablated = pair(["hda"])
    assert "denoiser" not in param_names(ablated)
    b = batch()
    out = ablated.user_representation(b["input_ids"], row_keys=b["row_key"])
    e0 = ablated.encoder.embed(b["input_ids"])
    items = (b["input_ids"] > 0)[out["packed"].pair_user]
    torch.testing.assert_close(out["e_hat"][items], e0[out["packed"].pair_user][items])
    _, terms = ablated(b)
    assert "deno" not in terms
    clean = type(full)._trajectory

    def clean_levels(self, e0, input_ids, packed, row_keys=None):
        valid = (input_ids > 0)[packed.pair_user].unsqueeze(-1).to(e0.dtype)
        return e0[packed.pair_user] * valid, e0.sum() * 0.0

    monkeypatch.setattr(type(full), "_trajectory", clean_levels)
    _, want = full(b)
    monkeypatch.setattr(type(full), "_trajectory", clean)
    for key in terms:
        torch.testing.assert_close(terms[key], want[key], rtol=1e-6, atol=1e-7)


def test_without_hpmoe_h_is_the_fine_experts_mean_over_the_active_levels():
    _, ablated = pair(["hpmoe"])
    assert not {"coarse", "router", "final_gate", "level_embedding"} & param_names(ablated)
    b = batch()
    out = ablated.user_representation(b["input_ids"], row_keys=b["row_key"])
    packed, depths = out["packed"], out["decision"].depths
    fine = ablated.encoder.encode(out["e_hat"], b["input_ids"][packed.pair_user])
    for u in range(b["input_ids"].shape[0]):
        for i in range(MAX_LEN):
            rows = [p for p in range(packed.num_pairs)
                    if packed.pair_user[p] == u and packed.pair_level[p] <= depths[u, i]]
            want = torch.stack([fine[p, i] for p in rows]).mean(0)
            torch.testing.assert_close(out["h"][u, i], want, rtol=1e-5, atol=1e-6)
    _, terms = ablated(b)
    assert "cont" not in terms and {"rec", "deno", "expl"} <= set(terms)
    assert not any(k.startswith("router_g") for k in ablated.pop_epoch_stats())


def test_without_the_content_aware_router_the_gate_reads_the_level_only():
    _, ablated = pair(["router"])
    b, other = batch(0), batch(1)
    g = ablated.user_representation(b["input_ids"], row_keys=b["row_key"])["g"]
    out = ablated.user_representation(other["input_ids"], row_keys=other["row_key"])
    levels = out["packed"].pair_level
    for level in range(T_MAX + 1):
        values = torch.cat([g[out["packed"].pair_level == level].flatten(), out["g"][levels == level].flatten()])
        assert torch.allclose(values, values[0].expand_as(values))
    assert ablated.router[0].in_features == HIDDEN


def test_without_l_cont_the_loss_is_the_full_loss_minus_its_term():
    full, ablated = pair(["cont"])
    b = batch()
    loss_full, terms_full = full(b)
    loss, terms = ablated(b)
    assert "cont" not in terms
    for key in terms:
        torch.testing.assert_close(terms[key], terms_full[key])
    torch.testing.assert_close(loss, loss_full - full.lambda_cont * terms_full["cont"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ablate", [["adc"], ["hda"], ["hpmoe"], ["router"], ["cont"], ["hpmoe", "router", "cont"],
                                    ["adc", "hda"]])
def test_every_ablation_trains_and_scores(ablate):
    _, model = pair(ablate)
    b = batch()
    loss, _ = model(b)
    loss.backward()
    assert math.isfinite(float(loss.detach()))
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    assert torch.isfinite(model.user_query(b["input_ids"])).all()


# -- diagnostics ------------------------------------------------------------------------------------

def test_diagnostics_see_a_flat_hierarchy_under_the_authors_levels_and_a_deep_one_under_span():
    ids = synthetic_batch(NUM_ITEMS, 5, MAX_LEN, 0)["input_ids"]
    torch.manual_seed(0)
    authors = build_model(cfg(max_depth=8), num_items=NUM_ITEMS, max_len=MAX_LEN, kernel_backend="eager")
    torch.manual_seed(0)
    span = build_model(cfg(max_depth=8, level_schedule="span", final_signal=0.2), num_items=NUM_ITEMS,
                       max_len=MAX_LEN, kernel_backend="eager")
    flat, deep = hierarchy_diagnostics(authors, ids), hierarchy_diagnostics(span, ids)
    assert set(flat) == {"controller_entropy", *(f"deno_{k}" for k in range(1, 9)), *(f"dist_{k}" for k in range(1, 9))}
    assert max(flat[f"dist_{k}"] for k in range(1, 9)) < 0.15
    dists = [deep[f"dist_{k}"] for k in range(1, 9)]
    assert dists == sorted(dists) and dists[-1] > 2.0            # level 8 keeps 0.2 of the signal
    assert 0 < flat["controller_entropy"] <= 1
    # An untrained denoiser predicts almost no noise: L_deno near 1 at every level.
    assert all(0.5 < flat[f"deno_{k}"] < 1.5 for k in range(1, 9))
    assert hierarchy_diagnostics(authors, ids) == flat           # fixed batch and noise: repeatable


def test_a_run_logs_the_diagnostics_and_draws_the_hierarchy(tmp_path):
    from pathlib import Path

    from adarec.engine.trainer import run_training

    repo = Path(__file__).resolve().parents[1]
    config = load_config(repo / "configs/adarec_beauty.yaml",
                         ["data.max_users=120", "model.hidden_size=16", "model.num_intent_clusters=4",
                          "model.max_depth=3", "train.batch_size=64", "train.epochs=1", "train.device=cpu",
                          "train.precision=fp32", "model.level_schedule=span"])
    run_training(config, tmp_path / "run")
    (row,) = [json.loads(line) for line in (tmp_path / "run/epochs.jsonl").read_text().splitlines()]
    for key in ("deno_1", "deno_3", "dist_1", "dist_3", "router_g_0", "depth_frac_3", "controller_entropy"):
        assert key in row and math.isfinite(row[key]), key
    assert (tmp_path / "run/hierarchy.png").stat().st_size > 10_000
