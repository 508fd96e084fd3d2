"""The fused Triton trajectory (kernels/trajectory.py) against its eager twin
(adarec/diffusion.py). Without CUDA the kernels run under TRITON_INTERPRET=1 (set in conftest)
on tiny float32 shapes; with CUDA the same tests run compiled, and the `gpu` tests add bf16
and a convergence comparison."""

import json

import numpy as np
import pytest
import torch
from adarec.kernels.trajectory import fused_diffusion_trajectory, trajectory_noise
from test_adarec import batch_for, make_model

from adarec.backends import resolve_backend, trajectory_function
from adarec.config import ConfigError, RunConfig, apply_overrides
from adarec.diffusion import diffusion_trajectory, level_tables, pack_levels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
WEIGHT_NAMES = ("w1", "b1", "step_table", "w2", "b2")


def make_problem(lengths, depths, length, dim, width, max_depth, seed=0, dtype=torch.float32):
    """A left-padded E^0 with the given ragged lengths, its packed pairs and denoiser weights."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    batch = lengths.numel()
    e0 = torch.randn(batch, length, dim, generator=g)
    padding = torch.arange(length)[None, :] < (length - lengths)[:, None]
    e0[padding] = 0.0
    packed = pack_levels(torch.tensor(depths))
    sqrt_abar, sqrt_one_minus = level_tables(max_depth)
    weights = {
        "w1": torch.randn(width, dim, generator=g) / dim**0.5,
        "b1": 0.1 * torch.randn(width, generator=g),
        "step_table": 0.1 * torch.randn(max_depth + 1, width, generator=g),
        "w2": torch.randn(dim, width, generator=g) / width**0.5,
        "b2": 0.1 * torch.randn(dim, generator=g),
    }
    noise = torch.randn(packed.num_pairs, length, dim, generator=g)
    to = {"device": DEVICE}
    return {
        "e0": e0.to(dtype=dtype, **to), "lengths": lengths.to(**to), "pair_user": packed.pair_user.to(**to),
        "pair_level": packed.pair_level.to(**to), "sqrt_abar": sqrt_abar.to(**to),
        "sqrt_one_minus_abar": sqrt_one_minus.to(**to),
        **{k: v.to(dtype=dtype, **to) for k, v in weights.items()}, "noise": noise.to(dtype=dtype, **to),
    }


def run(fn, problem, grad_out=None, loss_weight=3.0, **kw):
    """Forward and backward of ``fn``; returns (ehat, loss, {input name: grad})."""
    leaves = {k: problem[k].detach().clone().requires_grad_() for k in ("e0", *WEIGHT_NAMES)}
    args = {**{k: v for k, v in problem.items() if k != "noise"}, **leaves}
    ehat, loss = fn(**args, **kw)
    if grad_out is None:
        grad_out = torch.randn(ehat.shape, generator=torch.Generator().manual_seed(7)).to(ehat)
    ((ehat.float() * grad_out.float()).sum() + loss_weight * loss).backward()
    return ehat.detach(), loss.detach(), {k: v.grad for k, v in leaves.items()}


SHAPES = {
    # lengths include a length-1 user and a full-length one; depths include 0 and T_max
    "ragged": {"lengths": [1, 7, 3, 5, 2], "depths": [0, 3, 1, 2, 3], "length": 7, "dim": 16, "width": 64,
               "max_depth": 3},
    "odd_dims": {"lengths": [4, 1, 9], "depths": [2, 4, 0], "length": 9, "dim": 24, "width": 40, "max_depth": 4},
    "one_user": {"lengths": [6], "depths": [5], "length": 6, "dim": 16, "width": 32, "max_depth": 5},
    "all_level_zero": {"lengths": [2, 3], "depths": [0, 0], "length": 4, "dim": 16, "width": 64, "max_depth": 2},
    "no_diffusion_levels": {"lengths": [3, 1], "depths": [0, 0], "length": 3, "dim": 16, "width": 64, "max_depth": 0},
    "many_rows": {"lengths": [12, 11, 1, 12, 7, 9, 3], "depths": [1, 2, 3, 0, 3, 2, 1], "length": 12, "dim": 16,
                      "width": 64, "max_depth": 3},
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_explicit_noise_matches_eager_forward_and_backward(shape):
    problem = make_problem(**shape)
    ehat_e, loss_e, grads_e = run(diffusion_trajectory, problem, noise=problem["noise"])
    ehat_f, loss_f, grads_f = run(fused_diffusion_trajectory, problem, noise=problem["noise"])
    torch.testing.assert_close(ehat_f, ehat_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_f, loss_e, rtol=1e-5, atol=1e-6)
    for name in grads_e:
        torch.testing.assert_close(grads_f[name], grads_e[name], rtol=1e-4, atol=1e-5, msg=name)


def test_padding_rows_are_zero_and_level_zero_rows_are_e0():
    shape = SHAPES["ragged"]
    problem = make_problem(**shape)
    ehat, _, _ = run(fused_diffusion_trajectory, problem, seed=3)
    lengths = problem["lengths"][problem["pair_user"]]
    padding = torch.arange(shape["length"], device=DEVICE)[None, :] < (shape["length"] - lengths)[:, None]
    assert torch.all(ehat[padding] == 0)
    level0 = problem["pair_level"] == 0
    assert torch.equal(ehat[level0], problem["e0"][problem["pair_user"][level0]])


def test_zero_noise_matches_eager_evaluation_mode():
    problem = make_problem(**SHAPES["odd_dims"])
    ehat_e, loss_e, grads_e = run(diffusion_trajectory, problem, zero_noise=True)
    ehat_f, loss_f, grads_f = run(fused_diffusion_trajectory, problem, zero_noise=True)
    torch.testing.assert_close(ehat_f, ehat_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_f, loss_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads_f["w1"], grads_e["w1"], rtol=1e-4, atol=1e-5)


def test_same_seed_same_results_other_seed_other_noise():
    problem = make_problem(**SHAPES["ragged"])
    first = run(fused_diffusion_trajectory, problem, seed=1234)
    again = run(fused_diffusion_trajectory, problem, seed=1234)
    other = run(fused_diffusion_trajectory, problem, seed=1235)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    for name in first[2]:
        assert torch.equal(first[2][name], again[2][name]), name
    noisy = problem["pair_level"] > 0
    assert not torch.allclose(first[0][noisy], other[0][noisy])


def test_backward_regenerates_the_forward_noise():
    """With the in-kernel RNG, forward and backward give exactly what they give when the same
    noise is passed in explicitly: the backward regenerated the forward's noise."""
    shape = SHAPES["many_rows"]
    problem = make_problem(**shape)
    noise = trajectory_noise(problem["e0"], problem["lengths"], problem["pair_user"], shape["max_depth"], seed=99)
    from_rng = run(fused_diffusion_trajectory, problem, seed=99)
    from_tensor = run(fused_diffusion_trajectory, problem, noise=noise.to(problem["e0"].dtype))
    torch.testing.assert_close(from_rng[0], from_tensor[0], rtol=0, atol=0)
    torch.testing.assert_close(from_rng[1], from_tensor[1], rtol=0, atol=0)
    for name in from_rng[2]:
        torch.testing.assert_close(from_rng[2][name], from_tensor[2][name], rtol=0, atol=0, msg=name)
    # The eager twin fed this noise agrees too, so the RNG path computes the same function.
    eager = run(diffusion_trajectory, problem, noise=noise.to(problem["e0"].dtype))
    torch.testing.assert_close(from_rng[1], eager[1], rtol=1e-5, atol=1e-6)


def test_noise_is_standard_normal_and_independent_across_pairs():
    lengths, depths, length, dim = [16] * 6, [4, 4, 4, 4, 4, 4], 16, 32
    problem = make_problem(lengths, depths, length, dim, 64, 4)
    noise = trajectory_noise(problem["e0"], problem["lengths"], problem["pair_user"], 4, seed=2024).cpu()
    levels = problem["pair_level"].cpu()
    drawn = noise[levels > 0]                                   # [24 pairs, 16, 32]: 12288 values
    assert torch.all(noise[levels == 0] == 0)
    assert abs(drawn.mean().item()) < 0.05
    assert abs(drawn.var().item() - 1.0) < 0.06
    flat = drawn.reshape(drawn.shape[0], -1)
    corr = torch.corrcoef(flat)
    off_diagonal = corr[~torch.eye(flat.shape[0], dtype=torch.bool)]
    # 512 values per pair: the correlation of independent streams has std ~ 0.044.
    assert off_diagonal.abs().max().item() < 0.25
    assert off_diagonal.abs().mean().item() < 0.06
    # Neighbouring positions and channels of one pair are not correlated either.
    lag = torch.corrcoef(torch.stack([flat[:, :-1].reshape(-1), flat[:, 1:].reshape(-1)]))[0, 1]
    assert abs(lag.item()) < 0.05


def test_loss_weight_matches_eager_and_excludes_pairs_from_l_deno():
    """Only pairs with loss_weight > 0 enter L_deno (the depth-gradient probe's levels do not);
    their reconstructions are still computed and still carry the incoming gradient."""
    shape = SHAPES["many_rows"]
    problem = make_problem(**shape)
    weight = (torch.arange(problem["pair_user"].numel(), device=DEVICE) % 3 != 1).float()
    kw = {"noise": problem["noise"]}
    ehat_e, loss_e, grads_e = run(lambda **a: diffusion_trajectory(**a, loss_weight=weight), problem, **kw)
    ehat_f, loss_f, grads_f = run(lambda **a: fused_diffusion_trajectory(**a, loss_weight=weight), problem, **kw)
    torch.testing.assert_close(ehat_f, ehat_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_f, loss_e, rtol=1e-5, atol=1e-6)
    for name in grads_e:
        torch.testing.assert_close(grads_f[name], grads_e[name], rtol=1e-4, atol=1e-5, msg=name)
    # Independent check of the mean: the per-pair squared errors of the kept pairs only.
    with torch.no_grad():
        a = problem["sqrt_abar"][problem["pair_level"]][:, None, None]
        s = problem["sqrt_one_minus_abar"][problem["pair_level"]][:, None, None]
        # Ehat = x0 + (s / a) (eps - eps_hat), so eps_hat - eps = (x0 - Ehat) a / s.
        error = (problem["e0"][problem["pair_user"]] - ehat_e) * a / s
        lengths = problem["lengths"][problem["pair_user"]]
        valid = torch.arange(shape["length"], device=DEVICE)[None, :] >= (shape["length"] - lengths)[:, None]
        errors, count = 0.0, 0
        for p in range(weight.numel()):
            if weight[p] > 0 and problem["pair_level"][p] > 0:
                diff = error[p][valid[p]]
                errors += float(diff.pow(2).mean(-1).sum())
                count += int(valid[p].sum())
    assert float(loss_e) == pytest.approx(errors / count, rel=1e-4)


# ----------------------------------------------------------------------------- noise keyed by row keys


def philox_normal_reference(seed, c0, c1, c2, c3, rounds=10):
    """Triton's tl.philox (4x32, key = seed's low and high words) and the Box-Muller'd cos output
    of its first two words, in numpy: an independent statement of the counter layout the kernels document."""
    mask = np.uint64(0xFFFFFFFF)
    c = [np.asarray(x, dtype=np.uint64) & mask for x in (c0, c1, c2, c3)]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    round_a, round_b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(rounds):
        product_a, product_b = round_a * c[0], round_b * c[2]            # exact: both factors < 2**32
        c = [(product_b >> np.uint64(32)) ^ c[1] ^ k0, product_b & mask,
             (product_a >> np.uint64(32)) ^ c[3] ^ k1, product_a & mask]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask

    def uniform(x):
        # The top 24 bits k as (k + 1/2) / 2**24 in float32, the all-ones word clamped below 1
        # (the conversion adarec.keyed_random documents for the CPU draws).
        u = ((x >> np.uint64(8)).astype(np.float64) + 0.5) * 2.0 ** -24
        return np.minimum(u.astype(np.float32), np.float32(1 - 2 ** -24))

    u1 = uniform(c[0])
    theta = np.float32(6.283185307179586) * uniform(c[1])
    return np.sqrt(np.float32(-2.0) * np.log(u1)) * np.cos(theta)


@pytest.mark.parametrize("keyed", [False, True], ids=["by_batch_position", "by_row_key"])
def test_noise_follows_the_documented_philox_counters(keyed):
    """eps(u, k, p, c) = Philox(seed; (L - 1 - p) * D + c, then (u * levels + k, 0, 0) without keys, or
    (k, low word, high word of keys[u]) with them): every drawn value against a numpy Philox."""
    shape = SHAPES["odd_dims"]
    problem = make_problem(**shape)
    seed, num_levels = 2**40 + 12345, shape["max_depth"] + 1
    keys = torch.tensor([7, 2**62 + 2**33 + 5, 2**32], device=DEVICE) if keyed else None
    noise = trajectory_noise(problem["e0"], problem["lengths"], problem["pair_user"], shape["max_depth"], seed=seed,
                             num_levels=num_levels, keys=keys).cpu()
    pair, pos, channel = (i.numpy() for i in torch.nonzero(noise, as_tuple=True))
    user, level = (problem[k].cpu().numpy()[pair] for k in ("pair_user", "pair_level"))
    drawn_values = sum(n * d for n, d in zip(shape["lengths"], shape["depths"], strict=True)) * shape["dim"]
    assert np.all(level > 0) and len(pair) == drawn_values
    if keyed:
        key = keys.cpu().numpy()[user]
        counters = (level, key & 0xFFFFFFFF, key >> 32)
    else:
        counters = (user * num_levels + level, 0 * level, 0 * level)
    want = philox_normal_reference(seed, (shape["length"] - 1 - pos) * shape["dim"] + channel, *counters)
    np.testing.assert_allclose(noise[pair, pos, channel].numpy(), want, rtol=1e-5, atol=1e-5)


KEYED_SHAPE = {"lengths": [5, 2, 7, 4], "depths": [2, 3, 1, 0], "length": 7, "dim": 12, "width": 16, "max_depth": 3}


def keyed_noise(problem, users, depths, keys, seed=21):
    """trajectory_noise of a batch made of the given users of `problem` (rows, lengths), at the
    given depths, with the given row keys; returns the noise and its packed layout."""
    users = torch.tensor(users, device=DEVICE)
    packed = pack_levels(torch.tensor(depths))
    noise = trajectory_noise(problem["e0"][users], problem["lengths"][users], packed.pair_user.to(DEVICE),
                             max(depths), seed=seed, num_levels=KEYED_SHAPE["max_depth"] + 1,
                             keys=torch.tensor(keys, device=DEVICE))
    return noise, packed


def test_keyed_noise_follows_the_row_not_its_place_or_its_batch():
    """A row with the same key draws bit-identical noise at each shared level when the batch is
    reordered, reduced, joined by another row or computed to another depth; other keys (also
    ones differing only in their high word) draw other noise."""
    problem = make_problem(**KEYED_SHAPE)
    keys = [11, 2**32 + 11, 2**61 + 3, 0]
    full, full_packed = keyed_noise(problem, [0, 1, 2, 3], KEYED_SHAPE["depths"], keys)
    # Users 2 and 0 swapped, joined by a row with a key of its own; user 0 one level shallower.
    other, other_packed = keyed_noise(problem, [2, 1, 0], [1, 3, 1], [keys[2], 2**40 + 9, keys[0]])

    def pair_of(packed, user, level):
        return int(torch.nonzero((packed.pair_user == user) & (packed.pair_level == level))[0])

    shared = [(2, 0, 1), (0, 2, 1)]                              # (user in full, user in other, level)
    for full_user, other_user, level in shared:
        got = other[pair_of(other_packed, other_user, level)]
        assert got.abs().sum() > 0
        assert torch.equal(got, full[pair_of(full_packed, full_user, level)])
    # Users 0 and 1 have the same length and keys of the same low word: still different noise.
    n0, n1 = (full[pair_of(full_packed, u, 1)][-2:] for u in (0, 1))
    assert n0.abs().sum() > 0 and not torch.allclose(n0, n1)
    # The joined row (key 2**40 + 9) shares user 1's rows but not its noise.
    for level in (1, 2, 3):
        mine, theirs = other[pair_of(other_packed, 1, level)], full[pair_of(full_packed, 1, level)]
        assert mine.abs().sum() > 0 and not torch.allclose(mine, theirs)


def test_keyed_and_unkeyed_streams_differ_and_are_both_standard_normal():
    """Keys 1..B against batch positions 0..B-1 (key 0 would share the first user's unkeyed
    counters (k, 0, 0), as the module docstring says)."""
    lengths, depths, length, dim = [16] * 6, [4] * 6, 16, 32
    problem = make_problem(lengths, depths, length, dim, 64, 4)
    args = (problem["e0"], problem["lengths"], problem["pair_user"], 4)
    unkeyed = trajectory_noise(*args, seed=2024).cpu()
    keyed = trajectory_noise(*args, seed=2024, keys=torch.arange(1, 7, device=DEVICE)).cpu()
    noisy = problem["pair_level"].cpu() > 0
    for drawn in (unkeyed[noisy], keyed[noisy]):                # 12288 values each
        assert abs(drawn.mean().item()) < 0.05
        assert abs(drawn.var().item() - 1.0) < 0.06
    assert torch.all(keyed[~noisy] == 0)
    assert (keyed[noisy] != unkeyed[noisy]).float().mean() > 0.99
    corr = torch.corrcoef(torch.stack([keyed[noisy].reshape(-1), unkeyed[noisy].reshape(-1)]))[0, 1]
    assert abs(corr.item()) < 0.05


@pytest.mark.parametrize("shape", ["odd_dims", "ragged"])
def test_keyed_noise_forward_and_backward_match_the_eager_twin_fed_that_noise(shape):
    """The fused op drawing keyed noise in its kernels (and regenerating it in the backward)
    equals itself fed the noise trajectory_noise reports for those keys, bit for bit, and the
    eager twin fed it within the explicit-noise tolerances. odd_dims: D = 24, a depth-0 user."""
    shape = SHAPES[shape]
    problem = make_problem(**shape)
    batch = len(shape["lengths"])
    keys = torch.tensor([2**62 + 17 * u + 3 for u in range(batch)], device=DEVICE).flip(0)
    noise = trajectory_noise(problem["e0"], problem["lengths"], problem["pair_user"], shape["max_depth"], seed=5,
                             num_levels=shape["max_depth"] + 1, keys=keys).to(problem["e0"].dtype)
    fused = run(fused_diffusion_trajectory, problem, seed=5, keys=keys)
    given = run(fused_diffusion_trajectory, problem, noise=noise)
    eager = run(diffusion_trajectory, problem, noise=noise)
    torch.testing.assert_close(fused[0], given[0], rtol=0, atol=0)
    torch.testing.assert_close(fused[1], given[1], rtol=0, atol=0)
    torch.testing.assert_close(fused[0], eager[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1], eager[1], rtol=1e-5, atol=1e-6)
    for name in eager[2]:
        torch.testing.assert_close(fused[2][name], given[2][name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(fused[2][name], eager[2][name], rtol=1e-4, atol=1e-5, msg=name)
    # The keys were used: the unkeyed stream of the same seed gives other reconstructions.
    unkeyed = run(fused_diffusion_trajectory, problem, seed=5)
    noisy = problem["pair_level"] > 0
    assert not torch.allclose(unkeyed[0][noisy], fused[0][noisy])


@pytest.mark.parametrize("fn", [diffusion_trajectory, fused_diffusion_trajectory], ids=["eager", "fused"])
def test_a_pairs_noise_depends_on_its_user_and_level_not_on_the_layout(fn):
    """The probe layout adds level T_u + 1 to every user; the shared (user, level) pairs keep
    exactly the same reconstruction for the same seed (eager: the seeded grid; fused: Philox)."""
    shape = SHAPES["ragged"]
    problem = make_problem(**shape)
    depths = torch.tensor(shape["depths"])
    probe = pack_levels(depths, shape["max_depth"], "probe")
    base = pack_levels(depths, shape["max_depth"], "none")
    args = {k: v for k, v in problem.items() if k not in ("noise", "pair_user", "pair_level")}
    ehat_b, _ = fn(**args, pair_user=base.pair_user.to(DEVICE), pair_level=base.pair_level.to(DEVICE), seed=11)
    ehat_p, _ = fn(**args, pair_user=probe.pair_user.to(DEVICE), pair_level=probe.pair_level.to(DEVICE), seed=11,
                   loss_weight=probe.pair_active.float().to(DEVICE))
    assert probe.num_pairs > base.num_pairs
    assert torch.equal(ehat_p[probe.pair_active.to(DEVICE)], ehat_b)
    assert (ehat_p[~probe.pair_active.to(DEVICE)] != 0).any()


def test_bad_inputs_raise_clear_errors():
    problem = make_problem(**SHAPES["ragged"])
    args = {k: v for k, v in problem.items() if k != "noise"}
    with pytest.raises(ValueError, match="e0 must be"):
        fused_diffusion_trajectory(**{**args, "e0": args["e0"][0]})
    with pytest.raises(ValueError, match="denoiser weights"):
        fused_diffusion_trajectory(**{**args, "w1": args["w1"][:, :-1]})
    with pytest.raises(ValueError, match="noise must be"):
        fused_diffusion_trajectory(**args, noise=problem["noise"][:-1])
    with pytest.raises(TypeError, match="must have e0's dtype"):
        fused_diffusion_trajectory(**{**args, "w1": args["w1"].double()})
    with pytest.raises(ValueError, match="lengths must be"):
        fused_diffusion_trajectory(**{**args, "lengths": args["lengths"][:-1]})
    batch = args["e0"].shape[0]
    with pytest.raises(TypeError, match="keys must be int64"):
        fused_diffusion_trajectory(**args, keys=torch.arange(batch, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="keys must be"):
        fused_diffusion_trajectory(**args, keys=torch.arange(batch + 1, device=DEVICE))


# ----------------------------------------------------------------------------- backend choice


def test_backend_resolution_and_environment_override(monkeypatch):
    monkeypatch.delenv("ADAREC_KERNELS", raising=False)
    assert resolve_backend("eager") == "eager"
    assert trajectory_function("eager", DEVICE) is diffusion_trajectory
    assert trajectory_function("fused", DEVICE) is fused_diffusion_trajectory
    monkeypatch.setenv("ADAREC_KERNELS", "eager")
    assert trajectory_function("fused", DEVICE) is diffusion_trajectory
    monkeypatch.setenv("ADAREC_KERNELS", "fast")
    with pytest.raises(ValueError, match="ADAREC_KERNELS"):
        resolve_backend("auto")


def test_auto_is_eager_on_cpu_and_fused_without_a_way_to_run_raises(monkeypatch):
    monkeypatch.delenv("ADAREC_KERNELS", raising=False)
    cpu = torch.device("cpu")
    assert trajectory_function("auto", cpu) is diffusion_trajectory
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        trajectory_function("fused", cpu)


def test_auto_keeps_the_eager_twins_on_cuda_until_the_gpu_paths_are_verified(monkeypatch):
    """The GPU kernels are opt-in until a GPU run of the device check passed them (README)."""
    from adarec import backends
    from adarec.fusion import gated_fusion

    monkeypatch.delenv("ADAREC_KERNELS", raising=False)
    cuda = torch.device("cuda")
    monkeypatch.setattr(backends, "GPU_PATHS_VERIFIED", False)
    assert backends.trajectory_function("auto", cuda) is diffusion_trajectory
    assert backends.fusion_function("auto", cuda) is gated_fusion
    monkeypatch.setattr(backends, "GPU_PATHS_VERIFIED", True)
    assert backends.trajectory_function("auto", cuda) is fused_diffusion_trajectory


def test_config_rejects_an_unknown_backend():
    cfg = RunConfig()
    assert cfg.kernels.backend == "auto"
    with pytest.raises(ConfigError, match="kernels.backend"):
        apply_overrides(cfg, ["kernels.backend=triton"])


# ----------------------------------------------------------------------------- in the model


def test_adarec_fused_and_eager_backends_agree_when_scoring(monkeypatch):
    monkeypatch.delenv("ADAREC_KERNELS", raising=False)
    eager = make_model(seed=4).to(DEVICE).eval()
    fused = make_model(seed=4).to(DEVICE).eval()
    eager.kernel_backend, fused.kernel_backend = "eager", "fused"
    ids = batch_for()["input_ids"].to(DEVICE)
    # Compiled on a GPU the two paths sum in different orders through the whole network.
    tol = 1e-4 if DEVICE.type == "cuda" else 1e-5
    torch.testing.assert_close(fused.score(ids), eager.score(ids), rtol=tol, atol=tol)


def train_losses(backend, steps, seed=0, lr=1e-2):
    model = make_model(seed=seed).to(DEVICE).train()
    model.kernel_backend = backend
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batch = {k: v.to(DEVICE) for k, v in batch_for().items()}
    losses = []
    torch.manual_seed(seed + 1)
    for _ in range(steps):
        loss, _ = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_short_training_with_fused_and_eager_backends(monkeypatch):
    """Fused and eager draw different noise streams, so the curves agree in trend and level,
    not bit for bit; the explicit-noise tests above pin the arithmetic."""
    monkeypatch.delenv("ADAREC_KERNELS", raising=False)
    fused, eager = train_losses("fused", 12), train_losses("eager", 12)
    assert fused[-1] < fused[0] and eager[-1] < eager[0]
    assert abs(fused[0] - eager[0]) < 0.05 * abs(eager[0])
    assert abs(sum(fused[-4:]) - sum(eager[-4:])) < 0.1 * abs(sum(eager[-4:]))


# ----------------------------------------------------------------------------- GPU only


def bf16_tolerance_check(fused, eager_bf16, reference, atol):
    """flash-attention's rule: the bf16 kernel is at most twice as far from the fp32 reference
    as the bf16 eager path is, plus a small absolute slack."""
    fused, eager_bf16, reference = fused.float(), eager_bf16.float(), reference.float()
    bound = 2 * (eager_bf16 - reference).abs().max() + atol
    assert (fused - reference).abs().max() <= bound, ((fused - reference).abs().max().item(), bound.item())


@pytest.mark.parametrize("shape", [SHAPES["ragged"], SHAPES["odd_dims"]], ids=["ragged", "odd_dims"])
def test_bf16_small_shapes_within_twice_eager_bf16_error(shape):
    """bf16 at small shapes: compiled on a GPU, through the interpreter on CPU, where the kernel's
    products run on fp32 copies of the bf16-rounded operands (the same arithmetic, see _dot)."""
    reference = make_problem(**shape, dtype=torch.float32)
    half = make_problem(**shape, dtype=torch.bfloat16)
    grad_out = torch.randn(reference["noise"].shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ref = run(diffusion_trajectory, reference, grad_out=grad_out, noise=reference["noise"])
    eager = run(diffusion_trajectory, half, grad_out=grad_out, noise=half["noise"])
    fused = run(fused_diffusion_trajectory, half, grad_out=grad_out, noise=half["noise"])
    assert fused[0].dtype == torch.bfloat16 and fused[2]["w1"].dtype == torch.bfloat16
    bf16_tolerance_check(fused[0], eager[0], ref[0], atol=1e-2)
    bf16_tolerance_check(fused[1], eager[1], ref[1], atol=1e-3)
    for name in ref[2]:
        bf16_tolerance_check(fused[2][name], eager[2][name], ref[2][name], atol=1e-2 * ref[2][name].abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_bf16_matches_fp32_reference_within_twice_eager_bf16_error(dim):
    shape = {"lengths": [1, 50, 13, 7, 31, 2, 50, 9], "depths": [0, 8, 3, 5, 8, 1, 2, 6], "length": 50, "dim": dim,
                 "width": 4 * dim, "max_depth": 8}
    reference = make_problem(**shape, dtype=torch.float32)
    half = make_problem(**shape, dtype=torch.bfloat16)
    grad_out = torch.randn(reference["noise"].shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ref = run(diffusion_trajectory, reference, grad_out=grad_out, noise=reference["noise"])
    eager = run(diffusion_trajectory, half, grad_out=grad_out, noise=half["noise"])
    fused = run(fused_diffusion_trajectory, half, grad_out=grad_out, noise=half["noise"])
    bf16_tolerance_check(fused[0], eager[0], ref[0], atol=1e-2)
    bf16_tolerance_check(fused[1], eager[1], ref[1], atol=1e-3)
    for name in ref[2]:
        scale = ref[2][name].abs().max().item()
        bf16_tolerance_check(fused[2][name], eager[2][name], ref[2][name], atol=1e-2 * scale)


@pytest.mark.gpu
def test_fp32_rng_path_runs_compiled_and_is_reproducible():
    shape = {"lengths": [5, 50, 1, 23], "depths": [8, 0, 3, 8], "length": 50, "dim": 128, "width": 512, "max_depth": 8}
    problem = make_problem(**shape)
    first = run(fused_diffusion_trajectory, problem, seed=5)
    again = run(fused_diffusion_trajectory, problem, seed=5)
    assert torch.equal(first[0], again[0])
    for name in first[2]:
        assert torch.equal(first[2][name], again[2][name]), name


@pytest.mark.gpu
def test_convergence_fused_vs_eager_few_hundred_steps(monkeypatch):
    monkeypatch.delenv("ADAREC_KERNELS", raising=False)
    fused, eager = train_losses("fused", 300, lr=3e-3), train_losses("eager", 300, lr=3e-3)
    assert fused[-1] < fused[0] and eager[-1] < eager[0]
    tail_fused, tail_eager = sum(fused[-50:]) / 50, sum(eager[-50:]) / 50
    assert abs(tail_fused - tail_eager) < 0.05 * abs(tail_eager) + 0.02


# ----------------------------------------------------------------------------- benchmark script


def test_benchmark_script_writes_its_tables(tmp_path, monkeypatch):
    """profiling/bench_trajectory.py at a tiny shape with a scripted clock: the table carries the
    given medians and spreads and the fused row's speedup is eager median / fused median."""
    import csv

    from adarec.profiling import bench_trajectory

    clock = iter([[3.0, 1.0, 2.0], [1.0, 0.5, 1.0]])          # eager, then fused (ms per call)
    monkeypatch.setattr(bench_trajectory, "time_callable", lambda fn, *a, **k: (fn(), next(clock))[1])
    rows = bench_trajectory.main(["--batch", "3", "--dim", "16", "--max-depth", "2", "--dtype", "fp32",
                                  "--device", str(DEVICE), "--warmup", "0", "--repeats", "3", "--out", str(tmp_path)])
    assert [r["backend"] for r in rows] == ["eager", "fused"]
    with (tmp_path / "trajectory_fp32_D16.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [float(r["median_ms"]) for r in table] == [2.0, 1.0]
    assert [float(r["min_ms"]) for r in table] == [1.0, 0.5]
    assert float(table[1]["speedup_vs_eager"]) == 2.0
    for column in ("iqr_ms", "peak_mem_mib", "device", "torch", "triton", "date", "commit", "valid_rows"):
        assert column in table[0]
    assert (tmp_path / "trajectory_fp32_D16.md").read_text().startswith("| op | backend |")


# ----------------------------------------------------------------------------- ahead-of-time compile


@pytest.mark.skipif(torch.cuda.is_available(), reason="compiled for real by the tests above on a GPU")
def test_kernels_compile_for_an_h100_target_without_a_gpu(tmp_path):
    """The interpreter runs the kernels as Python; this lowers them for sm_90 (Triton's own
    ptxas), which rejects what only a real compile sees (non-constexpr globals, dot shapes)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("aot_compile_trajectory.py")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, str(script), "90"], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert out.stdout.count("ok ") == 8, out.stdout


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_training_run_on_the_engine_with_the_fused_trajectory(tmp_path, monkeypatch, precision):
    """The whole path: DeepSpeed engine (fp32, or bf16 weights with fp32 master copies), fused
    trajectory and native fusion, one epoch and a test."""
    from pathlib import Path

    from adarec.engine.trainer import run_training

    from adarec.config import load_config

    monkeypatch.delenv("ADAREC_KERNELS", raising=False)
    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "configs/adarec_beauty.yaml", [
        "data.max_users=120", "data.max_len=10", "model.hidden_size=16", "model.num_layers=1",
        "model.num_intent_clusters=4", "model.max_depth=2", "train.batch_size=32", "train.epochs=1",
        f"train.device={DEVICE.type}", f"train.precision={precision}", "kernels.backend=fused"])
    result = run_training(cfg, tmp_path / "run")
    assert result["split"] == "test" and 0.0 <= result["NDCG@20"] <= 1.0
    stats = json.loads((tmp_path / "run" / "epochs.jsonl").read_text().splitlines()[0])
    assert all(v == v for v in stats.values() if isinstance(v, float))        # no NaN anywhere
    assert stats["pairs_needed_frac"] > 0
