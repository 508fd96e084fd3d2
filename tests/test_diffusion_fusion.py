"""Hierarchical diffusion (adarec/diffusion.py) and the gated fusion (adarec/fusion.py) against
hand-written per-pair / per-position / per-user loop references (docs/method.md 2.2 and 2.3)."""

import math

import pytest
import torch

from adarec.diffusion import diffusion_trajectory, level_tables, linear_beta_schedule, pack_levels
from adarec.fusion import gated_fusion, segment_sum

# ----------------------------------------------------------------------------- references


def hand_abar(steps=50, beta_start=1e-4, beta_end=0.02):
    """abar_k = prod_{i<=k} (1 - beta_i), k = 1..steps, plain Python floats."""
    betas = [beta_start + (beta_end - beta_start) * i / (steps - 1) for i in range(steps)]
    abar, prod = [], 1.0
    for beta in betas:
        prod *= 1.0 - beta
        abar.append(prod)
    return abar


def hand_tables(max_depth):
    """float64 sqrt(abar_k), sqrt(1 - abar_k) for k = 0..max_depth (level 0: 1 and 0)."""
    abar = [1.0, *hand_abar()[:max_depth]]
    return (torch.tensor([math.sqrt(a) for a in abar], dtype=torch.float64),
            torch.tensor([math.sqrt(1.0 - a) for a in abar], dtype=torch.float64))


def gelu_ref(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def trajectory_ref(e0, lengths, depths, sqrt_abar, sqrt_one_minus, w1, b1, step_table, w2, b2, noise):
    """docs/method.md 2.2, one (user, level) pair and one position at a time."""
    length, dim = e0.shape[1], e0.shape[2]
    rows, sq_errors = [], []
    pair = 0
    for u in range(e0.shape[0]):
        for k in range(int(depths[u]) + 1):
            positions = []
            for t in range(length):
                if t < length - int(lengths[u]):          # left padding: not part of the trajectory
                    positions.append(torch.zeros(dim, dtype=e0.dtype))
                    continue
                x0 = e0[u, t]
                if k == 0:
                    positions.append(x0)
                    continue
                eps = noise[pair, t]
                a, s = sqrt_abar[k], sqrt_one_minus[k]
                e_k = a * x0 + s * eps
                eps_hat = w2 @ gelu_ref(w1 @ e_k + b1 + step_table[k]) + b2
                positions.append((e_k - s * eps_hat) / a)
                sq_errors.append(((eps_hat - eps) ** 2).sum() / dim)
            rows.append(torch.stack(positions))
            pair += 1
    loss = torch.stack(sq_errors).mean() if sq_errors else e0.sum() * 0.0
    return torch.stack(rows), loss


def fusion_ref(fin, coar, g, m, counts, w_gate, b_gate):
    """docs/method.md 2.3, one user, one position and one level at a time."""
    hs, zcs = [], []
    row = 0
    length = fin.shape[1]
    for c in counts:
        h_user, zc_user = [], []
        for i in range(length):
            num_fin = torch.zeros_like(fin[0, 0])
            den_fin = torch.zeros((), dtype=fin.dtype)
            num_coar = torch.zeros_like(coar[0, 0])
            den_coar = torch.zeros((), dtype=fin.dtype)
            for k in range(row, row + c):
                num_fin = num_fin + m[k, i] * g[k, i] * fin[k, i]
                den_fin = den_fin + m[k, i] * g[k, i]
                num_coar = num_coar + m[k, i] * (1.0 - g[k, i]) * coar[k, i]
                den_coar = den_coar + m[k, i] * (1.0 - g[k, i])
            z_fin = num_fin / (den_fin + 1e-8)
            z_coar = num_coar / (den_coar + 1e-8)
            gate = 1.0 / (1.0 + torch.exp(-(w_gate @ z_coar + b_gate)))
            h_user.append(gate * z_fin + (1.0 - gate) * z_coar)
            zc_user.append(z_coar)
        row += c
        hs.append(torch.stack(h_user))
        zcs.append(torch.stack(zc_user))
    return torch.stack(hs), torch.stack(zcs)


def left_padded_e0(batch, length, dim, lengths, gen, dtype=torch.float64):
    e0 = torch.randn(batch, length, dim, generator=gen, dtype=dtype)
    return e0, torch.tensor(lengths)


def valid_mask(pair_user, lengths, length):
    return torch.arange(length)[None, :] >= (length - lengths[pair_user])[:, None]


def denoiser_weights(dim, width, levels, gen, dtype=torch.float64, scale=0.5):
    return [(torch.randn(*shape, generator=gen, dtype=dtype) * scale).requires_grad_()
            for shape in ((width, dim), (width,), (levels, width), (dim, width), (dim,))]


# ----------------------------------------------------------------------------- 1. schedule


def test_level_tables_match_hand_computed_ddpm_schedule():
    betas = linear_beta_schedule(50)
    assert betas.dtype == torch.float64 and betas.shape == (50,)
    assert float(betas[0]) == pytest.approx(1e-4) and float(betas[-1]) == pytest.approx(0.02)

    sqrt_abar, sqrt_one_minus = level_tables(50, 50)
    assert sqrt_abar.shape == sqrt_one_minus.shape == (51,)
    # Level 0 is the clean E^0.
    assert float(sqrt_abar[0]) == 1.0 and float(sqrt_one_minus[0]) == 0.0
    # Level 1 uses abar_1 = 1 - beta_1 (not abar_0 = 1, not abar_2).
    assert float(sqrt_abar[1]) ** 2 == pytest.approx(1.0 - 1e-4, abs=1e-7)
    assert float(sqrt_one_minus[1]) ** 2 == pytest.approx(1e-4, rel=1e-4)
    want_a, want_s = hand_tables(50)
    torch.testing.assert_close(sqrt_abar.double(), want_a, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sqrt_one_minus.double(), want_s, rtol=1e-5, atol=1e-7)
    # Noise grows with the level.
    assert bool((sqrt_abar[1:] < sqrt_abar[:-1]).all())

    # A shorter table is the prefix of the full one.
    short_a, short_s = level_tables(4, 50)
    assert short_a.shape == (5,)
    torch.testing.assert_close(short_a, sqrt_abar[:5])
    torch.testing.assert_close(short_s, sqrt_one_minus[:5])


@pytest.mark.parametrize("bad", [-1, 51])
def test_level_tables_reject_depths_outside_the_schedule(bad):
    with pytest.raises(ValueError):
        level_tables(bad, 50)


# ----------------------------------------------------------------------------- 2. packing


def test_pack_levels_layout():
    packed = pack_levels(torch.tensor([2, 0, 3]))
    assert packed.pair_user.tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    assert packed.pair_level.tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    assert packed.offsets.tolist() == [0, 3, 4, 8]
    assert packed.num_pairs == 8 == int((torch.tensor([2, 0, 3]) + 1).sum())
    assert packed.pair_user.dtype == packed.pair_level.dtype == packed.offsets.dtype == torch.int64


def test_pack_levels_matches_brute_force_on_random_depths():
    gen = torch.Generator().manual_seed(1)
    depths = torch.randint(0, 6, (9,), generator=gen)
    packed = pack_levels(depths)
    users, levels, offsets = [], [], [0]
    for u, t in enumerate(depths.tolist()):
        users += [u] * (t + 1)
        levels += list(range(t + 1))
        offsets.append(offsets[-1] + t + 1)
    assert packed.pair_user.tolist() == users
    assert packed.pair_level.tolist() == levels
    assert packed.offsets.tolist() == offsets
    assert packed.num_pairs == int((depths + 1).sum())
    zeros = pack_levels(torch.zeros(3, dtype=torch.long))
    assert zeros.pair_level.tolist() == [0, 0, 0] and zeros.offsets.tolist() == [0, 1, 2, 3]


def test_segment_sum_per_user():
    values = torch.arange(8.0)
    got = segment_sum(values, torch.tensor([0, 3, 4, 8]))
    assert got.tolist() == [0 + 1 + 2, 3, 4 + 5 + 6 + 7]


# ----------------------------------------------------------------------------- 3. trajectory


def _trajectory_setup(seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch, length, dim, width, t_max = 3, 5, 6, 10, 3
    depths = torch.tensor([2, 3, 1])            # levels 0..T_max all occur; the length-1 user is deep
    e0, lengths = left_padded_e0(batch, length, dim, [5, 1, 3], gen)
    packed = pack_levels(depths)
    noise = torch.randn(packed.num_pairs, length, dim, generator=gen, dtype=torch.float64)
    weights = denoiser_weights(dim, width, t_max + 1, gen)
    sqrt_abar, sqrt_one_minus = hand_tables(t_max)
    return depths, e0.requires_grad_(), lengths, packed, noise, weights, sqrt_abar, sqrt_one_minus


def test_trajectory_matches_per_position_reference():
    depths, e0, lengths, packed, noise, weights, sa, so = _trajectory_setup()
    e_hat, loss = diffusion_trajectory(e0, lengths, packed.pair_user, packed.pair_level, sa, so, *weights,
                                       noise=noise)
    want_hat, want_loss = trajectory_ref(e0, lengths, depths, sa, so, *weights, noise)
    assert e_hat.shape == (packed.num_pairs, 5, 6)
    valid = valid_mask(packed.pair_user, lengths, 5)
    torch.testing.assert_close(e_hat[valid], want_hat[valid])
    assert torch.equal(e_hat[~valid], torch.zeros_like(e_hat[~valid]))       # padding rows are exactly 0
    level0 = packed.pair_level == 0
    x0 = e0[packed.pair_user]
    assert torch.equal(e_hat[level0][valid[level0]], x0[level0][valid[level0]])   # Ehat^0 = E^0 exactly
    # Reconstructions at levels >= 1 really are different from E^0 (the denoiser is not trivial).
    noisy = (~level0)[:, None] & valid
    assert (e_hat[noisy] - x0[noisy]).abs().max() > 1e-3
    # L_deno: mean over (level >= 1, valid position) of ||eps_hat - eps||^2 / D; it is float32 inside.
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-7)


def test_trajectory_gradients_match_reference():
    depths, e0, lengths, packed, noise, weights, sa, so = _trajectory_setup(seed=1)
    inputs = [e0, *weights]
    e_hat, loss = diffusion_trajectory(e0, lengths, packed.pair_user, packed.pair_level, sa, so, *weights,
                                       noise=noise)
    want_hat, want_loss = trajectory_ref(e0, lengths, depths, sa, so, *weights, noise)
    proj = torch.randn(e_hat.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    got = torch.autograd.grad((e_hat * proj).sum(), inputs, retain_graph=True)
    want = torch.autograd.grad((want_hat * proj).sum(), inputs, retain_graph=True)
    for name, a, b in zip(["e0", "w1", "b1", "step_table", "w2", "b2"], got, want, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"d(Ehat)/d{name}: {m}")
    got = torch.autograd.grad(loss, inputs)
    want = torch.autograd.grad(want_loss, inputs)
    for name, a, b in zip(["e0", "w1", "b1", "step_table", "w2", "b2"], got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7, msg=lambda m, name=name: f"dL_deno/d{name}: {m}")
    # Level 0 never reaches the denoiser, so step-table row 0 gets no gradient.
    assert torch.equal(got[3][0], torch.zeros_like(got[3][0]))


def test_trajectory_without_noisy_levels_has_zero_loss():
    gen = torch.Generator().manual_seed(2)
    e0, lengths = left_padded_e0(2, 4, 6, [4, 2], gen)
    packed = pack_levels(torch.tensor([0, 0]))
    weights = [w.detach() for w in denoiser_weights(6, 10, 4, gen)]
    sa, so = hand_tables(3)
    e_hat, loss = diffusion_trajectory(e0, lengths, packed.pair_user, packed.pair_level, sa, so, *weights)
    assert float(loss) == 0.0
    torch.testing.assert_close(e_hat, e0 * valid_mask(packed.pair_user, lengths, 4)[..., None], rtol=0, atol=0)


# ----------------------------------------------------------------------------- 4. noise zero


def test_reconstruction_at_zero_noise_returns_e0_only_for_a_zero_denoiser():
    gen = torch.Generator().manual_seed(3)
    length, dim, width, t_max = 5, 6, 10, 4
    e0, lengths = left_padded_e0(3, length, dim, [5, 1, 3], gen, dtype=torch.float32)
    packed = pack_levels(torch.tensor([4, 2, 3]))
    sa, so = level_tables(t_max, 50)
    noise = torch.zeros(packed.num_pairs, length, dim)
    w1, b1, table, w2, b2 = (w.detach().float() for w in denoiser_weights(dim, width, t_max + 1, gen))
    valid = valid_mask(packed.pair_user, lengths, length)
    x0 = e0[packed.pair_user]

    # eps_hat = 0 (fc2 weight and bias zero) and eps = 0: every level reconstructs E^0.
    e_hat, loss = diffusion_trajectory(e0, lengths, packed.pair_user, packed.pair_level, sa, so,
                                       w1, b1, table, torch.zeros_like(w2), torch.zeros_like(b2), noise=noise)
    torch.testing.assert_close(e_hat[valid], x0[valid], rtol=1e-6, atol=1e-6)
    assert float(loss) == 0.0

    # Same zero noise, a real denoiser: levels >= 1 no longer return E^0 (level 0 still does).
    e_hat, loss = diffusion_trajectory(e0, lengths, packed.pair_user, packed.pair_level, sa, so,
                                       w1, b1, table, w2, b2, noise=noise)
    noisy = (packed.pair_level > 0)[:, None] & valid
    level0 = (packed.pair_level == 0)[:, None] & valid
    assert torch.equal(e_hat[level0], x0[level0])
    for k in range(1, t_max + 1):
        rows = (packed.pair_level == k)[:, None] & valid
        assert (e_hat[rows] - x0[rows]).abs().max() > 1e-3, f"level {k} is insensitive to the denoiser"
    assert (e_hat[noisy] - x0[noisy]).abs().max() > 1e-2
    assert float(loss) > 0.0


# ----------------------------------------------------------------------------- 5. padding


def test_padding_content_changes_nothing():
    _, e0, lengths, packed, noise, weights, sa, so = _trajectory_setup(seed=4)
    e0 = e0.detach()
    pad = torch.arange(5)[None, :] < (5 - lengths)[:, None]                  # [B, L]
    assert pad.any()
    e0_b = e0.clone()
    e0_b[pad] += 100.0 * torch.randn(e0_b[pad].shape, generator=torch.Generator().manual_seed(5),
                                     dtype=torch.float64)
    args = (lengths, packed.pair_user, packed.pair_level, sa, so, *weights)
    a = e0.clone().requires_grad_()
    b = e0_b.clone().requires_grad_()
    hat_a, loss_a = diffusion_trajectory(a, *args, noise=noise)
    hat_b, loss_b = diffusion_trajectory(b, *args, noise=noise)
    assert torch.equal(hat_a, hat_b)
    assert torch.equal(loss_a, loss_b)
    # ... and padding positions get no gradient.
    (grad_a,) = torch.autograd.grad(hat_a.sum() + loss_a, a)
    assert torch.equal(grad_a[pad], torch.zeros_like(grad_a[pad]))
    assert grad_a[~pad].abs().sum() > 0


# ----------------------------------------------------------------------------- 6. gated fusion


@pytest.mark.parametrize("depths,dim", [([0, 3, 1], 5), ([3], 5), ([0], 3), ([2, 0, 0, 3, 1], 7)])
def test_gated_fusion_matches_per_user_loop(depths, dim):
    gen = torch.Generator().manual_seed(len(depths) * 10 + dim)
    packed = pack_levels(torch.tensor(depths))
    p, length = packed.num_pairs, 4

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).requires_grad_()

    fin, coar = leaf(p, length, dim), leaf(p, length, dim)
    g = torch.rand(p, length, generator=gen, dtype=torch.float64).mul(0.9).add(0.05).requires_grad_()
    m = torch.rand(p, length, generator=gen, dtype=torch.float64).add(0.5).requires_grad_()  # any positive weights
    w_gate, b_gate = leaf(dim, dim, scale=0.5), leaf(dim, scale=0.5)
    inputs = [fin, coar, g, m, w_gate, b_gate]

    h, z_coar = gated_fusion(fin, coar, g, m, packed.offsets, w_gate, b_gate)
    want_h, want_zc = fusion_ref(fin, coar, g, m, [t + 1 for t in depths], w_gate, b_gate)
    assert h.shape == (len(depths), length, dim) and z_coar.shape == (len(depths), length, dim)
    torch.testing.assert_close(h, want_h)
    torch.testing.assert_close(z_coar, want_zc)

    proj_h = torch.randn(h.shape, generator=gen, dtype=torch.float64)
    proj_z = torch.randn(z_coar.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((h * proj_h).sum() + (z_coar * proj_z).sum(), inputs)
    want = torch.autograd.grad((want_h * proj_h).sum() + (want_zc * proj_z).sum(), inputs)
    for name, a, b in zip(["fin", "coar", "g", "m", "w_gate", "b_gate"], got, want, strict=True):
        torch.testing.assert_close(a, b, msg=lambda msg, name=name: f"d/d{name}: {msg}")


def test_gated_fusion_single_level_user_keeps_the_eps():
    # One level with g = 1: z_coar = 0 * coar / (0 + 1e-8) = 0 exactly, z_fin = fin / (1 + 1e-8).
    fin = torch.full((1, 2, 3), 2.0, dtype=torch.float64)
    coar = torch.full((1, 2, 3), 5.0, dtype=torch.float64)
    one = torch.ones(1, 2, dtype=torch.float64)
    w_gate = torch.zeros(3, 3, dtype=torch.float64)
    b_gate = torch.zeros(3, dtype=torch.float64)
    h, z_coar = gated_fusion(fin, coar, one, one, torch.tensor([0, 1]), w_gate, b_gate)
    assert torch.equal(z_coar, torch.zeros_like(z_coar))
    torch.testing.assert_close(h, 0.5 * fin / (1.0 + 1e-8), rtol=1e-15, atol=0)
