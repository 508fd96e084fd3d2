"""DiffuRec (docs/peers.md, "DiffuRec"): schedule, reverse step, prefix rows, the query-row
padding mask, training and determinism, respaced sampling, config checks and resume."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adarec.config import ModelConfig, apply_overrides, load_config
from adarec.data import UserSequences, build_split
from adarec.data.prefixes import expand_prefixes
from adarec.errors import ConfigError
from adarec.keyed_random import KeyedDraws, Streams, sequence_keys
from adarec.models import build_model
from adarec.models.peer_schedule import PeerSchedule, RespacedSchedule, spaced_timesteps

REPO = Path(__file__).resolve().parents[1]
NUM_ITEMS, MAX_LEN, HIDDEN = 40, 8, 16


def tiny(**kw) -> ModelConfig:
    base = {"name": "diffurec", "hidden_size": HIDDEN, "num_layers": 2, "num_heads": 4, "hidden_dropout": 0.1,
            "attn_dropout": 0.1, "emb_dropout": 0.3, "diffusion_steps": 32, "sample_steps": 32,
            "noise_schedule": "trunc_lin", "lambda_uncertainty": 1e-3}
    return ModelConfig(**{**base, **kw})


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(tiny(**kw), NUM_ITEMS, MAX_LEN)


def prefix_batch(rows=8, seed=0):
    """Left-padded histories of ragged lengths and a target in the last column of target_pos."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, NUM_ITEMS + 1, (rows, MAX_LEN), generator=g)
    lengths = torch.arange(rows) % MAX_LEN + 1
    ids = torch.where(torch.arange(MAX_LEN)[None] >= MAX_LEN - lengths[:, None], ids, 0)
    target = torch.zeros_like(ids)
    target[:, -1] = torch.randint(1, NUM_ITEMS + 1, (rows,), generator=g)
    return {"input_ids": ids, "target_pos": target, "row_key": torch.arange(100, 100 + rows, dtype=torch.int64)}


# ----------------------------------------------------------------------------- (1) schedule

def test_trunc_lin_schedule_and_posterior_coefficients_match_the_closed_forms():
    steps = 32
    sched = PeerSchedule("trunc_lin", steps)
    scale = 1000 / steps
    start, end = 1e-4 * scale + 0.01, 0.02 * scale + 0.01
    assert start == pytest.approx(0.013125) and end == pytest.approx(0.635)
    beta = [start + (end - start) * i / (steps - 1) for i in range(steps)]
    abar, prod = [], 1.0
    for b in beta:
        prod *= 1.0 - b
        abar.append(prod)
    prev = [1.0, *abar[:-1]]
    post_var = [beta[i] * (1 - prev[i]) / (1 - abar[i]) for i in range(steps)]
    expected = {
        "beta": beta, "abar": abar, "sqrt_abar": [math.sqrt(a) for a in abar],
        "sqrt_one_minus_abar": [math.sqrt(1 - a) for a in abar],
        "coef_x0": [beta[i] * math.sqrt(prev[i]) / (1 - abar[i]) for i in range(steps)],
        "coef_xt": [(1 - prev[i]) * math.sqrt(1 - beta[i]) / (1 - abar[i]) for i in range(steps)],
        "log_var": [math.log(post_var[1])] + [math.log(b) for b in beta[1:]],
    }
    for name, values in expected.items():
        torch.testing.assert_close(getattr(sched, name), torch.tensor(values, dtype=torch.float32),
                                   rtol=1e-6, atol=1e-7, msg=name)
    assert sched.beta[0].item() == pytest.approx(0.013125) and sched.beta[-1].item() == pytest.approx(0.635)
    assert abar[-1] < 1e-5                                   # x_T is (almost) pure noise


def test_respaced_schedule_is_the_schedule_at_full_length_and_keeps_the_marginals():
    full, same = PeerSchedule("trunc_lin", 32), RespacedSchedule("trunc_lin", 32, list(range(32)))
    for name in ("beta", "abar", "coef_x0", "coef_xt", "log_var"):
        torch.testing.assert_close(getattr(same, name), getattr(full, name), rtol=1e-6, atol=0, msg=name)
    taus = spaced_timesteps(32, 4)
    assert taus == [0, 10, 21, 31]                           # round(i * 31 / 3)
    assert spaced_timesteps(32, 5) == [0, 8, 16, 23, 31] and spaced_timesteps(32, 1) == [0]
    short = RespacedSchedule("trunc_lin", 32, taus)
    torch.testing.assert_close(short.abar, full.abar[taus], rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.cumprod(1 - short.beta.double(), 0).float(), full.abar[taus], rtol=1e-3, atol=0)


# ----------------------------------------------------------------------------- (2) reverse step

def test_one_reverse_step_is_the_posterior_mean_plus_fixed_large_noise():
    sched = PeerSchedule("trunc_lin", 32)
    g = torch.Generator().manual_seed(1)
    x0_hat, x_t, noise = (torch.randn(3, 5, generator=g) for _ in range(3))
    t = torch.tensor([7, 0, 31])
    out = sched.posterior_step(x0_hat, x_t, t, noise)
    beta = np.linspace(0.013125, 0.635, 32)
    abar = np.cumprod(1 - beta)
    for row, step in enumerate(t.tolist()):
        prev = abar[step - 1] if step > 0 else 1.0
        mean = (beta[step] * math.sqrt(prev) / (1 - abar[step]) * x0_hat[row].double()
                + (1 - prev) * math.sqrt(1 - beta[step]) / (1 - abar[step]) * x_t[row].double())
        std = math.sqrt(beta[step]) if step > 0 else 0.0           # fixed-large: beta_t; none at t = 0
        torch.testing.assert_close(out[row].double(), mean + std * noise[row].double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1], x0_hat[1], rtol=1e-6, atol=1e-6)  # t = 0: the mean is x0_hat


def test_score_runs_the_reverse_process_with_keyed_noise():
    """score() against a hand-run reverse process, with the Approximator replaced by a known map."""
    model = make(sample_steps=4).eval()
    calls = []

    def fake(history, query_pad, x_t, t, lam_noise):
        calls.append((t.clone(), lam_noise.clone()))
        return 0.5 * x_t + 0.1 * history[:, -1]

    model.approximator.forward = fake
    ids = prefix_batch(3)["input_ids"]
    model.prepare(None, "cpu", seed=11)
    scores = model.score(ids)

    keys = sequence_keys(ids, 11)
    history = model.emb_norm(model.item_embeddings(ids))
    beta = np.linspace(0.013125, 0.635, 32)
    abar = np.cumprod(1 - beta)[[0, 10, 21, 31]]
    x = KeyedDraws(keys, Streams.REVERSE).normal((HIDDEN,)).double()
    for i in reversed(range(4)):
        step_keys = keys ^ (((i + 1) * 0x9E3779B97F4A7C15) % 2**62)     # fresh keys per step
        assert torch.equal(calls[3 - i][0], torch.full((3,), [0, 10, 21, 31][i]))
        assert torch.equal(calls[3 - i][1], KeyedDraws(step_keys, Streams.LAMBDA).normal((MAX_LEN, HIDDEN)))
        x0_hat = 0.5 * x + 0.1 * history[:, -1].double()
        prev = abar[i - 1] if i > 0 else 1.0
        b = 1 - abar[i] / prev
        mean = b * math.sqrt(prev) / (1 - abar[i]) * x0_hat + (1 - prev) * math.sqrt(1 - b) / (1 - abar[i]) * x
        step_noise = KeyedDraws(step_keys, Streams.REVERSE).normal((HIDDEN,)).double()
        x = mean + (math.sqrt(b) * step_noise if i > 0 else 0.0)
    expected = x @ model.item_embeddings.weight.double().t()
    assert scores.shape == (3, NUM_ITEMS + 2) and scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- (3), (8) prefix rows

def sequences(lengths, num_items=100):
    """Users with distinct items: item 10 u + p + 1 is user u's item at position p."""
    items = np.concatenate([10 * u + np.arange(n) + 1 for u, n in enumerate(lengths)])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return UserSequences(items=items.astype(np.int64), offsets=offsets.astype(np.int64),
                         user_ids=np.arange(len(lengths)) + 1, num_items=num_items, source="test")


@pytest.mark.parametrize("augmented", [0, 2])
def test_prefix_rows_are_every_target_with_its_last_items(augmented):
    lengths, width = [5, 3, 9, 6], 4
    if augmented:
        lengths = [n for n in lengths if n >= 3 + augmented]
    seqs = sequences(lengths)
    split = expand_prefixes(seqs, build_split(seqs, width, augmented_prefix=augmented), augmented)
    expected_in, expected_target, expected_user = [], [], []
    for u, n in enumerate(lengths):
        s = list(seqs.sequence(u))
        for j in range(max(1, augmented), n - 2):            # s[n-2], s[n-1] are valid/test targets
            history = s[max(0, j - width):j]
            expected_in.append([0] * (width - len(history)) + history)
            expected_target.append([0] * (width - 1) + [s[j]])
            expected_user.append(u)
    assert len(expected_in) == sum(max(n - 2 - max(1, augmented), 0) for n in lengths)
    if not augmented:
        assert len(expected_in) == sum(n - 3 for n in lengths)
    assert split.train_input.tolist() == expected_in
    assert split.train_target.tolist() == expected_target
    assert split.train_user.tolist() == expected_user


def test_no_prefix_row_reads_its_target_or_later():
    seqs = sequences([12, 5, 9, 4])
    split = expand_prefixes(seqs, build_split(seqs, 6))
    for row, target, user in zip(split.train_input, split.train_target[:, -1], split.train_user, strict=True):
        pos = int(target) - 10 * int(user) - 1                  # the target's position in its sequence
        assert 1 <= pos <= seqs.lengths()[user] - 3
        items = row[row > 0]
        positions = (items - 10 * int(user) - 1).tolist()
        assert all(0 <= p < pos for p in positions)              # only this user's earlier items
        assert positions == list(range(pos - len(positions), pos))  # the contiguous run up to pos - 1
        assert len(positions) == min(pos, 6)


# ----------------------------------------------------------------------------- (4) padding mask

def reference_block(block, x, keep):
    """The public code's block (eval mode): pre-LN, scores filled with -1e9 where keep [B, L, L]
    is False (the public code: keep[b, i, j] = item at query position i)."""
    b, length, hidden = x.shape
    heads = block.heads
    q, k, v = block.qkv(block.attn_norm(x)).view(b, length, 3, heads, -1).permute(2, 0, 3, 1, 4)
    corr = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    mask = keep[:, None].expand(b, heads, length, length)
    prob = torch.softmax(corr.masked_fill(~mask, -1e9), dim=-1)
    ctx = (prob @ v).transpose(1, 2).reshape(b, length, hidden)
    x = x + block.attn_out(ctx)
    h = block.ffn_in(block.ffn_norm(x))
    h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    return x + block.ffn_out(h)


def test_block_matches_the_query_row_mask_of_the_public_code():
    model = make().eval()
    block = model.approximator.blocks[0]
    ids = prefix_batch(6)["input_ids"]
    x = torch.randn(6, MAX_LEN, HIDDEN)
    valid = ids > 0
    ours = block(x, (ids == 0)[:, None, :, None])
    query_rows = valid[:, :, None].expand(6, MAX_LEN, MAX_LEN)
    torch.testing.assert_close(ours, reference_block(block, x, query_rows), rtol=1e-5, atol=1e-5)
    # A padding query attends uniformly: all its scores are equal, whatever q and k are.
    # The usual key mask (padding invisible to real queries) gives other outputs at real positions.
    key_cols = (valid[:, None, :] | ~valid[:, :, None]).expand(6, MAX_LEN, MAX_LEN)
    real = valid[:, :, None].expand_as(ours)
    assert not torch.allclose(ours[real], reference_block(block, x, key_cols)[real], atol=1e-4)


def test_real_positions_read_the_padding_embedding():
    model = make().eval()
    ids = prefix_batch(8)["input_ids"]                        # lengths 1..8: only the last row is full
    has_pad = (ids == 0).any(1)
    assert has_pad[:-1].all() and not has_pad[-1]
    lam = torch.randn(8, MAX_LEN, HIDDEN)
    x_t, t = torch.randn(8, HIDDEN), torch.full((8,), 5)

    def run():
        history, pad = model.embed_history(ids)
        return model.approximator(history, pad, x_t, t, lam)

    before = run()
    with torch.no_grad():
        model.item_embeddings.weight[0] = torch.randn(HIDDEN)   # not a shift: LayerNorm removes those
    after = run()
    changed = (before - after).abs().amax(1) > 1e-6
    assert torch.equal(changed, has_pad)                      # exactly the rows that hold padding


# ----------------------------------------------------------------------------- (5) training, determinism

def test_loss_is_the_ce_of_the_approximator_output_on_q_sampled_targets():
    model = make().train()
    batch = prefix_batch(8)
    seen = {}

    def capture(module, args, output):
        seen["x_t"], seen["t"], seen["lam"], seen["out"] = args[2], args[3], args[4], output

    model.approximator.register_forward_hook(capture)
    loss, terms = model(batch)
    keys, target = batch["row_key"], batch["target_pos"][:, -1]
    t = (KeyedDraws(keys, Streams.TIMESTEPS).uniform(()) * 32).long()
    eps = KeyedDraws(keys, Streams.PEER_NOISE).normal((HIDDEN,))
    abar = torch.tensor(np.cumprod(1 - np.linspace(0.013125, 0.635, 32)), dtype=torch.float64)[t][:, None]
    x0 = model.item_embeddings.weight[target].double()
    assert torch.equal(seen["t"], t)
    torch.testing.assert_close(seen["x_t"].double(), abar.sqrt() * x0 + (1 - abar).sqrt() * eps.double())
    assert torch.equal(seen["lam"], KeyedDraws(keys, Streams.LAMBDA).normal((MAX_LEN, HIDDEN)))
    logits = seen["out"] @ model.item_embeddings.weight[: NUM_ITEMS + 1].t()   # padding row included
    torch.testing.assert_close(loss, F.cross_entropy(logits, target))
    assert torch.equal(terms["rec"], loss.detach())


def test_training_lowers_the_loss_and_is_deterministic():
    batch = prefix_batch(16)
    a, b = make(seed=3), make(seed=3)
    losses = []
    for model in (a, b):
        torch.manual_seed(7)                                  # the dropout masks; the rest is keyed
        losses.append(model(batch)[0])
    assert torch.equal(losses[0], losses[1])                  # same seed, same batch: same loss
    opt = torch.optim.Adam(a.parameters(), lr=1e-2)
    torch.manual_seed(0)                                      # the dropout masks
    first = None
    for _ in range(30):
        loss, _ = a(batch)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    a.eval()
    with torch.no_grad():
        assert a(batch)[0].item() < 0.5 * first


def test_scores_are_deterministic_and_independent_of_the_batch():
    model = make(seed=2, sample_steps=8).eval()
    model.prepare(None, "cpu", seed=5)
    ids = prefix_batch(8, seed=4)["input_ids"]
    full = model.score(ids)
    assert torch.equal(model.score(ids), full)
    torch.testing.assert_close(model.score(ids[:4]), full[:4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.score(ids.flip(0))[:4].flip(0), full[4:], rtol=1e-5, atol=1e-5)
    model.prepare(None, "cpu", seed=6)
    assert not torch.allclose(model.score(ids), full)         # the seed drives the start noise
    # The seed is in the state dict, so a reloaded model (resume, best weights) scores the same.
    other = make(seed=9, sample_steps=8).eval()
    other.load_state_dict(model.state_dict())
    assert torch.equal(other.score(ids), model.score(ids))


def test_bf16_autocast_and_bf16_weights_run():
    model = make()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model(prefix_batch(4))
        scores = model.eval().score(prefix_batch(4)["input_ids"])
    assert torch.isfinite(loss) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    model = make(sample_steps=2).to(torch.bfloat16)          # DeepSpeed's bf16 engine: bf16 weights
    loss, _ = model.train()(prefix_batch(4))
    scores = model.eval().score(prefix_batch(4)["input_ids"])
    assert torch.isfinite(loss) and scores.dtype == torch.float32 and torch.isfinite(scores).all()


def test_long_reverse_processes_get_fresh_draws_every_step():
    """More steps than one KeyedDraws has calls (256): each step draws from its own keys."""
    model = make(diffusion_steps=257, sample_steps=257, num_layers=1).eval()
    assert torch.isfinite(model.score(prefix_batch(2)["input_ids"])).all()


# ----------------------------------------------------------------------------- (6), (7) sampling steps

@pytest.mark.parametrize("steps", [32, 5, 1])
def test_sample_steps_sets_the_number_of_approximator_calls(steps):
    model = make(sample_steps=steps).eval()
    seen = []
    model.approximator.register_forward_hook(lambda m, args, out: seen.append(int(args[3][0])))
    model.score(prefix_batch(2)["input_ids"])
    assert seen == spaced_timesteps(32, steps)[::-1]
    assert len(seen) == steps


@pytest.mark.parametrize("overrides", [
    ["model.name=diffurec", "model.diffusion_steps=32", "model.sample_steps=40"],
    ["model.name=diffurec", "model.sample_steps=0"],
])
def test_bad_sample_steps_name_the_key(overrides):
    with pytest.raises(ConfigError, match=r"model\.sample_steps"):
        load_config(None, overrides)


def test_configs_load_with_the_papers_settings():
    for name in ("beauty", "toys"):
        cfg = load_config(REPO / f"configs/diffurec_{name}.yaml")
        m, t = cfg.model, cfg.train
        assert (m.name, m.hidden_size, m.num_layers, m.num_heads, m.diffusion_steps) == ("diffurec", 128, 4, 4, 32)
        assert (m.hidden_dropout, m.emb_dropout, m.lambda_uncertainty) == (0.1, 0.3, 1e-3)
        assert (t.batch_size, t.lr) == (512, 1e-3)
        assert cfg.eval.protocol == "full" and cfg.data.max_len == 50


# ----------------------------------------------------------------------------- (9) resume

def test_resume_matches_an_uninterrupted_run(tmp_path):
    from adarec.engine.trainer import run_training

    small = ["data.max_users=40", "data.max_len=10", "model.hidden_size=16", "model.num_layers=1",
             "model.sample_steps=4", "train.batch_size=64", "train.eval_every=1", "train.device=cpu",
             "train.precision=fp32", "train.num_threads=1", "eval.batch_size=64"]

    def config(epochs):
        return load_config(REPO / "configs/diffurec_beauty.yaml", [*small, f"train.epochs={epochs}"])

    straight = run_training(config(2), tmp_path / "straight")
    run_training(config(1), tmp_path / "split")
    cfg = apply_overrides(load_config(tmp_path / "split" / "config.yaml"), ["train.epochs=2"])
    resumed = run_training(cfg, tmp_path / "split", resume=True)
    assert resumed == straight

    def losses(run):
        rows = [json.loads(line) for line in (run / "epochs.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    assert losses(tmp_path / "straight") == losses(tmp_path / "split")
