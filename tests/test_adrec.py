"""ADRec (adarec/models/adrec.py): token-level forward diffusion, the reverse process on the last
token against a hand computation, the cached last-row inference against full recomputation,
causality, staged training, determinism, config validation and resume."""

from pathlib import Path

import numpy as np
import pytest
import torch
from batches import synthetic_batch
from test_causality import MAX_LEN, NUM_ITEMS, assert_causal, perturbation_ids

from adarec.config import ModelConfig, apply_overrides, load_config
from adarec.data import UserSequences, build_split
from adarec.errors import ConfigError
from adarec.grad_merge import merged_gradient_loss
from adarec.keyed_random import KeyedDraws, Streams, row_keys, sequence_keys
from adarec.models import build_model
from adarec.models.peer_schedule import betas

REPO = Path(__file__).resolve().parents[1]


def make_model(seed=0, **kw):
    base = {"name": "adrec", "hidden_size": 16, "num_layers": 2, "denoiser_layers": 2, "num_heads": 4,
            "hidden_dropout": 0.1, "attn_dropout": 0.1, "emb_dropout": 0.3, "diffusion_steps": 8,
            "sample_steps": 8, "lambda_uncertainty": 0.5}
    torch.manual_seed(seed)
    return build_model(ModelConfig(**{**base, **kw}), NUM_ITEMS, MAX_LEN)


def keyed_batch(seed=0, b=5):
    batch = synthetic_batch(NUM_ITEMS, b, MAX_LEN, seed)
    batch["row_key"] = torch.from_numpy(row_keys(7, 0, np.arange(b)))
    return batch


def capture_denoiser_input(model, monkeypatch):
    seen = {}
    original = model.denoiser_input

    def spy(c, x_t, t):
        seen.update(x_t=x_t, t=t)
        return original(c, x_t, t)

    monkeypatch.setattr(model, "denoiser_input", spy)
    return seen


def test_forward_diffuses_every_target_token_on_its_own(monkeypatch):
    model = make_model().train()
    batch = keyed_batch()
    seen = capture_denoiser_input(model, monkeypatch)
    model(batch)
    target, steps = batch["target_pos"], model.steps
    t = torch.clamp((KeyedDraws(batch["row_key"], Streams.TIMESTEPS).uniform((MAX_LEN,)) * steps).long(), max=steps - 1)
    eps = KeyedDraws(batch["row_key"], Streams.PEER_NOISE).normal((MAX_LEN, 16))
    abar = np.cumprod(1.0 - betas("trunc_lin", steps))
    emb = model.item_embeddings.weight.detach()
    checked = 0
    for b, i in zip(*torch.where(target > 0), strict=True):
        tt = int(t[b, i])
        want = np.sqrt(abar[tt]) * emb[target[b, i]].double() + np.sqrt(1 - abar[tt]) * eps[b, i].double()
        assert int(seen["t"][b, i]) == tt
        assert torch.allclose(seen["x_t"][b, i].double(), want, atol=1e-6)
        checked += 1
    assert checked == int((target > 0).sum()) and len(set(t[target > 0].tolist())) > 3   # per-token timesteps
    pad = target == 0
    assert (seen["t"][pad] == 0).all() and torch.equal(seen["x_t"][pad], emb[0].expand(int(pad.sum()), 16))


def test_losses_match_their_definitions(monkeypatch):
    model = make_model().eval()
    batch = keyed_batch()
    outputs = []
    model.denoiser[-1].register_forward_hook(lambda mod, args, out: outputs.append(out))
    loss, terms = model(batch)
    x0_hat, target = outputs[0], batch["target_pos"]
    emb = model.item_embeddings.weight.detach()
    logits = x0_hat @ emb[:NUM_ITEMS + 1].t()                              # rows 0..N, padding included
    valid = target > 0
    ce = torch.nn.functional.cross_entropy(logits[valid], target[valid])
    sq = ((x0_hat - emb[target]) ** 2).mean(-1)
    mse = torch.stack([sq[b][valid[b]].mean() for b in range(target.shape[0])]).mean()
    assert torch.allclose(terms["ce"], ce, atol=1e-5) and torch.allclose(terms["mse"], mse, atol=1e-6)
    assert torch.allclose(loss, ce + mse, atol=1e-5)
    assert model.loss_parts[0].requires_grad and torch.equal(model.loss_parts[1].detach(), terms["mse"])


def test_reverse_process_matches_a_hand_computation():
    model = make_model(diffusion_steps=3, sample_steps=3).eval()
    model.prepare(None, "cpu", seed=5)
    ids = perturbation_ids()
    beta = betas("trunc_lin", 3)
    abar = np.cumprod(1.0 - beta)
    abar_prev = np.append(1.0, abar[:-1])
    coef_x0, coef_xt = beta * np.sqrt(abar_prev) / (1 - abar), (1 - abar_prev) * np.sqrt(1 - beta) / (1 - abar)
    log_var = np.log(np.append(beta[1] * (1 - abar[0]) / (1 - abar[1]), beta[1:]))
    draws = KeyedDraws(sequence_keys(ids, 5), Streams.REVERSE)
    emb = model.item_embeddings.weight.detach()
    with torch.no_grad():
        c = model.condition(ids, emb)
        valid = ids > 0
        next_item = torch.cat([ids[:, 1:] * valid[:, :-1], torch.zeros_like(ids[:, :1])], 1)
        x = draws.normal((16,))
        for step in (2, 1, 0):
            # All rows through the blocks as in training: history t = 0 with its clean next item.
            x_t = torch.cat([emb[next_item[:, :-1]], x[:, None]], 1)
            t = torch.zeros_like(ids)
            t[:, -1] = step
            h = model.denoiser_input(c, x_t, t)
            for block in model.denoiser:
                h = block(h, valid)
            mean = coef_x0[step] * h[:, -1] + coef_xt[step] * x
            noise = draws.normal((16,))
            x = mean + (np.exp(0.5 * log_var[step]) * noise if step > 0 else 0.0)
        want = x @ emb.t()
    got = model.score(ids)
    assert got.dtype == torch.float32 and got.shape == (3, NUM_ITEMS + 2)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("layers, sample_steps", [(1, 8), (2, 8), (2, 3)])
def test_last_row_inference_equals_full_recomputation_exactly(layers, sample_steps):
    model = make_model(denoiser_layers=layers, sample_steps=sample_steps).eval()
    model.prepare(None, "cpu", seed=3)
    ids = torch.cat([perturbation_ids(), synthetic_batch(NUM_ITEMS, 5, MAX_LEN, 1)["input_ids"]])
    fast, full = model.score(ids), model.score_recomputed(ids)
    assert torch.equal(fast, full)
    assert fast.std() > 0


def test_training_is_causal():
    """x0_hat at item positions < j reads neither the input item at j nor the noised target at j."""
    model = make_model().train()
    targets = synthetic_batch(NUM_ITEMS, 3, MAX_LEN, 2)["target_pos"]
    ids = perturbation_ids()
    targets = torch.where(ids > 0, targets, 0)

    def outputs(input_ids, target_pos):
        captured = []
        handle = model.denoiser[-1].register_forward_hook(lambda mod, args, out: captured.append(out))
        model({"input_ids": input_ids, "target_pos": target_pos})
        handle.remove()
        return captured

    assert_causal(lambda x: outputs(x, targets), ids)
    assert_causal(lambda x: outputs(ids, x), ids)


def tiny_split():
    g = np.random.default_rng(0)
    lengths = g.integers(4, 10, size=40)
    items = g.integers(1, NUM_ITEMS + 1, size=int(lengths.sum()))
    seqs = UserSequences(items=items.astype(np.int64), offsets=np.concatenate([[0], np.cumsum(lengths)]),
                         user_ids=np.arange(40), num_items=NUM_ITEMS, source="synthetic")
    return build_split(seqs, max_len=MAX_LEN)


def test_pretraining_sets_the_embeddings_deterministically():
    split = tiny_split()
    a, b, c = (make_model(pretrain_epochs=2) for _ in range(3))
    before = a.item_embeddings.weight.detach().clone()
    rng = torch.get_rng_state()
    a.prepare(split, "cpu", seed=11)
    assert torch.equal(torch.get_rng_state(), rng)                     # the caller's RNG is untouched
    b.prepare(split, "cpu", seed=11)
    c.prepare(split, "cpu", seed=12)
    after = a.item_embeddings.weight.detach()
    assert not torch.allclose(after, before) and torch.equal(after, b.item_embeddings.weight)
    assert not torch.equal(after, c.item_embeddings.weight)
    # Row 0 starts at 0 but is a negative of every softmax (rows 0..N, as the public code), so it moves.
    assert after[0].abs().sum() > 0


@pytest.mark.parametrize("merge", ["sum", "pcgrad"])
def test_frozen_epochs_leave_the_embeddings_unchanged(merge):
    model = make_model(freeze_epochs=2).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    emb = model.item_embeddings.weight

    def step(seed):
        optimizer.zero_grad(set_to_none=True)
        loss, _ = model(keyed_batch(seed))
        if merge == "pcgrad":
            loss = merged_gradient_loss(model, model.loss_parts, "pcgrad")
        loss.backward()
        optimizer.step()

    start, other = emb.detach().clone(), model.cam[0].query.weight.detach().clone()
    for epoch in range(2):
        model.begin_epoch(epoch)
        step(epoch)
        assert emb.grad is None or torch.equal(emb.grad, torch.zeros_like(emb))
    assert torch.equal(emb, start) and not torch.equal(model.cam[0].query.weight, other)
    model.begin_epoch(2)
    step(2)
    assert not torch.equal(emb, start)


def test_same_seed_same_numbers_and_scores_independent_of_the_batch():
    batch = keyed_batch()
    a, b = make_model(seed=4).train(), make_model(seed=4).train()
    torch.manual_seed(1)
    loss_a, _ = a(batch)
    torch.manual_seed(1)
    loss_b, _ = b(batch)
    assert torch.equal(loss_a, loss_b)
    a.eval().prepare(None, "cpu", 9)
    b.eval().prepare(None, "cpu", 9)
    ids = synthetic_batch(NUM_ITEMS, 5, MAX_LEN, 3)["input_ids"]
    scores = a.score(ids)
    assert torch.equal(scores, b.score(ids))
    perm = torch.tensor([3, 1, 4, 0, 2])
    assert torch.equal(a.score(ids[perm]), scores[perm])
    # Another batch size changes the matmul shapes, so only the rounding may differ.
    assert torch.allclose(a.score(ids[1:3]), scores[1:3], atol=1e-5)
    a.prepare(None, "cpu", 10)
    assert not torch.allclose(a.score(ids), scores, atol=1e-3)          # the seed keys the start noise


def test_pcgrad_needs_adrec():
    with pytest.raises(ConfigError, match="train.grad_merge"):
        load_config(REPO / "configs/sasrec_beauty.yaml", ["train.grad_merge=pcgrad"])
    for name in ("beauty", "toys", "sports"):
        cfg = load_config(REPO / f"configs/adrec_{name}.yaml")
        assert cfg.model.name == "adrec" and cfg.train.grad_merge == "pcgrad"


def test_two_epochs_equal_one_epoch_and_resume(tmp_path):
    from adarec.engine.trainer import run_training

    small = ["data.max_users=120", "model.hidden_size=16", "model.diffusion_steps=4", "model.sample_steps=4",
             "model.max_depth=4", "model.pretrain_epochs=1", "model.freeze_epochs=1", "train.batch_size=64",
             "train.eval_every=1", "train.device=cpu", "train.precision=fp32", "train.num_threads=1"]
    cfg = load_config(REPO / "configs/adrec_beauty.yaml", [*small, "train.epochs=2"])
    straight = run_training(cfg, tmp_path / "straight")
    run_training(load_config(REPO / "configs/adrec_beauty.yaml", [*small, "train.epochs=1"]), tmp_path / "split")
    resumed_cfg = apply_overrides(load_config(tmp_path / "split/config.yaml"), ["train.epochs=2"])
    assert run_training(resumed_cfg, tmp_path / "split", resume=True) == straight


def test_bf16_autocast_trains_and_scores_in_float32():
    model = make_model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(keyed_batch())
        merged_gradient_loss(model, model.loss_parts, "pcgrad").backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = model.score(perturbation_ids())
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()


def test_fewer_sample_steps_respace_the_reverse_process(monkeypatch):
    """sample_steps = 3 of T = 8: the denoiser is told the timesteps 7, 4, 0 (evenly spaced, both
    ends kept) and each step is the respaced DDPM's posterior step."""
    model = make_model(sample_steps=3).eval()
    model.prepare(None, "cpu", seed=3)
    told = []
    original = model.denoiser_input
    monkeypatch.setattr(model, "denoiser_input",
                        lambda c, x_t, t: told.append(t.flatten().unique().tolist()) or original(c, x_t, t))
    model.score(perturbation_ids())
    assert told[1:] == [[7], [4], [0]]                     # told[0]: the history rows, t = 0
    abar = np.cumprod(1 - betas("trunc_lin", 8))[[0, 4, 7]]
    beta = 1 - abar / np.append(1.0, abar[:-1])
    assert np.allclose(model.reverse_schedule.beta.numpy(), beta, rtol=1e-6)
