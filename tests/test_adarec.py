"""ADARec (docs/method.md section 2): depth controller, coarse contrast, depth masking in the full
model, straight-through gradients and the depth-gradient probe, a short training run and
deterministic scoring. Causality has its own file (test_causality.py)."""

import math

import pytest
import torch
import torch.nn.functional as F
from batches import synthetic_batch

from adarec.config import ModelConfig
from adarec.diffusion import grid_levels, pack_levels
from adarec.models import ADARec, build_model
from adarec.models.adarec import coarse_contrastive_loss
from adarec.models.controller import DepthController, DepthDecision
from adarec.models.encoder import prefix_mean

NUM_ITEMS, MAX_LEN, T_MAX, HIDDEN = 30, 8, 3, 8


def small_cfg(**kw):
    base = {"name": "adarec", "hidden_size": HIDDEN, "num_layers": 1, "num_heads": 2, "hidden_dropout": 0.0,
            "attn_dropout": 0.0, "num_intent_clusters": 3, "max_depth": T_MAX}
    base.update(kw)
    return ModelConfig(**base)


def batch_for(num_items=NUM_ITEMS, b=5, length=MAX_LEN, seed=0):
    return synthetic_batch(num_items, b, length, seed)


def make_model(seed=0, backend="eager", **kw):
    """The model on the reference (eager) ops unless a backend is named: these tests pin the
    paper's semantics; the fused twins are compared against them in their own test files."""
    torch.manual_seed(seed)
    model = build_model(small_cfg(**kw), num_items=NUM_ITEMS, max_len=MAX_LEN, kernel_backend=backend)
    assert isinstance(model, ADARec)
    return model


def fixed_decision(depths, seed=0, survival=None, length=MAX_LEN):
    """A controller output with hard depths (one per user, the same at every position, or a full
    [B, L] tensor), probs that require grad and the survival function of those probs (or a given
    survival tensor, e.g. a leaf to read dL/ds)."""
    depths = torch.as_tensor(depths)
    if depths.dim() == 1:
        depths = depths[:, None].expand(-1, length).contiguous()
    gen = torch.Generator().manual_seed(seed)
    probs = F.softmax(torch.randn(*depths.shape, T_MAX + 1, generator=gen), -1).requires_grad_()
    if survival is None:
        survival = probs.flip(-1).cumsum(-1).flip(-1)
    exploration = (probs * probs.log()).sum(-1).mean()
    return DepthDecision(depths, probs, survival, exploration)


def patch_controller(monkeypatch, model, decision):
    monkeypatch.setattr(model.controller, "forward", lambda e0, input_ids, generator=None: decision)


# ----------------------------------------------------------------------------- controller


def test_controller_eval_is_argmax_without_noise():
    torch.manual_seed(0)
    ctrl = DepthController(HIDDEN, MAX_LEN, T_MAX, tau=0.5)
    with torch.no_grad():
        ctrl.head.weight.normal_(0, 1.0)   # spread the logits so the argmax is well defined
    ctrl.eval()
    ids = batch_for()["input_ids"]
    e0 = torch.randn(5, MAX_LEN, HIDDEN, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(1)
    first = ctrl(e0, ids)
    torch.manual_seed(2)
    second = ctrl(e0, ids)
    logits = ctrl.logits(e0, ids)
    assert logits.shape == (5, MAX_LEN, T_MAX + 1)
    items = ids > 0
    assert torch.equal(first.depths[items], logits.argmax(-1)[items])
    assert torch.equal(first.depths[~items], torch.zeros_like(first.depths[~items]))   # padding: depth 0
    assert torch.equal(first.sequence_depths, logits[:, -1].argmax(-1))
    assert torch.equal(first.depths, second.depths)
    assert torch.equal(first.probs, second.probs)
    assert first.depths.dtype == torch.int64
    torch.testing.assert_close(first.probs, F.softmax(logits, -1))


def test_controller_exploration_is_minus_the_entropy_over_item_positions():
    torch.manual_seed(0)
    ctrl = DepthController(HIDDEN, MAX_LEN, T_MAX).eval()
    ids = batch_for()["input_ids"]
    with torch.no_grad():
        dec = ctrl(torch.randn(5, MAX_LEN, HIDDEN), ids)
    per_user = []
    for u in range(5):
        rows = [dec.probs[u, i] for i in range(MAX_LEN) if ids[u, i] > 0]
        per_user.append(sum(-sum(float(p) * math.log(float(p)) for p in row) for row in rows) / len(rows))
    assert float(dec.exploration) == pytest.approx(-sum(per_user) / 5, rel=1e-5)


def test_controller_position_i_reads_only_positions_up_to_i():
    """The prefix depth: logits at i do not move when a later item changes; at the last position
    they summarise the whole input."""
    torch.manual_seed(0)
    ctrl = DepthController(HIDDEN, MAX_LEN, T_MAX).eval()
    ids = batch_for()["input_ids"]
    e0 = torch.randn(5, MAX_LEN, HIDDEN, generator=torch.Generator().manual_seed(1))
    logits = ctrl.logits(e0, ids)
    for j in range(1, MAX_LEN):
        e1 = e0.clone()
        e1[:, j] += 1.0
        ids1 = ids.clone()
        ids1[:, j] = torch.where(ids[:, j] > 0, ids[:, j] % NUM_ITEMS + 1, 0)
        moved = ctrl.logits(e1, ids1)
        assert torch.equal(moved[:, :j], logits[:, :j]), j
        assert not torch.allclose(moved[:, -1], logits[:, -1])


def test_controller_training_depths_follow_the_softmax_of_the_logits():
    """Gumbel-max: the hard training depth argmax((logits + g) / tau) is distributed as
    softmax(logits), whatever tau. Checked by a chi-square over many draws per user (last position)."""
    torch.manual_seed(0)
    ctrl = DepthController(HIDDEN, MAX_LEN, T_MAX, tau=0.5).train()
    with torch.no_grad():
        ctrl.head.weight.normal_(0, 0.5)
    ids = batch_for()["input_ids"]
    e0 = torch.randn(5, MAX_LEN, HIDDEN, generator=torch.Generator().manual_seed(1))
    draws = 4000
    with torch.no_grad():
        want = F.softmax(ctrl.logits(e0, ids)[:, -1], -1)
        dec = ctrl(e0.repeat(draws, 1, 1), ids.repeat(draws, 1), generator=torch.Generator().manual_seed(9))
    counts = torch.zeros(5, T_MAX + 1).index_put_((torch.arange(5).repeat(draws), dec.sequence_depths),
                                                  torch.ones(5 * draws), accumulate=True)
    expected = want * draws
    chi2 = ((counts - expected) ** 2 / expected).sum(-1)
    assert (chi2 < 25).all(), chi2                                # df = 3: P(chi2 > 25) < 2e-5
    # The soft probabilities are a distribution and their argmax is the hard depth.
    torch.testing.assert_close(dec.probs.sum(-1), torch.ones(5 * draws, MAX_LEN))
    items = ids.repeat(draws, 1) > 0
    assert torch.equal(dec.depths[items], dec.probs.argmax(-1)[items])


def test_controller_survival_is_the_tail_sum_of_the_probabilities():
    torch.manual_seed(0)
    ctrl = DepthController(HIDDEN, MAX_LEN, T_MAX).train()
    dec = ctrl(torch.randn(5, MAX_LEN, HIDDEN), batch_for()["input_ids"])
    for k in range(T_MAX + 1):
        torch.testing.assert_close(dec.survival[..., k], dec.probs[..., k:].sum(-1))
        (grad,) = torch.autograd.grad(dec.survival[..., k].sum(), dec.probs, retain_graph=True)
        want = (torch.arange(T_MAX + 1) >= k).float().expand(5, MAX_LEN, -1)
        assert torch.equal(grad, want), f"d s_{k} / d p"


@pytest.mark.parametrize("mode", ["none", "probe", "all"])
def test_pair_masks_per_position_value_and_gradient(mode):
    """m[p, i] has value [k <= depth[u, i]] and the gradient of s_k[u, i] on the levels the mode
    gives one to: none the active ones, probe also depth + 1, all every computed level."""
    depths = torch.tensor([[0, 1, 1, 2], [3, 3, 2, 0]])
    dec = fixed_decision(depths, length=4)
    packed = pack_levels(dec.top_depths(), T_MAX, "all")
    m = dec.pair_masks(packed.pair_user, packed.pair_level, mode)
    weights = torch.randn(m.shape, generator=torch.Generator().manual_seed(2))
    (grad,) = torch.autograd.grad((m * weights).sum(), dec.probs)
    reach = {"none": 0, "probe": 1, "all": T_MAX}[mode]
    want = torch.zeros(2, 4, T_MAX + 1)
    for p in range(packed.num_pairs):
        u, k = int(packed.pair_user[p]), int(packed.pair_level[p])
        for i in range(4):
            assert float(m[p, i].detach()) == float(k <= depths[u, i])
            if k <= depths[u, i] + reach:
                want[u, i, k:] += weights[p, i]            # d s_k / d p_j = 1 for j >= k
    torch.testing.assert_close(grad, want)


# ----------------------------------------------------------------------------- L_cont


def cont_ref(z, depths, temperature=0.07, levels=None):
    """Loop over users and anchor levels k in [floor(T_u/2), T_u - 1]; z rows in the compact
    layout (levels 0..T_u per user), or in the grid of `levels` levels per user."""
    row = {}
    i = 0
    for u, t in enumerate(depths):
        for k in range(t + 1):
            row[u, k] = u * levels + k if levels else i
            i += 1
    losses = []
    for u, t in enumerate(depths):
        for k in range(t // 2, t):
            anchor = z[row[u, k]]
            cands = [u] + [v for v, tv in enumerate(depths) if v != u and tv >= k + 1]
            sims = torch.stack([F.cosine_similarity(anchor, z[row[v, k + 1]], dim=0) for v in cands]) / temperature
            losses.append(-(sims[0] - torch.logsumexp(sims, 0)))
    return torch.stack(losses).mean(), len(losses)


@pytest.mark.parametrize("layout", ["compact", "grid"])
@pytest.mark.parametrize("depths", [[3, 1, 2, 0], [1, 2], [3, 3, 0, 2, 1]])
def test_coarse_contrastive_loss_matches_loop(depths, layout):
    """On the compact layout (scattered into the level grid) and on the static grid (a view)."""
    gen = torch.Generator().manual_seed(sum(depths))
    grid = layout == "grid"
    packed = grid_levels(torch.tensor(depths), T_MAX) if grid else pack_levels(torch.tensor(depths))
    z = torch.randn(packed.num_pairs, 5, generator=gen, dtype=torch.float64).requires_grad_()
    got = coarse_contrastive_loss(z, packed, torch.tensor(depths), T_MAX, 0.07)
    want, anchors = cont_ref(z, depths, levels=T_MAX + 1 if grid else None)
    assert anchors > 0
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    (g_got,) = torch.autograd.grad(got, z)
    (g_want,) = torch.autograd.grad(want, z)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)


def test_coarse_contrastive_loss_hand_made_batch():
    # Depths [1, 2]: user 0 (T=1) has the single anchor k=0 (positive z_{0,1}, negative z_{1,1});
    # user 1 (T=2) has the anchor k=1 whose only candidate at level 2 is its own positive (loss 0).
    depths = torch.tensor([1, 2])
    packed = pack_levels(depths)
    z = torch.tensor([[1.0, 0.0],     # u0 k0
                      [0.6, 0.8],     # u0 k1
                      [0.0, 1.0],     # u1 k0
                      [1.0, 0.0],     # u1 k1
                      [0.0, 2.0]])    # u1 k2
    got = coarse_contrastive_loss(z, packed, depths, 2, 0.07)
    pos, neg = 0.6 / 0.07, 1.0 / 0.07
    anchor0 = -(pos - math.log(math.exp(pos) + math.exp(neg)))
    assert float(got) == pytest.approx((anchor0 + 0.0) / 2, rel=1e-5)


def test_coarse_contrastive_loss_without_anchors_is_zero():
    depths = torch.zeros(4, dtype=torch.long)
    packed = pack_levels(depths)
    z = torch.randn(4, 6, requires_grad=True)
    got = coarse_contrastive_loss(z, packed, depths, T_MAX, 0.07)
    assert float(got.detach()) == 0.0 and torch.isfinite(got).item()
    got.backward()
    assert torch.isfinite(z.grad).all() and float(z.grad.abs().sum()) == 0.0



@pytest.mark.parametrize("mode", ["probe", "all"])
def test_coarse_contrastive_loss_ignores_levels_above_the_depth(mode):
    """Probe (and, under `all`, every inactive) level is neither anchor, positive nor negative:
    the loss equals the loop reference over the active rows alone."""
    depths = [3, 1, 2, 0]
    packed = pack_levels(torch.tensor(depths), T_MAX, mode)
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(packed.num_pairs, 5, generator=gen, dtype=torch.float64).requires_grad_()
    got = coarse_contrastive_loss(z, packed, torch.tensor(depths), T_MAX, 0.07)
    want, _ = cont_ref(z[packed.pair_active], depths)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(got, z)
    assert torch.equal(grad[~packed.pair_active], torch.zeros_like(grad[~packed.pair_active]))


# ----------------------------------------------------------------------------- depth masking


def test_depth_zero_user_is_the_level_zero_path(monkeypatch):
    """A user of depth 0 has one level: h = gate * fine(E^0) + (1 - gate) * coarse(prefix pool),
    with the router weight cancelling out of both normalised means, written out by hand."""
    model = make_model(depth_gradient="none").eval()
    ids = batch_for()["input_ids"]
    patch_controller(monkeypatch, model, fixed_decision([0, 2, 1, 3, 0]))
    with torch.no_grad():
        h = model.user_representation(ids)["h"]
        for u in (0, 4):                                # length 8 (no padding) and length 2
            uid = ids[u:u + 1]
            valid = (uid > 0)[..., None]
            e0 = model.encoder.embed(uid) * valid      # padding positions are not part of the trajectory
            fin = model.encoder.encode(e0, uid)[0]
            rows = []
            for i in range(MAX_LEN):
                seen = [j for j in range(i + 1) if uid[0, j] > 0]
                pool = e0[0, seen].mean(0) if seen else torch.zeros(HIDDEN)
                coar = model.coarse(pool)
                route_in = torch.cat([pool, model.level_embedding.weight[0]])
                g = torch.sigmoid(model.router(route_in))[0]
                z_fin = g * fin[i] / (g + 1e-8)
                z_coar = (1 - g) * coar / ((1 - g) + 1e-8)
                gate = torch.sigmoid(model.final_gate(z_coar))
                rows.append(gate * z_fin + (1 - gate) * z_coar)
            torch.testing.assert_close(h[u], torch.stack(rows))


def test_prefix_mean_is_the_mean_of_the_items_seen_so_far():
    x = torch.arange(15.0).view(1, 5, 3)
    ids = torch.tensor([[0, 0, 5, 6, 7]])
    got = prefix_mean(x, ids)
    assert torch.equal(got[0, :2], torch.zeros(2, 3))
    torch.testing.assert_close(got[0, 2], x[0, 2])
    torch.testing.assert_close(got[0, 3], (x[0, 2] + x[0, 3]) / 2)
    torch.testing.assert_close(got[0, 4], (x[0, 2] + x[0, 3] + x[0, 4]) / 3)


GRID = [T_MAX + 1] * 5


@pytest.mark.parametrize(("layout", "mode", "levels"), [
    ("compact", "none", [1, 3, 2, 4, 1]), ("compact", "probe", [2, 4, 3, 4, 2]), ("compact", "all", GRID),
    ("grid", "none", GRID), ("grid", "probe", GRID), ("grid", "all", GRID)])
def test_levels_computed_per_layout_and_mode(monkeypatch, layout, mode, levels):
    """compact: none builds levels 0..T_u, probe adds T_u + 1 (none above T_max), all builds
    0..T_max, and scoring builds 0..T_u only. grid: every level 0..T_max of every user in
    training and scoring, whatever the mode (shapes never depend on the depths). Either way the
    active levels (those in L_deno) are 0..T_u."""
    model = make_model(depth_gradient=mode, level_layout=layout).train()
    ids = batch_for()["input_ids"]
    depths = [0, 2, 1, 3, 0]
    patch_controller(monkeypatch, model, fixed_decision(depths))
    rows_encoded = []
    encode = model.encoder.encode
    monkeypatch.setattr(model.encoder, "encode", lambda x, i: rows_encoded.append(x.shape[0]) or encode(x, i))
    scoring_levels = GRID if layout == "grid" else [t + 1 for t in depths]
    for last_only, expected in ((False, levels), (True, scoring_levels)):
        model.train(not last_only)
        packed = model.user_representation(ids, last_only=last_only)["packed"]
        for u, t in enumerate(depths):
            rows = slice(int(packed.offsets[u]), int(packed.offsets[u + 1]))
            assert packed.pair_user[rows].tolist() == [u] * expected[u]
            assert packed.pair_level[rows].tolist() == list(range(expected[u]))
            assert packed.pair_active[rows].tolist() == [k <= t for k in range(expected[u])]
    assert rows_encoded == [sum(levels), sum(scoring_levels)]


@pytest.mark.parametrize("layout", ["grid", "compact"])
def test_levels_follow_the_deepest_prefix_in_training_and_the_last_one_for_scoring(monkeypatch, layout):
    """Per-prefix depths: in training the active levels are those some item position reaches
    (the compact layout builds those and the probe above them); in scoring those of the last
    position, and h at the last position is the same either way."""
    ids = batch_for()["input_ids"]
    depths = torch.zeros(5, MAX_LEN, dtype=torch.long)
    depths[0] = torch.tensor([1, 0, 2, 0, 1, 0, 0, 1])      # deepest prefix 2, last position 1
    depths[3, -5:] = torch.tensor([0, 3, 1, 0, 0])           # deepest prefix 3, last position 0
    model = make_model(depth_gradient="probe", level_layout=layout).train()
    patch_controller(monkeypatch, model, fixed_decision(depths))

    def per_user(packed, values):
        return torch.zeros(5).index_add_(0, packed.pair_user, values.float()).long().tolist()

    packed = model.user_representation(ids)["packed"]
    assert per_user(packed, packed.pair_active) == [3, 1, 1, 4, 1]
    computed = [T_MAX + 1] * 5 if layout == "grid" else [4, 2, 2, 4, 2]
    assert per_user(packed, torch.ones_like(packed.pair_user)) == computed
    model.eval()
    full = model.user_representation(ids)
    last = model.user_representation(ids, last_only=True)
    assert per_user(last["packed"], last["packed"].pair_active) == [2, 1, 1, 1, 1]
    torch.testing.assert_close(last["h"][:, -1], full["h"][:, -1], rtol=0, atol=0)


def test_user_outputs_ignore_levels_above_their_depth(monkeypatch):
    """With depth_gradient=none levels above T_u weigh nothing (their mask is 0): their parameters get no
    gradient and changing them changes nothing."""
    model = make_model(depth_gradient="none").train()
    ids = batch_for()["input_ids"]
    depths = [0, 2, 1, 2, 1]                                        # max depth 2 < T_max = 3
    patch_controller(monkeypatch, model, fixed_decision(depths))
    sinusoid = model.denoiser.step_sinusoid.clone().requires_grad_()
    model.denoiser.step_sinusoid = sinusoid

    torch.manual_seed(5)
    h = model.user_representation(ids)["h"]
    for u, t in enumerate(depths):
        g_sin, g_lvl = torch.autograd.grad(h[u].sum(), [sinusoid, model.level_embedding.weight], retain_graph=True)
        assert torch.equal(g_sin[t + 1:], torch.zeros_like(g_sin[t + 1:]))
        assert torch.equal(g_lvl[t + 1:], torch.zeros_like(g_lvl[t + 1:]))
        if t >= 1:
            assert g_sin[t].abs().sum() > 0 and g_lvl[t].abs().sum() > 0

    # Changing the level-2 step embedding and level embedding moves only users that reach level 2.
    with torch.no_grad():
        sinusoid[2:] += 3.0
        model.level_embedding.weight[2:] += 3.0
    torch.manual_seed(5)
    h2 = model.user_representation(ids)["h"]
    for u, t in enumerate(depths):
        if t < 2:
            assert torch.equal(h2[u], h[u]), f"user {u} (depth {t}) depends on level 2"
        else:
            assert not torch.allclose(h2[u], h[u]), f"user {u} (depth {t}) ignores its level 2"
    # Level 3 is above every depth: changing it changes nothing.
    with torch.no_grad():
        sinusoid[3] -= 7.0
        model.level_embedding.weight[3] -= 7.0
    torch.manual_seed(5)
    assert torch.equal(model.user_representation(ids)["h"], h2)


# ----------------------------------------------------------------------------- straight-through and probe


def controller_gradients(monkeypatch, mode, depths, backend="eager"):
    """dL/dp for fixed depths (no exploration term: the masks are the only path to p)."""
    model = make_model(lambda_expl=0.0, depth_gradient=mode, backend=backend).train()
    decision = fixed_decision(depths)
    patch_controller(monkeypatch, model, decision)
    torch.manual_seed(3)
    loss, _ = model(batch_for())
    (grad,) = torch.autograd.grad(loss, decision.probs)
    return grad


def test_straight_through_gradient_is_the_cumulative_mask_gradient(monkeypatch):
    """s_k = sum_{j >= k} p_j, so dL/dp_j = sum_{k <= j} dL/ds_k: read dL/ds from a leaf survival
    tensor in one run and compare with dL/dp of the real survival in another."""
    depths = [1, 3, 0, 2, 1]
    grad_p = controller_gradients(monkeypatch, "probe", depths)
    model = make_model(lambda_expl=0.0, depth_gradient="probe").train()
    leaf = fixed_decision(depths).survival.detach().clone().requires_grad_()
    patch_controller(monkeypatch, model, fixed_decision(depths, survival=leaf))
    torch.manual_seed(3)
    loss, _ = model(batch_for())
    (grad_s,) = torch.autograd.grad(loss, leaf)
    torch.testing.assert_close(grad_p, grad_s.cumsum(-1), rtol=1e-5, atol=1e-9)


def test_without_the_probe_no_gradient_pushes_deeper_and_with_it_one_does(monkeypatch):
    """The normalised fusion makes the mask gradients of the active levels sum to ~0 at every
    position, so under `none` dL/dp_j vanishes for j >= the depth (the controller can only be
    pushed shallower). The probe level gives dL/dp_{depth + 1} a real value at every item
    position of every user below T_max."""
    depths = [1, 3, 0, 2, 1]
    ids = batch_for()["input_ids"]
    none = controller_gradients(monkeypatch, "none", depths)
    probe = controller_gradients(monkeypatch, "probe", depths)
    scale = none.abs().max()
    assert scale > 1e-4
    for u, t in enumerate(depths):
        for i in range(MAX_LEN):
            if ids[u, i] == 0:
                continue
            assert none[u, i, t:].abs().max() < 1e-4 * scale, f"user {u} position {i}: {none[u, i]}"
            if t < T_MAX:
                assert probe[u, i, t + 1].abs() > 1e-3 * scale, f"user {u} position {i}: {probe[u, i]}"
            # The probe does not change what the active levels receive.
            torch.testing.assert_close(probe[u, i, :t], none[u, i, :t], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("layout", ["compact", "grid"])
@pytest.mark.parametrize("backend", ["eager", "fused"])
def test_probe_and_all_leave_every_forward_value_bit_exact(backend, layout):
    """The modes differ in gradients only: h and every loss term are the same bits (L_deno within
    rounding: the compact layout sums it over different rows), on the eager path and on the fused
    kernels (the Triton interpreter on CPU), on both layouts."""
    results = {}
    for mode in ("none", "probe", "all"):
        model = make_model(depth_gradient=mode, backend=backend, level_layout=layout).train()
        torch.manual_seed(3)
        h = model.user_representation(batch_for()["input_ids"])["h"]
        torch.manual_seed(3)
        loss, terms = model(batch_for())
        results[mode] = (h, loss, terms, model.pop_epoch_stats())
    h, loss, terms, stats = results["none"]
    for mode in ("probe", "all"):
        h_m, loss_m, terms_m, stats_m = results[mode]
        assert torch.equal(h_m, h), mode
        torch.testing.assert_close(loss_m, loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(terms_m["deno"], terms["deno"], rtol=1e-6, atol=0)
        for key in terms:
            if key != "deno":
                assert torch.equal(terms_m[key], terms[key]), (mode, key)
        # The statistics count active levels only; on the compact layout only the computed
        # fraction grows (the grid computes everything in every mode).
        for key in stats:
            if key != "pairs_computed_frac":
                assert stats_m[key] == stats[key], (mode, key)
        if layout == "grid":
            assert stats_m["pairs_computed_frac"] == stats["pairs_computed_frac"] == 1.0
        else:
            assert stats_m["pairs_computed_frac"] > stats["pairs_computed_frac"]


def test_epoch_statistics_against_hand_counts(monkeypatch):
    model = make_model(depth_gradient="probe").train()
    depths = [0, 2, 1, 3, 0]
    patch_controller(monkeypatch, model, fixed_decision(depths))
    g_last = []
    for step in range(3):
        torch.manual_seed(step)
        out = model.user_representation(batch_for()["input_ids"])
        model._objective(out, batch_for())
        g_last.append((out["packed"], out["g"][:, -1].detach()))
    stats = model.pop_epoch_stats()
    assert [stats[f"depth_frac_{k}"] for k in range(T_MAX + 1)] == pytest.approx([0.4, 0.2, 0.2, 0.2])
    assert stats["pairs_active_frac"] == pytest.approx(11 / 20)          # sum (T_u + 1) / (B (T_max + 1))
    assert stats["pairs_needed_frac"] == pytest.approx(11 / 20)          # one depth at every position
    assert stats["pairs_computed_frac"] == pytest.approx(15 / 20)        # + one probe level below T_max
    for k in range(T_MAX + 1):
        values = [float(g[p]) for packed, g in g_last for p in range(packed.num_pairs)
                  if packed.pair_level[p] == k and packed.pair_active[p]]
        assert stats[f"router_g_{k}"] == pytest.approx(sum(values) / len(values))
    assert model.pop_epoch_stats() == {}


# ----------------------------------------------------------------------------- training / scoring


def test_loss_terms_match_independent_references(monkeypatch):
    """Each weighted term, isolated by switching its weight on with all others off, equals a
    reference computed outside the model: L_rec a hand BCE on h, L_cont the loop over anchors,
    L_expl minus the entropy written out, L_deno the per-position squared error of the
    trajectory fed the same noise."""
    depths = [1, 3, 0, 2, 1]
    off = {"lambda_deno": 0.0, "lambda_cont": 0.0, "lambda_expl": 0.0, "cf_weight": 0.0,
           "intent_cf_weight": 0.0, "trade_off": 0.0, "depth_gradient": "none"}
    batch = batch_for()

    def loss_with(**weights):
        model = make_model(**{**off, **weights}).train()
        decision = fixed_decision(depths)
        patch_controller(monkeypatch, model, decision)
        torch.manual_seed(4)
        out = model.user_representation(batch["input_ids"])
        torch.manual_seed(4)
        loss, _ = model(batch)
        return float(loss.detach()), out, decision, model

    base, out, decision, model = loss_with()
    emb = model.encoder.item_embeddings.weight.detach()
    h = out["h"].detach()
    pos = (h * emb[batch["target_pos"]]).sum(-1)
    neg = (h * emb[batch["target_neg"]]).sum(-1)
    is_t = (batch["target_pos"] > 0).float()
    bce = float(((-torch.log(torch.sigmoid(pos)) - torch.log(1 - torch.sigmoid(neg))) * is_t).sum() / is_t.sum())
    assert base == pytest.approx(float(bce), rel=1e-5)

    cont, *_ = loss_with(lambda_cont=1.0)
    grid = out["packed"].num_pairs == len(depths) * (T_MAX + 1)
    cont_want, _ = cont_ref(out["coarse"][:, -1].detach().double(), depths, levels=T_MAX + 1 if grid else None)
    assert cont - base == pytest.approx(float(cont_want), rel=1e-4)

    expl, *_ = loss_with(lambda_expl=1.0)
    probs = decision.probs.detach()
    entropy = sum(-float(p) * math.log(float(p)) for p in probs.flatten()) / (len(depths) * MAX_LEN)
    assert expl - base == pytest.approx(-entropy, rel=1e-5)

    deno, *_ = loss_with(lambda_deno=1.0)
    # Same seed -> same noise grid: rebuild it as the eager trajectory draws it.
    torch.manual_seed(4)
    model.controller(model.encoder.embed(batch["input_ids"]), batch["input_ids"])    # same RNG consumption
    packed = out["packed"]
    grid = torch.randn(len(depths), T_MAX + 1, MAX_LEN, HIDDEN)
    e0 = model.encoder.embed(batch["input_ids"]).detach()
    errors, count = 0.0, 0
    for p in range(packed.num_pairs):
        u, k = int(packed.pair_user[p]), int(packed.pair_level[p])
        if k == 0 or not packed.pair_active[p]:       # L_deno: active levels >= 1 only
            continue
        a, s = float(model.sqrt_abar[k]), float(model.sqrt_one_minus_abar[k])
        for i in range(MAX_LEN):
            if batch["input_ids"][u, i] == 0:
                continue
            noisy = a * e0[u, i] + s * grid[u, k, i]
            hidden = model.denoiser.fc1(noisy) + model.denoiser.step_table()[k]
            eps_hat = model.denoiser.fc2(F.gelu(hidden))
            errors += float((eps_hat - grid[u, k, i]).pow(2).mean().detach())
            count += 1
    assert deno - base == pytest.approx(errors / count, rel=1e-4)


def test_short_training_decreases_the_loss():
    model = make_model(seed=0).train()
    batch = batch_for()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    losses, rec = [], []
    for _ in range(30):
        loss, terms = model(batch)
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in terms.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        rec.append(float(terms["rec"]))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses
    assert sum(rec[-5:]) / 5 < sum(rec[:5]) / 5, rec


def test_eval_scores_are_deterministic_fp32_and_rank_by_a_hand_dot_product(monkeypatch):
    model = make_model(seed=1).eval()
    ids = batch_for()["input_ids"]
    torch.manual_seed(0)
    first = model.score(ids)
    torch.manual_seed(123)
    second = model.score(ids)
    assert first.shape == (5, NUM_ITEMS + 2) and first.dtype == torch.float32
    assert torch.equal(first, second)
    # Against a per-item loop over the last position of the hand-built depth-0 representation.
    patch_controller(monkeypatch, model, fixed_decision([0] * 5))
    scores = model.score(ids)
    with torch.no_grad():
        uid = ids[:1]
        e0 = model.encoder.embed(uid) * (uid > 0)[..., None]
        fin = model.encoder.encode(e0, uid)[0, -1]
        pool = e0[0, uid[0] > 0].mean(0)
        g = torch.sigmoid(model.router(torch.cat([pool, model.level_embedding.weight[0]])))[0]
        z_fin, z_coar = g * fin / (g + 1e-8), (1 - g) * model.coarse(pool) / ((1 - g) + 1e-8)
        gate = torch.sigmoid(model.final_gate(z_coar))
        h = gate * z_fin + (1 - gate) * z_coar
        table = model.encoder.item_embeddings.weight
        want = torch.tensor([sum(float(h[d]) * float(table[i, d]) for d in range(HIDDEN))
                             for i in range(table.shape[0])])
    torch.testing.assert_close(scores[0], want, rtol=1e-5, atol=1e-6)


def test_scores_are_fp32_for_a_bf16_model():
    """bf16 weights rank in fp32: no ties created by bf16 rounding of the scores."""
    model = make_model(seed=1).to(torch.bfloat16).eval()
    scores = model.score(batch_for()["input_ids"])
    assert scores.dtype == torch.float32
    h = model.user_representation(batch_for()["input_ids"])["h"][:, -1]
    want = h.double() @ model.encoder.item_embeddings.weight.double().t()
    torch.testing.assert_close(scores.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["zero", "fixed", "clean"])
def test_evaluation_trajectory_modes(mode):
    """zero: eps = 0; fixed: the same draw on every call and for every user; clean: every level
    is E^0 (the denoiser is not used)."""
    model = make_model(seed=2, eval_noise=mode).eval()
    ids = batch_for()["input_ids"]
    with torch.no_grad():
        first = model.score(ids)
        assert torch.equal(first, model.score(ids))
        before = model.score(ids)
        model.denoiser.fc2.bias.add_(1.0)
        after = model.score(ids)
    if mode == "clean":
        assert torch.equal(before, after)
    else:
        assert not torch.allclose(before, after)
    if mode == "fixed":
        # One draw per (level, position): two identical users get identical scores.
        twins = torch.stack([ids[0], ids[0]])
        with torch.no_grad():
            s = model.score(twins)
        assert torch.equal(s[0], s[1])
