"""Length-grouped, trimmed batches (adarec/data/length_groups.py; docs/method.md, "Trimmed batches").

A row's outputs must not depend on its batch's width: every model that trims computes the same
loss terms, the same outputs at item positions and the same scores on a batch trimmed to its
longest row as on the same batch padded to max_len (fp32, eager and fused paths), with its keyed
random numbers drawn by position from the right. The sampler's grouping is a pure function of
(seed, epoch), shared by data-parallel ranks, and evaluation metrics do not change with trimming.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from adarec.engine.data_setup import load_split
from adarec.engine.evaluator import evaluate_split

from adarec.config import load_config
from adarec.data import TrainBatchSampler
from adarec.data.length_groups import bucket_width, evaluation_batches, grouped_order, padding_fraction
from adarec.keyed_random import KeyedDraws, Streams, row_keys
from adarec.models import build_members, scorer

REPO = Path(__file__).resolve().parents[1]
BUCKETS = (4, 8, 12, 16, 24, 32, 40)
TRIMMING = ("sasrec", "elcrec", "adarec", "adarec-dual", "diffuasr")
NO_DROPOUT = ["model.hidden_dropout=0", "model.attn_dropout=0", "model.emb_dropout=0"]


# -- keyed draws aligned on the right ------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bits", "uniform32", "uniform64", "normal", "normal_odd"])
def test_aligned_draws_of_a_position_do_not_depend_on_the_width(kind):
    keys = torch.tensor([3, 2**40 + 7, 11], dtype=torch.int64)
    block = torch.tensor([0, 2, 1])
    per = 5 if kind == "normal_odd" else 6

    def draw(width):
        d = KeyedDraws(keys, Streams.DIFFUSION)
        d.bits((2,))                                          # an earlier call, as in a real forward
        args = {"block": block, "blocks": 3, "align_right": True}
        if kind == "bits":
            return d.bits((width, per), **args)
        if kind.startswith("uniform"):
            return d.uniform((width, per), torch.float64 if kind == "uniform64" else torch.float32, **args)
        return d.normal((width, per), **args)

    full = draw(50)
    for width in (1, 7, 32, 50):
        assert torch.equal(draw(width), full[:, -width:]), width
    # Another block draws other numbers.
    other = KeyedDraws(keys, Streams.DIFFUSION)
    other.bits((2,))
    assert not torch.equal(other.bits((50, per), block=block + 0 * block.roll(1), blocks=3, align_right=True)[0],
                           other.bits((50, per), block=(block + 1) % 3, blocks=3, align_right=True)[0])


def test_aligned_normals_are_standard_normal():
    keys = torch.from_numpy(row_keys(1, 0, np.arange(2000)))           # well-mixed keys, as training's
    z = KeyedDraws(keys, Streams.DIFFUSION).normal((20, 7), align_right=True)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01


# -- grouping and widths --------------------------------------------------------------------------

def test_bucket_width_rounds_up_and_caps_at_max_len():
    assert [bucket_width(n, (8, 16, 32), 50) for n in (0, 1, 8, 9, 16, 33, 50)] == [8, 8, 8, 16, 16, 50, 50]
    assert bucket_width(5, None, 50) == 50 and bucket_width(5, (64,), 50) == 50


def test_grouped_order_is_a_permutation_of_similar_length_batches():
    rng = np.random.default_rng(0)
    lengths = rng.geometric(0.15, size=1000).clip(max=50)
    perm = rng.permutation(1000)
    order = grouped_order(perm, lengths, 32, 5, np.random.default_rng(1))
    assert sorted(order.tolist()) == list(range(1000))
    batches = [order[i:i + 32] for i in range(0, 1000, 32)]
    assert len(batches[-1]) == 1000 % 32 and set(batches[-1]) <= set(perm[-(5 * 32 * 0 + 200):].tolist())
    grouped = np.mean([lengths[b].max() for b in batches])
    plain = np.mean([lengths[perm[i:i + 32]].max() for i in range(0, 1000, 32)])
    assert grouped < 0.6 * plain
    assert np.array_equal(order, grouped_order(perm, lengths, 32, 5, np.random.default_rng(1)))
    assert not np.array_equal(order, grouped_order(perm, lengths, 32, 5, np.random.default_rng(2)))


def test_evaluation_batches_sort_by_length_and_trim():
    lengths = np.array([3, 50, 1, 9, 8, 17])
    batches = evaluation_batches(lengths, 2, (8, 16, 32), 50)
    assert [(b.tolist(), w) for b, w in batches] == [([2, 0], 8), ([4, 3], 16), ([5, 1], 50)]
    assert [(b.tolist(), w) for b, w in evaluation_batches(lengths, 4, None, 50)] == [([0, 1, 2, 3], 50),
                                                                                      ([4, 5], 50)]
    assert padding_fraction(lengths, batches) == pytest.approx(1 - 88 / (2 * 8 + 2 * 16 + 2 * 50))


@pytest.fixture(scope="module")
def beauty():
    cfg = load_config(REPO / "configs/elcrec_beauty.yaml", ["data.max_users=400", "data.max_len=40"])
    return cfg, load_split(cfg, torch.device("cpu"))


def test_sampler_batches_are_the_untrimmed_batches_cut_to_their_bucket(beauty):
    _, split = beauty
    full = list(TrainBatchSampler(split, 16, seed=3, with_views=True, group_by_length=True).epoch(2))
    cut = list(TrainBatchSampler(split, 16, seed=3, with_views=True, group_by_length=True,
                                 width_buckets=BUCKETS).epoch(2))
    widths = set()
    for a, b in zip(full, cut, strict=True):
        width = b["input_ids"].shape[1]
        widths.add(width)
        assert width == bucket_width(int((a["input_ids"] > 0).sum(1).max()), BUCKETS, 40)
        assert not a["input_ids"][:, :-width].any()                       # only padding was cut
        for key in ("input_ids", "target_pos", "target_neg", "view1", "view2"):
            assert torch.equal(b[key], a[key][:, -width:]), key
        assert torch.equal(b["row_key"], a["row_key"])
    assert len(widths) >= 3


def test_grouped_batches_are_reproducible_and_shared_by_ranks(beauty):
    _, split = beauty
    one = list(TrainBatchSampler(split, 16, seed=3, group_by_length=True, width_buckets=BUCKETS).epoch(1))
    again = list(TrainBatchSampler(split, 16, seed=3, group_by_length=True, width_buckets=BUCKETS).epoch(1))
    ranks = [list(TrainBatchSampler(split, 16, seed=3, rank=r, world_size=2, group_by_length=True,
                                    width_buckets=BUCKETS).epoch(1)) for r in range(2)]
    for i, batch in enumerate(one):
        assert torch.equal(batch["user"], again[i]["user"])
        # The two ranks' parts are the one-rank batch, at its width.
        users = torch.cat([ranks[0][i]["user"], ranks[1][i]["user"]])
        assert sorted(users.tolist()) == sorted(batch["user"].tolist())
        assert ranks[0][i]["input_ids"].shape[1] == ranks[1][i]["input_ids"].shape[1] == batch["input_ids"].shape[1]
    plain = list(TrainBatchSampler(split, 16, seed=3).epoch(1))
    grouped_users = torch.cat([b["user"] for b in one]).tolist()
    assert sorted(grouped_users) == sorted(torch.cat([b["user"] for b in plain]).tolist())


# -- every model: the same numbers on a trimmed batch ------------------------------------------------

def build(name, split, backend="eager", *extra):
    overrides = ["model.hidden_size=16", "model.num_layers=1", "model.num_intent_clusters=4", "model.max_depth=3",
                 "model.prefix_items=3", "model.denoiser_channels=4", "model.diffusion_steps=20",
                 "model.sample_steps=2", *NO_DROPOUT, *extra]
    cfg = load_config(REPO / f"configs/{name}_beauty.yaml", ["data.max_users=400", "data.max_len=40", *overrides])
    torch.manual_seed(0)
    return build_members(cfg.model, split.num_items, split.max_len, backend)


def batch_pairs(split, with_views, count=4):
    """(full, trimmed) training batches: the same rows, keys and draws, one padded to max_len."""
    full = TrainBatchSampler(split, 12, seed=5, with_views=with_views, group_by_length=True).epoch(0)
    cut = TrainBatchSampler(split, 12, seed=5, with_views=with_views, group_by_length=True,
                            width_buckets=BUCKETS).epoch(0)
    pairs = [(a, b) for a, b in zip(full, cut, strict=True) if b["input_ids"].shape[1] < 40]
    return pairs[:count]


def assert_terms_equal(members, pairs):
    for full, cut in pairs:
        for name, net in members.items():
            net.train()
            _, terms_full = net(full)
            _, terms_cut = net(cut)
            assert terms_full.keys() == terms_cut.keys()
            for key in terms_full:
                torch.testing.assert_close(terms_cut[key], terms_full[key], rtol=2e-5, atol=2e-6,
                                           msg=lambda m, name=name, key=key: f"{name} {key}: {m}")


@pytest.mark.parametrize("name", [*TRIMMING, "adarec-reference-pooling"])
def test_training_terms_do_not_depend_on_the_batch_width(beauty, name):
    _, split = beauty
    members = (build("adarec", split, "eager", "model.elcrec_pooling=reference") if name.endswith("-pooling")
               else build(name, split))
    assert all(getattr(net, "trims_batches", True) for net in members.values())
    assert_terms_equal(members, batch_pairs(split, any(n.needs_views for n in members.values())))


def test_elcrec_views_are_encoded_as_the_reference_encodes_them(beauty):
    """ELCRec's views (docs/method.md 2.5): full width, and the reference's additive -10000 mask,
    under which a padding query with no earlier item attends to every key uniformly. Rebuilt here
    by hand, the additive mask gives the encoder's outputs; the default mask does not (padding
    queries attend to themselves), and the two agree at item positions."""
    _, split = beauty
    net = next(iter(build("elcrec", split).values())).eval()
    views = next(iter(batch_pairs(split, True, count=1)))[1]["view1"]
    full = torch.nn.functional.pad(views, (split.max_len - views.shape[1], 0))
    encoder = net.encoder
    length = full.shape[1]
    keep = torch.ones(length, length, dtype=torch.bool).tril()[None, None] & (full > 0)[:, None, None, :]
    additive = (~keep).float() * -10000.0
    x = encoder.embed(full)
    for block in encoder.blocks:
        x = block(x, additive)
    torch.testing.assert_close(encoder(full, reference_padding=True), x, rtol=1e-5, atol=1e-5)
    default = encoder(full)
    items = (full > 0).unsqueeze(-1)
    torch.testing.assert_close(torch.where(items, default, 0.0), torch.where(items, x, 0.0), rtol=1e-5, atol=1e-5)
    padding = (full == 0)
    assert padding.any() and not torch.allclose(default[padding], x[padding], atol=1e-3)


@pytest.mark.parametrize("ablate", ["[]", "[hpmoe]", "[router]", "[adc]", "[hda]"])
def test_adarec_elcrec_representation_is_the_reference_full_width_mean(beauty, monkeypatch, ablate):
    """ADARec's reference ELCRec representation (model.elcrec_pooling=reference, ADARec.reference_mean)
    from a trimmed batch equals the mean
    over all max_len positions of h computed at the full width with the reference's padding
    attention in the fine expert (a padding query attends to every key), as before trimming."""
    _, split = beauty
    (net,) = build("adarec", split, "eager", f"model.ablate={ablate}", "model.elcrec_pooling=reference").values()
    net.train()
    for full, cut in batch_pairs(split, True, count=2):
        out = net.user_representation(cut["input_ids"], row_keys=cut["row_key"])
        trimmed = net.reference_mean(out, cut["input_ids"])
        encode = net.encoder.encode
        with monkeypatch.context() as patch:
            patch.setattr(net.encoder, "encode",
                          lambda x, ids, reference_padding=False, encode=encode: encode(x, ids, True))
            h = net.user_representation(full["input_ids"], row_keys=full["row_key"])["h"]
        assert full["input_ids"].shape[1] == split.max_len and (full["input_ids"] == 0).any()
        torch.testing.assert_close(trimmed, h.float().mean(1), rtol=2e-5, atol=2e-6)
        # Not the item-position mean: the padding outputs weigh in.
        items = (cut["input_ids"] > 0).unsqueeze(-1)
        item_mean = (out["h"] * items).sum(1) / items.sum(1)
        assert not torch.allclose(trimmed, item_mean, atol=1e-3)


@pytest.mark.parametrize("pooling", ["items", "reference"])
def test_adarec_kmeans_clusters_the_representation_training_pools(beauty, pooling):
    """The intent centres' k-means (prepare) clusters what the ELCRec terms will read: the
    backbone's item-position mean under items, its full-width reference mean under reference."""
    _, split = beauty
    (net,) = build("adarec", split, "eager", f"model.elcrec_pooling={pooling}").values()
    net.eval()
    ids = split.train_input[:16]
    with torch.no_grad():
        got = net.initial_representation(ids)
        items = (ids > 0).unsqueeze(-1)
        expected = ((net.encoder(ids) * items).sum(1) / items.sum(1) if pooling == "items"
                    else net.encoder(torch.nn.functional.pad(ids, (split.max_len - ids.shape[1], 0)),
                                     reference_padding=True).mean(1))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_dual_expert_representation_is_the_reference_full_width_mean(beauty):
    _, split = beauty
    members = build("adarec-dual", split)
    full, cut = batch_pairs(split, True, count=1)[0]
    for net in members.values():
        net.train()
        rep = net.paths(cut["input_ids"], cut["row_key"])["representation"]
        expected = net.encoder(full["input_ids"], reference_padding=True).mean(1)
        torch.testing.assert_close(rep, expected, rtol=2e-5, atol=2e-6)


def test_adarec_fused_trajectory_terms_and_outputs_do_not_depend_on_the_width(beauty):
    _, split = beauty
    (net,) = build("adarec", split, "fused").values()
    pairs = batch_pairs(split, True, count=2)
    assert_terms_equal({"model": net}, pairs)
    for full, cut in pairs:
        width = cut["input_ids"].shape[1]
        out_full = net.user_representation(full["input_ids"], row_keys=full["row_key"])
        out_cut = net.user_representation(cut["input_ids"], row_keys=cut["row_key"])
        items = cut["input_ids"] > 0
        torch.testing.assert_close(out_cut["h"][items], out_full["h"][:, -width:][items], rtol=2e-5, atol=2e-6)


def test_sasrec_and_adarec_outputs_at_item_positions(beauty):
    _, split = beauty
    for name in ("sasrec", "adarec"):
        (net,) = build(name, split).values()
        net.train()
        for full, cut in batch_pairs(split, True, count=2):
            width = cut["input_ids"].shape[1]
            items = cut["input_ids"] > 0
            if name == "sasrec":
                a, b = net.encoder(full["input_ids"]), net.encoder(cut["input_ids"])
            else:
                a = net.user_representation(full["input_ids"], row_keys=full["row_key"])["h"]
                b = net.user_representation(cut["input_ids"], row_keys=cut["row_key"])["h"]
            torch.testing.assert_close(b[items], a[:, -width:][items], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name", [*TRIMMING, "diffurec", "adrec"])
def test_scores_do_not_depend_on_the_batch_width(beauty, name):
    _, split = beauty
    model = scorer(build(name, split))
    model.eval()
    view = getattr(model, "eval_view", None)
    inputs = view(split, "valid")[0] if view is not None else split.valid_input
    inputs = inputs[(inputs > 0).sum(1) <= 20][:64]
    width = bucket_width(int((inputs > 0).sum(1).max()), BUCKETS, inputs.shape[1])
    if not getattr(model, "trims_batches", True):
        # DiffuRec and ADRec attend to the padding (their public code), so they are never trimmed.
        assert name in ("diffurec", "adrec")
        return
    assert width < inputs.shape[1]
    torch.testing.assert_close(model.user_query(inputs[:, -width:]), model.user_query(inputs), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name", ["diffurec", "adrec"])
def test_models_that_read_padding_get_full_width_batches(tmp_path, name):
    from adarec.profiling import opcount

    trainer = opcount._build_trainer(str(REPO / f"configs/{name}_beauty.yaml"),
                                     ["data.max_users=60", "model.hidden_size=16", "train.batch_size=16",
                                      "model.pretrain_epochs=0"], tmp_path)
    assert trainer.width_buckets is None and not trainer.sampler.group_by_length
    assert {b["input_ids"].shape[1] for b in trainer.sampler.epoch(0)} == {trainer.split.max_len}


@pytest.mark.parametrize("name", ["sasrec", "adarec"])
def test_evaluation_metrics_on_beauty_do_not_change_with_trimming(name):
    cfg = load_config(REPO / f"configs/{name}_beauty.yaml", ["data.max_users=1500"])
    split = load_split(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    model = scorer(build_members(cfg.model, split.num_items, split.max_len, "eager"))
    ks = (5, 10, 20, 100)
    plain = evaluate_split(model, split, "valid", ks, batch_size=256)
    trimmed = evaluate_split(model, split, "valid", ks, batch_size=256, width_buckets=[8, 16, 32])
    for key, value in plain.items():
        assert trimmed[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert plain["HR@100"] > 0


def test_evaluation_keys_do_not_depend_on_the_padding_width():
    from adarec.keyed_random import sequence_keys

    ids = torch.tensor([[0, 0, 4, 9, 2], [0, 7, 7, 1, 3], [0, 0, 0, 0, 8]])
    wider = torch.cat([torch.zeros(3, 6, dtype=torch.long), ids], dim=1)
    assert torch.equal(sequence_keys(wider, 5), sequence_keys(ids, 5))
    assert torch.equal(sequence_keys(ids[:, 1:], 5)[[0, 2]], sequence_keys(ids, 5)[[0, 2]])
    assert sequence_keys(ids[:, 2:], 5)[1] != sequence_keys(ids, 5)[1]      # an item cut: another key


def test_target_shares_make_grouped_batch_means_add_up_to_the_epoch_mean(beauty):
    """Per-batch means of a per-target value, scaled by the batches' target shares and averaged
    over the epoch's batches, are the mean over all the epoch's targets (what random batches
    estimate); without the shares, short rows' targets would weigh far more."""
    _, split = beauty
    sampler = TrainBatchSampler(split, 16, seed=3, group_by_length=True, width_buckets=BUCKETS)
    batches = list(sampler.epoch(0))
    values = [b["target_pos"][b["target_pos"] > 0].double() for b in batches]     # any per-target value
    scaled = sum(float(b["target_share"]) * float(v.mean()) for b, v in zip(batches, values, strict=True))
    want = float(torch.cat(values).mean())
    assert scaled / len(batches) == pytest.approx(want, rel=1e-6)
    unscaled = sum(float(v.mean()) for v in values) / len(batches)
    assert abs(unscaled - want) > 1e-3 * want                         # the shares do change something
    assert "target_share" not in next(iter(TrainBatchSampler(split, 16, seed=3).epoch(0)))
