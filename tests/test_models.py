"""SASRec / ELCRec building blocks against hand-written references."""

import math

import pytest
import torch
import torch.nn.functional as F
from batches import synthetic_batch

from adarec.config import ModelConfig
from adarec.models import ELCRec, SASRec, build_model
from adarec.models.encoder import attention_mask, masked_mean
from adarec.models.losses import cluster_loss, nt_xent


def small_cfg(**kw):
    base = {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "hidden_dropout": 0.0, "attn_dropout": 0.0,
                "num_intent_clusters": 4}
    base.update(kw)
    return ModelConfig(**base)


def batch_for(num_items=30, b=5, length=8, seed=0):
    return synthetic_batch(num_items, b, length, seed)


def test_attention_mask_is_causal_and_ignores_padding():
    ids = torch.tensor([[0, 0, 3, 4]])
    m = attention_mask(ids)[0, 0]
    assert m[3].tolist() == [False, False, True, True]
    assert m[2].tolist() == [False, False, True, False]
    # A row with no allowed key (padding left of every item) attends to itself only.
    assert m[0].tolist() == [True, False, False, False] and m[1].tolist() == [False, True, False, False]


def test_real_positions_do_not_depend_on_padding_content():
    torch.manual_seed(0)
    model = SASRec(small_cfg(), num_items=30, max_len=8).eval()
    batch = batch_for()
    out = model.encoder(batch["input_ids"])
    # Changing the embedding of the padding row must not change any real position's output.
    with torch.no_grad():
        model.encoder.item_embeddings.weight[0].add_(5.0)
    out2 = model.encoder(batch["input_ids"])
    real = batch["input_ids"] > 0
    torch.testing.assert_close(out[real], out2[real])
    # And a later item never influences an earlier position (causality).
    ids = batch["input_ids"].clone()
    ids[0, -1] = (ids[0, -1] % 30) + 1
    out3 = model.encoder(ids)
    torch.testing.assert_close(out[0, :-1], out3[0, :-1])


def test_bce_loss_matches_reference_formula():
    torch.manual_seed(0)
    model = SASRec(small_cfg(rec_loss="bce"), num_items=30, max_len=8).eval()
    batch = batch_for()
    loss, _ = model(batch)
    h = model.encoder(batch["input_ids"])
    emb = model.encoder.item_embeddings
    pos = torch.sigmoid((h * emb(batch["target_pos"])).sum(-1))
    neg = torch.sigmoid((h * emb(batch["target_neg"])).sum(-1))
    is_t = (batch["target_pos"] > 0).float()
    want = ((-torch.log(pos) - torch.log(1 - neg)) * is_t).sum() / is_t.sum()
    torch.testing.assert_close(loss, want)


def test_ce_loss_scores_items_only():
    """Full-softmax CE over items 1..N: a Python log-sum-exp per target position, and moving the
    padding and mask rows (which are not items) changes nothing."""
    torch.manual_seed(0)
    model = SASRec(small_cfg(rec_loss="ce"), num_items=30, max_len=8).eval()
    batch = batch_for()
    loss, _ = model(batch)
    h = model.encoder(batch["input_ids"]).detach()
    table = model.encoder.item_embeddings.weight.detach()
    total, count = 0.0, 0
    for b, i in (batch["target_pos"] > 0).nonzero().tolist():
        logits = [float(h[b, i] @ table[item]) for item in range(1, 31)]
        top = max(logits)
        lse = top + math.log(sum(math.exp(x - top) for x in logits))
        total += lse - logits[int(batch["target_pos"][b, i]) - 1]
        count += 1
    assert float(loss.detach()) == pytest.approx(total / count, rel=1e-5)
    # Moving the padding row (also the padding input, which real positions never read) and the
    # mask row leaves the loss as it was: neither is a candidate.
    with torch.no_grad():
        model.encoder.item_embeddings.weight[0] += 5.0
        model.encoder.item_embeddings.weight[31] += 5.0
        moved, _ = model(batch)
    assert float(moved) == pytest.approx(float(loss.detach()), rel=1e-6)


def test_score_is_last_position_against_every_row():
    """With the attention and feed-forward layers zeroed, a 1-layer encoder's last output is
    LayerNorm(item embedding + position embedding) of the newest item: the scores are checked
    against a per-row dot-product loop over that closed form."""
    model = SASRec(small_cfg(num_layers=1), num_items=30, max_len=8).eval()
    block = model.encoder.blocks[0]
    with torch.no_grad():
        for layer in (block.qkv, block.attn_out, block.ffn_in, block.ffn_out):
            layer.weight.zero_()
            layer.bias.zero_()
    ids = batch_for()["input_ids"]
    scores = model.score(ids)
    assert scores.shape == (5, 32) and scores.dtype == torch.float32
    enc = model.encoder
    with torch.no_grad():
        for u in range(5):
            x = enc.item_embeddings.weight[ids[u, -1]] + enc.position_embeddings.weight[7]
            # Input LayerNorm, then the block's two post-LNs of (x + 0).
            z = block.ffn_norm(block.attn_norm(enc.embed_norm(x)))
            want = [sum(float(z[d]) * float(enc.item_embeddings.weight[i, d]) for d in range(16)) for i in range(32)]
            torch.testing.assert_close(scores[u], torch.tensor(want), rtol=1e-5, atol=1e-5)
    assert model.never_rank == (0, 31)


def reference_nt_xent(a, b, t, groups=None):
    """Per-row loop version of ICLRec's NCELoss."""
    n = a.shape[0]
    reps = torch.cat([a, b])
    total = 0.0
    for i in range(2 * n):
        partner = i + n if i < n else i - n
        logits, target = [], None
        for j in range(2 * n):
            if j == i:
                continue
            same_group = groups is not None and groups[i % n] == groups[j % n]
            if j != partner and (j % n == i % n or same_group):
                continue
            if j == partner:
                target = len(logits)
            logits.append(float(reps[i] @ reps[j]) / t)
        m = max(logits)
        total += -(logits[target] - m - math.log(sum(math.exp(x - m) for x in logits)))
    return total / (2 * n)


@pytest.mark.parametrize("groups", [None, torch.tensor([0, 1, 0, 2, 1, 3])])
def test_nt_xent_matches_loop(groups):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    assert float(nt_xent(a, b, 0.5, groups)) == pytest.approx(reference_nt_xent(a, b, 0.5, groups), rel=1e-5)


def test_cluster_loss_matches_pairwise_distances():
    g = torch.Generator().manual_seed(4)
    x = F.normalize(torch.randn(7, 5, generator=g), dim=-1)
    c = F.normalize(torch.randn(4, 5, generator=g), dim=-1)
    d_xc = torch.cdist(x, c).pow(2).mean()
    d_cc = torch.cdist(c, c).pow(2).mean()
    want = d_xc - d_cc
    torch.testing.assert_close(cluster_loss(x, c), want, atol=1e-5, rtol=1e-5)


def test_masked_mean_ignores_padding():
    x = torch.arange(12.0).view(1, 4, 3)
    ids = torch.tensor([[0, 0, 5, 6]])
    torch.testing.assert_close(masked_mean(x, ids), x[0, 2:].mean(0, keepdim=True))


def reference_encode(encoder, ids):
    """The reference code's encoder: left-padded ids at the full width, an additive -10000 mask
    (causal, key is an item), under which a query with no item to attend to attends to every
    key uniformly."""
    ids = F.pad(ids, (encoder.max_len - ids.shape[1], 0))
    length = ids.shape[1]
    keep = torch.ones(length, length, dtype=torch.bool).tril()[None, None] & (ids > 0)[:, None, None, :]
    x = encoder.embed(ids)
    for block in encoder.blocks:
        x = block(x, (~keep).float() * -10000.0)
    return x


def test_elcrec_loss_terms_match_independent_references():
    """Each ELCRec term against a reference written outside the model: the cluster term from
    pairwise distances, both contrasts from the per-row NT-Xent loop, the rec term a hand BCE.
    As in the reference code (docs/method.md 2.5): the sequence representation is the mean over
    all L positions of the full-width outputs, padding outputs included, and the views are encoded
    at the full width and flattened whole."""
    torch.manual_seed(0)
    model = build_model(small_cfg(name="elcrec"), num_items=30, max_len=8)
    assert isinstance(model, ELCRec) and model.needs_views
    batch = batch_for()
    loss, terms = model(batch)
    assert set(terms) == {"rec", "cluster", "instance_cl", "intent_cl"}
    with torch.no_grad():
        full = reference_encode(model.encoder, batch["input_ids"])
        h = full[:, -batch["input_ids"].shape[1]:]
        centers = F.normalize(model.intent_centers, dim=-1)
        pooled = F.normalize(full.mean(1), dim=-1)
        cluster = torch.cdist(pooled, centers).pow(2).mean() - torch.cdist(centers, centers).pow(2).mean()
        views = reference_encode(model.encoder, torch.cat([batch["view1"], batch["view2"]]))
        n = batch["view1"].shape[0]
        flat = views.flatten(1)
        instance = reference_nt_xent(flat[:n], flat[n:], 1.0)
        intent = torch.cdist(pooled, centers).argmin(1)
        own, view_mean = centers[intent], views.mean(1)
        intent_cl = 0.5 * (reference_nt_xent(own, view_mean[:n], 1.0, intent)
                           + reference_nt_xent(own, view_mean[n:], 1.0, intent))
        emb = model.encoder.item_embeddings.weight
        pos = torch.sigmoid((h * emb[batch["target_pos"]]).sum(-1))
        neg = torch.sigmoid((h * emb[batch["target_neg"]]).sum(-1))
        is_t = (batch["target_pos"] > 0).float()
        rec = ((-torch.log(pos) - torch.log(1 - neg)) * is_t).sum() / is_t.sum()
    assert float(terms["cluster"]) == pytest.approx(float(cluster), rel=1e-4, abs=1e-6)
    assert float(terms["instance_cl"]) == pytest.approx(instance, rel=1e-4)
    assert float(terms["intent_cl"]) == pytest.approx(intent_cl, rel=1e-4)
    assert float(terms["rec"]) == pytest.approx(float(rec), rel=1e-5)
    want = float(rec) + 0.1 * instance + 0.1 * intent_cl + 1.0 * float(cluster)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-4)
    loss.backward()
    assert model.intent_centers.grad is not None and model.intent_centers.grad.abs().sum() > 0


def test_elcrec_kmeans_init_uses_faiss_on_training_inputs():
    from types import SimpleNamespace

    torch.manual_seed(0)
    model = build_model(small_cfg(name="elcrec"), num_items=30, max_len=8)
    split = SimpleNamespace(train_input=torch.cat([batch_for(seed=s)["input_ids"] for s in range(4)]))
    before = model.intent_centers.detach().clone()
    model.prepare(split, torch.device("cpu"), seed=0)
    after = model.intent_centers.detach()
    assert not torch.equal(before, after)
    torch.testing.assert_close(after.norm(dim=1), torch.ones(4), atol=1e-4, rtol=0)


def test_unknown_rec_loss_rejected():
    with pytest.raises(ValueError):
        SASRec(small_cfg(rec_loss="mse"), num_items=10, max_len=4)


@pytest.mark.parametrize("prototype", ["shift", "concat"])
def test_prototype_adds_or_appends_nearest_centre(prototype):
    torch.manual_seed(0)
    model = build_model(small_cfg(name="elcrec", prototype=prototype), num_items=30, max_len=8)
    out = torch.randn(3, 8, 16)
    centers = F.normalize(torch.randn(4, 16), dim=-1)
    got = model.with_prototypes(out, centers)
    nearest = centers[torch.cdist(out.reshape(-1, 16), centers).argmin(-1)].view(3, 8, 16)
    want = out + nearest if prototype == "shift" else torch.cat([out, nearest], -1)
    torch.testing.assert_close(got, want)
    loss, _ = model(batch_for())
    loss.backward()
    assert torch.isfinite(loss)
