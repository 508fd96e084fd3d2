"""ADARec (METHOD.md section 2): depth controller, coarse contrast, depth masking in the full
model, straight-through gradients, a short training run and deterministic scoring."""

import math

import pytest
import torch
import torch.nn.functional as F
from batches import synthetic_batch

from adarec.config import ModelConfig
from adarec.diffusion import pack_levels
from adarec.models import ADARec, build_model
from adarec.models.adarec import coarse_contrastive_loss
from adarec.models.controller import DepthController, DepthDecision
from adarec.models.encoder import masked_mean

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


def fixed_decision(depths, seed=0, level_masks=None):
    """A controller output with hard depths, probs that require grad and ST masks from them."""
    depths = torch.tensor(depths)
    gen = torch.Generator().manual_seed(seed)
    probs = F.softmax(torch.randn(depths.numel(), T_MAX + 1, generator=gen), -1).requires_grad_()
    survival = probs.flip(-1).cumsum(-1).flip(-1)
    if level_masks is None:
        level_masks = 1.0 + (survival - survival.detach())
    exploration = (probs * probs.log()).sum(-1).mean()
    return DepthDecision(depths, probs, level_masks, exploration)


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
    assert torch.equal(first.depths, logits.argmax(-1))
    assert torch.equal(first.depths, second.depths)
    assert torch.equal(first.probs, second.probs)
    assert first.depths.dtype == torch.int64
    probs = F.softmax(logits, -1)
    torch.testing.assert_close(first.probs, probs)
    entropy = -(probs * probs.log()).sum(-1)
    torch.testing.assert_close(first.exploration, -entropy.mean())
    assert float(first.exploration.detach()) < 0


def test_controller_training_draws_gumbel_softmax_and_hard_argmax():
    torch.manual_seed(0)
    ctrl = DepthController(HIDDEN, MAX_LEN, T_MAX, tau=0.5).train()
    ids = batch_for()["input_ids"]
    e0 = torch.randn(5, MAX_LEN, HIDDEN, generator=torch.Generator().manual_seed(1))
    dec = ctrl(e0, ids, generator=torch.Generator().manual_seed(9))
    logits = ctrl.logits(e0, ids)
    uniform = torch.rand(logits.shape, generator=torch.Generator().manual_seed(9)).clamp(1e-10, 1 - 1e-10)
    want = F.softmax((logits - torch.log(-torch.log(uniform))) / 0.5, -1)
    torch.testing.assert_close(dec.probs, want)
    assert torch.equal(dec.depths, want.argmax(-1))
    # A different draw gives different probabilities (training really is stochastic).
    other = ctrl(e0, ids, generator=torch.Generator().manual_seed(10))
    assert not torch.allclose(other.probs, dec.probs)


def test_controller_mask_jacobian_is_the_survival_function():
    torch.manual_seed(0)
    ctrl = DepthController(HIDDEN, MAX_LEN, T_MAX).train()
    ids = batch_for()["input_ids"]
    e0 = torch.randn(5, MAX_LEN, HIDDEN)
    dec = ctrl(e0, ids)
    torch.testing.assert_close(dec.level_masks, torch.ones_like(dec.level_masks), rtol=0, atol=2.5e-7)
    for k in range(T_MAX + 1):
        (grad,) = torch.autograd.grad(dec.level_masks[:, k].sum(), dec.probs, retain_graph=True)
        want = (torch.arange(T_MAX + 1) >= k).float().expand(5, -1)
        assert torch.equal(grad, want), f"d m_{k} / d p"


def test_controller_masks_are_exactly_one():
    torch.manual_seed(0)
    ctrl = DepthController(HIDDEN, MAX_LEN, T_MAX).train()
    ids = batch_for()["input_ids"]
    masks = torch.cat([ctrl(torch.randn(5, MAX_LEN, HIDDEN), ids).level_masks for _ in range(20)])
    assert torch.equal(masks, torch.ones_like(masks))


# ----------------------------------------------------------------------------- L_cont


def cont_ref(z, depths, temperature=0.07):
    """Loop over users and anchor levels k in [floor(T_u/2), T_u - 1]."""
    row = {}
    i = 0
    for u, t in enumerate(depths):
        for k in range(t + 1):
            row[u, k] = i
            i += 1
    losses = []
    for u, t in enumerate(depths):
        for k in range(t // 2, t):
            anchor = z[row[u, k]]
            cands = [u] + [v for v, tv in enumerate(depths) if v != u and tv >= k + 1]
            sims = torch.stack([F.cosine_similarity(anchor, z[row[v, k + 1]], dim=0) for v in cands]) / temperature
            losses.append(-(sims[0] - torch.logsumexp(sims, 0)))
    return torch.stack(losses).mean(), len(losses)


@pytest.mark.parametrize("depths", [[3, 1, 2, 0], [1, 2], [3, 3, 0, 2, 1]])
def test_coarse_contrastive_loss_matches_loop(depths):
    gen = torch.Generator().manual_seed(sum(depths))
    packed = pack_levels(torch.tensor(depths))
    z = torch.randn(packed.num_pairs, 5, generator=gen, dtype=torch.float64).requires_grad_()
    got = coarse_contrastive_loss(z, packed, torch.tensor(depths), T_MAX, 0.07)
    want, anchors = cont_ref(z, depths)
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


# ----------------------------------------------------------------------------- depth masking


def test_depth_zero_user_is_the_level_zero_path(monkeypatch):
    model = make_model().eval()
    ids = batch_for()["input_ids"]
    patch_controller(monkeypatch, model, fixed_decision([0, 2, 1, 3, 0]))
    with torch.no_grad():
        h = model.user_representation(ids)["h"]
        for u in (0, 4):                                # length 8 (no padding) and length 2
            uid = ids[u:u + 1]
            valid = (uid > 0)[..., None]
            e0 = model.encoder.embed(uid)
            e_hat0 = e0 * valid                         # padding positions are not part of the trajectory
            fin = model.encoder.encode(e_hat0, uid)
            pooled = masked_mean(e0, uid)
            coar = model.coarse(pooled)
            g = torch.sigmoid(model.router(torch.cat([pooled, model.level_embedding.weight[:1]], -1)))[0, 0]
            z_fin = g * fin / (g + 1e-8)
            z_coar = (1 - g) * coar / ((1 - g) + 1e-8)
            gate = torch.sigmoid(z_coar @ model.final_gate.weight.t() + model.final_gate.bias)
            want = gate[:, None] * z_fin + (1 - gate[:, None]) * z_coar[:, None]
            torch.testing.assert_close(h[u:u + 1], want)
            # On item positions the fine expert is the plain backbone on E^0.
            plain = model.encoder(uid) * g / (g + 1e-8)
            want_valid = gate[:, None] * plain + (1 - gate[:, None]) * z_coar[:, None]
            torch.testing.assert_close(h[u:u + 1][valid.expand_as(h[u:u + 1])],
                                       want_valid[valid.expand_as(want_valid)])


def test_only_levels_up_to_depth_are_built(monkeypatch):
    model = make_model().train()
    ids = batch_for()["input_ids"]
    depths = [0, 2, 1, 3, 0]
    patch_controller(monkeypatch, model, fixed_decision(depths))
    rows_encoded = []
    encode = model.encoder.encode
    monkeypatch.setattr(model.encoder, "encode", lambda x, i: rows_encoded.append(x.shape[0]) or encode(x, i))
    out = model.user_representation(ids)
    packed = out["packed"]
    for u, t in enumerate(depths):
        rows = slice(int(packed.offsets[u]), int(packed.offsets[u + 1]))
        assert packed.pair_user[rows].tolist() == [u] * (t + 1)
        assert packed.pair_level[rows].tolist() == list(range(t + 1))
    assert rows_encoded == [sum(depths) + len(depths)]            # P = 11 rows, not B * (T_max + 1) = 20
    assert out["coarse"].shape[0] == out["g"].shape[0] == 11


def test_user_outputs_ignore_levels_above_their_depth(monkeypatch):
    model = make_model().train()
    ids = batch_for()["input_ids"]
    depths = [0, 2, 1, 2, 1]                                        # max depth 2 < T_max = 3
    masks = torch.ones(5, T_MAX + 1, requires_grad=True)
    patch_controller(monkeypatch, model, fixed_decision(depths, level_masks=masks))
    sinusoid = model.denoiser.step_sinusoid.clone().requires_grad_()
    model.denoiser.step_sinusoid = sinusoid

    torch.manual_seed(5)                                            # same P -> same diffusion noise
    h = model.user_representation(ids)["h"]
    for u, t in enumerate(depths):
        g_masks, g_sin, g_lvl = torch.autograd.grad(h[u].sum(), [masks, sinusoid, model.level_embedding.weight],
                                                    retain_graph=True)
        assert torch.equal(g_masks[u, t + 1:], torch.zeros_like(g_masks[u, t + 1:])), f"user {u}"
        assert torch.equal(g_masks[torch.arange(5) != u], torch.zeros_like(g_masks[torch.arange(5) != u]))
        assert g_masks[u, : t + 1].abs().sum() > 0
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
    # Level 3 is above every depth: changing it changes nothing, and the full loss gives it no gradient.
    with torch.no_grad():
        sinusoid[3] -= 7.0
        model.level_embedding.weight[3] -= 7.0
    torch.manual_seed(5)
    assert torch.equal(model.user_representation(ids)["h"], h2)
    torch.manual_seed(5)
    loss, _ = model(batch_for())
    g_sin, g_lvl = torch.autograd.grad(loss, [sinusoid, model.level_embedding.weight])
    assert torch.equal(g_sin[3], torch.zeros_like(g_sin[3]))
    assert torch.equal(g_lvl[3], torch.zeros_like(g_lvl[3]))
    assert g_lvl[2].abs().sum() > 0


# ----------------------------------------------------------------------------- straight-through


def test_loss_gradient_reaches_controller_through_the_masks_only(monkeypatch):
    model = make_model(lambda_expl=0.0).train()   # no exploration term: the masks are the only path
    batch = batch_for()
    torch.manual_seed(3)
    loss, _ = model(batch)
    loss.backward()
    grad = model.controller.head.weight.grad
    assert grad is not None and grad.abs().sum() > 0, "no straight-through gradient to the controller"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    # Sensitivity: with detached masks the controller head gets nothing.
    model.zero_grad(set_to_none=True)
    forward = DepthController.forward

    def detached(self, e0, input_ids, generator=None):
        dec = forward(self, e0, input_ids, generator)
        return DepthDecision(dec.depths, dec.probs, dec.level_masks.detach(), dec.exploration)

    monkeypatch.setattr(DepthController, "forward", detached)
    torch.manual_seed(3)
    loss, _ = model(batch)
    loss.backward()
    grad = model.controller.head.weight.grad
    assert grad is None or float(grad.abs().sum()) == 0.0


def test_loss_is_the_weighted_sum_of_its_terms():
    model = make_model(lambda_deno=0.3, lambda_cont=0.2, lambda_expl=0.05, cf_weight=0.1,
                       intent_cf_weight=0.2, trade_off=0.5).train()
    torch.manual_seed(1)
    loss, terms = model(batch_for())
    assert set(terms) == {"rec", "deno", "cont", "expl", "cluster", "instance_cl", "intent_cl"}
    want = (terms["rec"] + 0.3 * terms["deno"] + 0.2 * terms["cont"] + 0.05 * terms["expl"]
            + 0.1 * terms["instance_cl"] + 0.2 * terms["intent_cl"] + 0.5 * terms["cluster"])
    torch.testing.assert_close(loss.detach(), want)
    assert float(terms["expl"]) < 0 and float(terms["deno"]) > 0


# ----------------------------------------------------------------------------- training / scoring


def test_short_training_decreases_the_loss_and_reports_stats():
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

    stats = model.pop_epoch_stats()
    fracs = [stats[f"depth_frac_{k}"] for k in range(T_MAX + 1)]
    assert all(0.0 <= f <= 1.0 for f in fracs) and sum(fracs) == pytest.approx(1.0)
    for k in range(T_MAX + 1):
        r = stats[f"router_g_{k}"]
        assert r is None or 0.0 < r < 1.0
        assert (r is None) == (sum(fracs[k:]) == 0.0)               # a level is seen iff some depth reaches it
    assert stats["router_g_0"] is not None
    assert 0.0 < stats["pairs_computed_frac"] <= 1.0
    # Pairs computed = sum_u (T_u + 1) out of B (T_max + 1).
    want = sum(f * (k + 1) for k, f in enumerate(fracs)) / (T_MAX + 1)
    assert stats["pairs_computed_frac"] == pytest.approx(want)
    assert model.pop_epoch_stats() == {}


def test_eval_scores_are_deterministic():
    model = make_model(seed=1).eval()
    ids = batch_for()["input_ids"]
    torch.manual_seed(0)
    first = model.score(ids)
    torch.manual_seed(123)
    second = model.score(ids)
    assert first.shape == (5, NUM_ITEMS + 2)
    assert torch.equal(first, second)
    assert torch.isfinite(first).all()
    # score is the last position of h against every embedding row.
    h = model.user_representation(ids)["h"][:, -1]
    torch.testing.assert_close(first, h.detach() @ model.encoder.item_embeddings.weight.t())
