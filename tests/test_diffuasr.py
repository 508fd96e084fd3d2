"""DiffuASR: schedule, DDIM step, epsilon loss, evaluation rows, the augmented file and its CLI."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adarec.augment_file import guide_rows, round_to_items, write_augmented
from adarec.cli import main
from adarec.config import load_config, save_config
from adarec.data import build_split, read_sequences
from adarec.errors import AdarecError, ConfigError
from adarec.keyed_random import KeyedDraws, Streams, row_keys
from adarec.models.diffuasr import DiffuASR, ddim_step, split_block

K, D, L, N = 3, 16, 8, 30
TINY = ["model.name=diffuasr", f"model.hidden_size={D}", f"model.prefix_items={K}", "model.diffusion_steps=20",
        "model.noise_schedule=linear", "model.sample_steps=5", "model.denoiser_channels=8",
        "model.hidden_dropout=0.0", "model.guidance_weight=0.5", f"data.max_len={L}", "train.seed=7"]


def tiny_model(**changes):
    cfg = load_config(None, TINY + [f"model.{k}={v}" for k, v in changes.items()]).model
    torch.manual_seed(0)
    return DiffuASR(cfg, N, L)


def write_data(path: Path, users: int = 12, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    lines = [f"{u + 1} " + " ".join(map(str, rng.integers(1, N + 1, rng.integers(3, 14))))
             for u in range(users)]
    lines[0] = "1 " + " ".join(map(str, range(1, N + 1)))       # every item present: num_items = N
    path.write_text("\n".join(lines) + "\n")
    return path


def trained_run(tmp_path: Path, data: Path, name: str = "run") -> tuple[Path, object]:
    """A run folder as `adarec train` leaves it (config.yaml, best_model.pt), untrained weights."""
    cfg = load_config(None, [*TINY, f"data.path={data}"])
    run = tmp_path / name
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(1)
    model = DiffuASR(cfg.model, N, L)
    torch.save({"members": {"model": {"model": model.state_dict(), "epoch": 3, "metric": 0.1}}}, run / "best_model.pt")
    return run, cfg


def test_linear_schedule_matches_ddpm():
    cfg = load_config(None, [*TINY, "model.diffusion_steps=1000"]).model
    model = DiffuASR(cfg, N, L)
    beta = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    assert torch.allclose(model.schedule.beta, torch.tensor(beta), rtol=1e-6)
    abar = [math.prod(1 - b for b in beta[:t + 1]) for t in (0, 200, 400, 600, 800)]
    assert model.ddim_t == [0, 200, 400, 600, 800]
    assert torch.allclose(model.ddim_abar, torch.tensor(abar, dtype=torch.float32), rtol=1e-5)
    assert torch.allclose(model.ddim_abar_next, torch.tensor([1.0, *abar[:-1]], dtype=torch.float32), rtol=1e-5)


def test_one_ddim_step_by_hand():
    x, eps = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.25])
    out = ddim_step(x, eps, torch.tensor(0.25), torch.tensor(0.64))
    # x0_hat = (x - sqrt(.75) eps) / .5; x_next = .8 x0_hat + .6 eps
    expected = [0.8 * (1.0 - math.sqrt(0.75) * 0.5) / 0.5 + 0.6 * 0.5,
                0.8 * (-2.0 - math.sqrt(0.75) * 0.25) / 0.5 + 0.6 * 0.25]
    assert torch.allclose(out, torch.tensor(expected), atol=1e-6)


class _StubDenoiser(torch.nn.Module):
    """eps = 0.1 x + t / 100 + mean(guide): known in closed form, guide-dependent."""

    def forward(self, x, t, guide):
        return 0.1 * x + t[:, None, None] / 100 + guide.mean(1)[:, None, None]


def test_generate_is_ddim_with_classifier_free_guidance():
    model = tiny_model().eval()
    model.denoiser = _StubDenoiser()
    guide_ids = torch.tensor([[0, 0, 4, 5, 6, 7, 8, 9], [0] * 6 + [1, 2]])
    noise = torch.randn(2, K, D, generator=torch.Generator().manual_seed(3))
    beta = np.linspace(1e-4 * 50, 0.02 * 50, 20)                # s = 1000 / T = 50
    abar = np.cumprod(1 - beta)
    g_c = model.item_embeddings(guide_ids).sum(1).mean(1)[:, None, None]
    g_u = model.null_guide.mean()
    x, w = noise.double(), 0.5
    for t, t_next in zip((16, 12, 8, 4, 0), (12, 8, 4, 0, -1), strict=True):
        e_c, e_u = 0.1 * x + t / 100 + g_c.double(), 0.1 * x + t / 100 + g_u.double()
        e = e_c + w * (e_c - e_u)
        a, a_next = abar[t], (abar[t_next] if t_next >= 0 else 1.0)
        x = math.sqrt(a_next) * (x - math.sqrt(1 - a) * e) / math.sqrt(a) + math.sqrt(1 - a_next) * e
    with torch.no_grad():
        out = model.generate(guide_ids, noise)
    assert torch.allclose(out.double(), x, rtol=1e-4, atol=1e-4)


def test_split_block_and_epsilon_loss_by_hand():
    model = tiny_model(cond_drop=0.5).eval()                      # eval: no dropout in the denoiser
    ids = torch.tensor([[0, 0, 0, 0, 0, 1, 2, 3],                 # exactly k items: no sample
                        [0, 0, 4, 5, 6, 7, 8, 9],
                        [10, 11, 12, 13, 14, 15, 16, 17],
                        [0, 0, 0, 0, 21, 22, 23, 24]])
    block, guide, has = split_block(ids, K)
    assert block.tolist()[1:] == [[4, 5, 6], [10, 11, 12], [21, 22, 23]]
    assert guide.tolist()[1] == [0, 0, 0, 0, 0, 7, 8, 9] and guide.tolist()[3] == [0] * 7 + [24]
    assert has.tolist() == [False, True, True, True]
    keys = torch.from_numpy(row_keys(5, 0, np.arange(4)))
    loss, terms = model({"input_ids": ids, "row_key": keys})
    # Independently: the same keyed draws, q(x_t | x0) from the DDPM formula, the MSE of rows 1..3.
    t = (KeyedDraws(keys, Streams.TIMESTEPS).uniform((1,))[:, 0] * 20).long()
    noise = KeyedDraws(keys, Streams.PEER_NOISE).normal((K, D))
    drop = KeyedDraws(keys, Streams.GUIDE_DROP).uniform((1,))[:, 0] < 0.5
    abar = torch.tensor(np.cumprod(1 - np.linspace(5e-3, 1.0, 20)), dtype=torch.float32)[t][:, None, None]
    x0 = model.item_embeddings.weight[block]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    rows = []
    for r in (1, 2, 3):
        g = model.null_guide if drop[r] else model.item_embeddings.weight[guide[r][guide[r] > 0]].sum(0)
        eps = model.denoiser(x_t[r:r + 1], t[r:r + 1], g[None])
        rows.append(((eps - noise[r]) ** 2).mean())
    assert torch.allclose(loss, torch.stack(rows).mean(), rtol=1e-5)
    assert torch.equal(terms["mse"], loss.detach())
    # The row without a sample has no gradient path into the loss: its items' embeddings get none.
    loss.backward()
    assert model.item_embeddings.weight.grad[[1, 2, 3]].abs().sum() == 0
    assert model.item_embeddings.weight.grad[[4, 7, 10]].abs().sum() > 0


def test_loss_does_not_depend_on_row_order():
    model = tiny_model().eval()
    ids = torch.randint(1, N + 1, (6, L), generator=torch.Generator().manual_seed(0))
    keys = torch.from_numpy(row_keys(1, 2, np.arange(6)))
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    a, _ = model({"input_ids": ids, "row_key": keys})
    b, _ = model({"input_ids": ids[perm], "row_key": keys[perm]})
    assert torch.allclose(a, b, rtol=1e-5)


def test_eval_view_and_score(tmp_path):
    seqs = read_sequences(write_data(tmp_path / "d.txt"))
    split = build_split(seqs, L)
    model = tiny_model().eval()
    inputs, history, targets = model.eval_view(split, "valid")
    expected = [(s[:-2][-L:][K:], s[:-2][-L:][K - 1]) for s in map(seqs.sequence, range(len(seqs)))
                if min(len(s) - 2, L) > K]
    assert len(expected) == inputs.shape[0] > 0 and history.shape == (len(expected), 1) and not history.any()
    for row, target, (guide, item) in zip(inputs.tolist(), targets.tolist(), expected, strict=True):
        assert row == [0] * (L - len(guide)) + guide.tolist() and target == item
    assert model.eval_view(split, "valid")[0] is inputs                          # built once
    scores = model.score(inputs)
    assert scores.shape == (len(expected), N + 2) and scores.dtype == torch.float32
    x0 = model.generate(inputs, model.start_noise(inputs))
    table = model.item_embeddings.weight[None, 1:N + 1]
    assert torch.allclose(scores[:, 1:N + 1], F.cosine_similarity(x0[:, -1, None], table, dim=-1), atol=1e-5)
    # Batch-independent: a row scored alone gets the same scores.
    assert torch.allclose(model.score(inputs[1:2]), scores[1:2], atol=1e-5)


def test_chunked_rounding_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    vectors, table = torch.randn(23, D, generator=g), torch.randn(N + 2, D, generator=g)
    brute = F.cosine_similarity(vectors[:, None], table[None, 1:N + 1], dim=-1).argmax(1) + 1
    assert torch.equal(round_to_items(vectors, table, item_chunk=7, row_chunk=5), brute)
    assert torch.equal(round_to_items(vectors, table), brute)


def test_guide_never_holds_the_valid_or_test_item(tmp_path):
    seqs = read_sequences(write_data(tmp_path / "d.txt"))
    guides = guide_rows(seqs, K, L)
    for u in range(len(seqs)):
        s = seqs.sequence(u)
        m = min(len(s) - 2, L - K)
        assert guides[u].tolist() == [0] * (L - m) + s[:m].tolist()          # s[:m], m <= n - 2
    # Changing every user's valid and test items leaves the generated prefixes unchanged.
    run, cfg = trained_run(tmp_path, tmp_path / "d.txt")
    write_augmented(cfg, run, tmp_path / "a.txt")
    lines = (tmp_path / "d.txt").read_text().splitlines()

    def moved(line):
        words = line.split()
        return " ".join([*words[:-2], *(str(int(w) % N + 1) for w in words[-2:])])

    (tmp_path / "d.txt").write_text("\n".join(moved(line) for line in lines) + "\n")
    write_augmented(cfg, run, tmp_path / "b.txt")
    prefix = [[line.split()[:1 + K] for line in (tmp_path / f).read_text().splitlines()] for f in ("a.txt", "b.txt")]
    assert prefix[0] == prefix[1]


def test_augmented_file_format_sidecar_and_determinism(tmp_path):
    data = write_data(tmp_path / "d.txt")
    run, cfg = trained_run(tmp_path, data)
    record = write_augmented(cfg, run, tmp_path / "aug.txt")
    first = (tmp_path / "aug.txt").read_bytes()
    again = write_augmented(cfg, run, tmp_path / "aug.txt")
    assert (tmp_path / "aug.txt").read_bytes() == first                    # same run, same file
    original, augmented = read_sequences(data), read_sequences(tmp_path / "aug.txt")
    assert augmented.user_ids.tolist() == original.user_ids.tolist()
    for u in range(len(original)):
        row = augmented.sequence(u)
        assert row[K:].tolist() == original.sequence(u).tolist()
        assert ((row[:K] >= 1) & (row[:K] <= N)).all()
    side = json.loads((tmp_path / "aug.txt.json").read_text())
    assert side == again and {**record, "seconds": 0} == {**again, "seconds": 0}
    assert side["prefix_items"] == K and side["users"] == len(original) and side["seed"] == 7
    assert side["generated_interactions"] == K * len(original) and side["run"] == str(run)
    assert side["source"] == str(data) and side["best_epoch"] == 3


def test_augmented_split_masks_the_prefix(tmp_path):
    # Generated ids (N+1..N+K) differ from every real id, so a leak would show.
    data = write_data(tmp_path / "d.txt")
    lines = data.read_text().splitlines()
    aug = tmp_path / "aug.txt"
    aug.write_text("\n".join(f"{line.split()[0]} {' '.join(str(N + 1 + i) for i in range(K))} "
                             + " ".join(line.split()[1:]) for line in lines) + "\n")
    width = 40                                                   # every sequence fits: nothing truncated
    plain, augmented = build_split(read_sequences(data), width), build_split(read_sequences(aug), width,
                                                                              augmented_prefix=K)
    assert not (augmented.train_target > N).any()                # no generated item is a target
    seqs = read_sequences(data)
    for row, user in enumerate(augmented.train_user.tolist()):
        s = seqs.sequence(user)
        targets = augmented.train_target[row][augmented.train_target[row] > 0].tolist()
        assert targets == s[:-2].tolist()                         # the real items s[0..n-3], nothing else
        old = plain.train_target[plain.train_user == user]
        assert old[old > 0].tolist() == s[1:-2].tolist()          # s[0] is new: predicted from the prefix
    for which in ("valid", "test"):
        a, p = getattr(augmented, f"{which}_history"), getattr(plain, f"{which}_history")
        for ra, rp in zip(a.tolist(), p.tolist(), strict=True):
            assert [i for i in ra if i] == [i for i in rp if i]   # histories hold only the real items
        assert torch.equal(getattr(augmented, f"{which}_target"), getattr(plain, f"{which}_target"))


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_augment_and_its_errors(tmp_path, capsys):
    data = write_data(tmp_path / "d.txt")
    run, _ = trained_run(tmp_path, data)
    out = tmp_path / "aug.txt"
    code, stdout, _ = run_cli(capsys, "augment", "--run", str(run), "--output", str(out), "--device", "cpu")
    assert code == 0 and json.loads(stdout)["users"] == 12 and read_sequences(out).items.size
    # A run of another model.
    other = tmp_path / "sasrec_run"
    other.mkdir()
    save_config(load_config(None, [f"data.path={data}"]), other / "config.yaml")
    code, _, err = run_cli(capsys, "augment", "--run", str(other), "--output", str(out))
    assert code == 2 and "diffuasr" in err and "sasrec" in err and "Traceback" not in err
    # No trained run.
    code, _, err = run_cli(capsys, "augment", "--run", str(tmp_path / "absent"), "--output", str(out))
    assert code == 2 and "absent" in err
    cfg = tmp_path / "gen.yaml"
    cfg.write_text(f"data:\n  path: {data}\nmodel:\n  name: diffuasr\n  hidden_size: 16\n")
    code, _, err = run_cli(capsys, "augment", "--config", str(cfg), "--run", str(tmp_path / "absent"),
                           "--output", str(out))
    assert code == 2 and "best_model.pt" in err
    # A config of another model.
    sas = tmp_path / "sas.yaml"
    sas.write_text(f"data:\n  path: {data}\nmodel:\n  name: sasrec\n")
    code, _, err = run_cli(capsys, "augment", "--config", str(sas), "--output", str(out))
    assert code == 2 and "sas.yaml" in err and "diffuasr" in err
    # Weights that do not fit the config (another hidden size).
    code, _, err = run_cli(capsys, "augment", "--run", str(run), "--output", str(out), "--set", "model.hidden_size=36")
    assert code == 2 and "do not fit" in err
    # Overwriting the source data is refused.
    code, _, err = run_cli(capsys, "augment", "--run", str(run), "--output", str(data))
    assert code == 2 and "source data" in err


def test_bad_model_settings():
    with pytest.raises(ConfigError, match="perfect square"):
        tiny_model(hidden_size=20)
    with pytest.raises(ConfigError, match="prefix_items"):
        tiny_model(prefix_items=L)
    assert issubclass(ConfigError, AdarecError)


def test_score_is_float32_under_autocast():
    model = tiny_model().eval()
    ids = torch.randint(1, N + 1, (4, L), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = model.score(ids)
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert torch.allclose(scores, model.score(ids), atol=0.1)           # bf16 denoiser, same ranking scale


def test_the_run_seed_travels_with_the_weights():
    model, ids = tiny_model().eval(), torch.randint(1, N + 1, (3, L), generator=torch.Generator().manual_seed(4))
    model.prepare(None, "cpu", 9)
    fresh = tiny_model(initializer_range=0.5).eval()                # other weights, seed 0
    before = fresh.score(ids)
    fresh.load_state_dict(model.state_dict())
    assert int(fresh.eval_seed) == 9 and torch.equal(fresh.score(ids), model.score(ids))
    model.prepare(None, "cpu", 10)                                   # another seed, other start noise
    assert not torch.equal(model.score(ids), fresh.score(ids)) and not torch.equal(before, fresh.score(ids))


def test_resume_and_the_whole_pipeline(tmp_path):
    """The generator run resumes exactly; its best weights augment the file, and SASRec trains on
    it with the prefix masked: generator -> `adarec augment` -> downstream run, on a Beauty slice."""
    from adarec.engine.trainer import run_training

    from adarec.config import apply_overrides

    small = ["data.max_users=60", "model.hidden_size=16", "model.sample_steps=3", "train.batch_size=32",
             "train.device=cpu", "train.precision=fp32", "train.eval_every=1", "eval.batch_size=64"]
    repo = Path(__file__).resolve().parents[1]

    def config(epochs):
        return load_config(repo / "configs/diffuasr_beauty.yaml", [*small, f"train.epochs={epochs}"])

    straight = run_training(config(2), tmp_path / "straight")
    run_training(config(1), tmp_path / "split")
    resumed = run_training(apply_overrides(load_config(tmp_path / "split" / "config.yaml"), ["train.epochs=2"]),
                           tmp_path / "split", resume=True)
    assert resumed == straight

    out = tmp_path / "aug.txt"
    write_augmented(load_config(tmp_path / "straight" / "config.yaml"), tmp_path / "straight", out)
    downstream = load_config(repo / "configs/sasrec-diffuasr_beauty.yaml",
                             [f"data.path={out}", "data.max_users=60", "model.hidden_size=16", "train.epochs=1",
                              "train.batch_size=32", "train.device=cpu", "train.precision=fp32"])
    result = run_training(downstream, tmp_path / "sasrec")
    assert result["split"] == "test" and 0.0 <= result["NDCG@20"] <= 1.0
    # The downstream run ranked the same users' same test items as a run on the plain file would.
    plain = build_split(read_sequences(repo / "data/Beauty.txt", max_users=60))
    augmented = build_split(read_sequences(out), augmented_prefix=10)
    assert torch.equal(plain.test_target, augmented.test_target)


def test_every_su_net_weight_reaches_the_output():
    """No parameter is normalised away: with one-channel GroupNorm groups, the time and guide
    embedding added before a normalisation vanished (its gradient was rounding noise, about 1e-7
    of the others'), and the generator ignored its guide at those blocks."""
    from adarec.models.su_net import SUNet

    torch.manual_seed(0)
    net = SUNet(positions=K, hidden_size=64, guide_size=64, channels=8, dropout=0.0)
    x, guide = torch.randn(6, K, 64), torch.randn(6, 64)
    out = net(x, torch.randint(0, 1000, (6,)), guide)
    (out * torch.randn_like(out)).sum().backward()
    norms = {name: p.grad.abs().max().item() for name, p in net.named_parameters()}
    largest = max(norms.values())
    assert all(n > 1e-4 * largest for n in norms.values()), sorted(norms.items(), key=lambda kv: kv[1])[:4]
    # The guide moves every position's prediction.
    moved = net(x, torch.full((6,), 500), guide + 1.0) - net(x, torch.full((6,), 500), guide)
    assert (moved.abs().amax(-1) > 0).all()
