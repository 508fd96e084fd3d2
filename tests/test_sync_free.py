"""No host sync inside a training step or an evaluation batch (docs/method.md, "The training step
on a GPU"), checked on a CPU profile of the real Trainer step; and the launch counter itself
(profiling/opcount.py) against ops whose behaviour is known."""

from pathlib import Path

import pytest
import torch
from adarec.profiling import opcount

from adarec import backends

REPO = Path(__file__).resolve().parents[1]
# model.level_layout=grid is the layout a GPU runs (auto picks compact on the CPU, where a host
# read is free); _build_trainer sets it too, spelled out here because these tests depend on it.
TINY = ["data.max_users=120", "model.hidden_size=16", "model.num_layers=1", "model.num_intent_clusters=4",
        "model.max_depth=3", "train.batch_size=32", "eval.batch_size=32", "model.level_layout=grid"]


# -- the counter ---------------------------------------------------------------------------------
def test_counter_flags_each_kind_of_host_sync():
    x = torch.randn(64)
    repeats = torch.randint(0, 3, (8,))
    cases = {
        "aten::_local_scalar_dense": lambda: x.sum().item(),
        "aten::nonzero": lambda: x[x > 0],
        "aten::masked_select": lambda: torch.masked_select(x, x > 0),
        "repeat_interleave": lambda: torch.repeat_interleave(torch.arange(8), repeats),
    }
    for name, fn in cases.items():
        counted = opcount.count_ops(fn)
        assert counted.syncs >= 1, (name, counted.sync_ops)
        assert name in " ".join(counted.sync_ops), counted.sync_ops


def test_counter_passes_sync_free_twins():
    """The same work without a host read: a static-size repeat, a masked where, a device-side
    assertion (a kernel on a GPU; the CPU's scalar read inside it is not counted), whereas a
    host-side check of the same condition is a sync."""
    x = torch.randn(64)
    repeats = torch.full((8,), 2)
    for fn in (lambda: torch.repeat_interleave(torch.arange(8), repeats, output_size=16),
               lambda: torch.where(x > 0, x, 0.0).sum(),
               lambda: torch.repeat_interleave(torch.arange(8), 2),
               lambda: torch._assert_async((x > -100).all())):
        assert opcount.count_ops(fn).syncs == 0
    assert opcount.count_ops(lambda: bool((x > -100).all())).syncs == 1


def test_counter_counts_leaf_launches_and_skips_views():
    """exp, add and the in-place mul are three kernels; view/transpose/unsqueeze launch nothing.
    (On the CPU the scalar operands of add and mul_ go through a copy_, which is then the leaf
    that is counted: the total is what a GPU launches, the names need not be.)"""
    x = torch.randn(4, 6)

    def fn():
        y = x.view(6, 4).t().unsqueeze(0)
        z = torch.exp(y) + 1.0
        z.mul_(2.0)

    counted = opcount.count_ops(fn)
    assert counted.launches == 3, counted.leaf_ops
    assert counted.leaf_ops["aten::exp"] == 1 and not set(counted.leaf_ops) & opcount.NO_LAUNCH


def test_counter_counts_an_rnn_call_and_its_backward_as_one_launch_each():
    gru = torch.nn.GRU(4, 4, batch_first=True)
    x = torch.randn(2, 7, 4)
    forward_only = opcount.count_ops(lambda: gru(x))
    assert forward_only.leaf_ops["aten::gru"] == 1
    assert forward_only.launches <= 3          # the GRU and the zero initial state

    def train(inputs):
        gru.zero_grad(set_to_none=True)
        out, _ = gru(inputs)
        out.sum().backward()

    with_backward = opcount.count_ops(lambda: train(x))
    # One launch for the GRU's whole backward, whatever its length: the unrolled CPU backward
    # of 7 or 21 steps would be dozens of ops.
    longer_input = torch.randn(2, 21, 4)
    longer = opcount.count_ops(lambda: train(longer_input))
    assert with_backward.launches == longer.launches
    assert with_backward.launches < 15


def test_counter_counts_the_optimizer_range_once_and_ignores_its_syncs():
    w = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.Adam([w], foreach=False)
    w.grad = torch.randn(3)

    def step():
        with opcount.optimizer_range():
            opt.step()
            w.detach().sum().item()          # a sync inside the optimizer's range is its own business

    counted = opcount.count_ops(step)
    assert counted.launches == 1 and counted.syncs == 0


# -- the models ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trainers(tmp_path_factory):
    built = {}
    for model in ("adarec", "adarec-dual", "elcrec", "sasrec"):
        overrides = [*TINY, "model.kmeans_init=false"] if model != "sasrec" else [*TINY[:3], *TINY[5:]]
        config = REPO / f"configs/{model}_beauty.yaml"
        built[model] = opcount._build_trainer(str(config), overrides, tmp_path_factory.mktemp(model))
    return built


@pytest.mark.parametrize("model", ["adarec", "adarec-dual", "elcrec", "sasrec"])
def test_training_step_and_evaluation_batch_do_not_sync(trainers, model):
    counts = opcount.profile_trainer(trainers[model])
    for phase, counted in counts.items():
        assert counted.syncs == 0, f"{model} {phase}: {dict(counted.sync_ops)}"
        assert counted.launches > 20, f"{model} {phase}: the profile recorded nothing"


@pytest.mark.parametrize("backend", ["eager", "fused"])
def test_autocast_bf16_step_does_not_sync(tmp_path, backend):
    """train.bf16_mode=autocast (the sync-free bf16 of one GPU): DeepSpeed in fp32, autocast
    around the forward, on the eager ops and on the fused ones (the Triton trajectory under the
    interpreter takes fp32 inputs from autocast's mixed ones); nothing is read on the host."""
    trainer = opcount._build_trainer(str(REPO / "configs/adarec_beauty.yaml"),
                                     [*TINY, "model.kmeans_init=false", "train.precision=bf16",
                                      "train.bf16_mode=autocast", f"kernels.backend={backend}",
                                      "train.batch_size=8", "data.max_len=12"], tmp_path)
    assert trainer.autocast_dtype == torch.bfloat16 and not trainer.ds_config["bf16"]["enabled"]
    counts = opcount.profile_trainer(trainer)
    assert counts["training step"].syncs == 0, dict(counts["training step"].sync_ops)
    loss = trainer.train_step(next(iter(trainer.sampler.epoch(1))))["loss"]
    assert torch.isfinite(loss)


def test_bf16_mode_auto_is_autocast_on_one_rank_at_stage_0_and_deepspeed_otherwise():
    from adarec.engine.ds_config import use_autocast

    from adarec.config import load_config

    cfg = load_config(REPO / "configs/adarec_beauty.yaml")
    assert cfg.train.bf16_mode == "auto"
    assert use_autocast(cfg.train, 1, 0) and not use_autocast(cfg.train, 2, 0) and not use_autocast(cfg.train, 1, 1)
    pinned = load_config(REPO / "configs/adarec_beauty.yaml", ["train.bf16_mode=deepspeed"])
    assert not use_autocast(pinned.train, 1, 0)
    graphs = load_config(REPO / "configs/adarec_beauty.yaml", ["train.bf16_mode=deepspeed", "train.cuda_graphs=true"])
    assert use_autocast(graphs.train, 1, 0)


def test_the_sync_test_would_catch_a_boolean_selection_in_the_loss(trainers, monkeypatch):
    """Put back the old boolean-selection cross-entropy: the step's profile must show its syncs."""
    import adarec.models.sasrec as sasrec

    def selecting_ce(hidden, item_weight, target_pos, target_rows=None, item_ce=None):
        valid = target_pos > 0
        logits = hidden[valid] @ item_weight[1:-1].t()
        return torch.nn.functional.cross_entropy(logits.float(), target_pos[valid] - 1)

    monkeypatch.setattr(sasrec, "ce_next_item_loss", selecting_ce)
    counts = opcount.profile_trainer(trainers["sasrec"])
    assert counts["training step"].syncs >= 2
    assert counts["evaluation batch"].syncs == 0


@pytest.mark.parametrize("ce", ["chunked", "fused"])
def test_large_catalog_cross_entropy_step_does_not_sync(tmp_path, ce):
    """SASRec with full-softmax CE through the chunked PyTorch CE (items in chunks of 1000) and
    through the Triton kernels (interpreter): neither reads anything on the host."""
    setting = "kernels.ce_item_chunk=1000" if ce == "chunked" else "kernels.backend=fused"
    trainer = opcount._build_trainer(str(REPO / "configs/sasrec_beauty.yaml"),
                                     [*TINY[:3], *TINY[5:], "model.rec_loss=ce", setting], tmp_path)
    model = trainer.engines["model"].module
    chosen = backends.linear_ce_function(model.item_ce.backend, torch.device("cpu"), trainer.split.num_items,
                                         model.item_ce.item_chunk, 16)
    assert chosen.__name__ == f"{ce}_linear_cross_entropy"
    counted = opcount.profile_trainer(trainer)["training step"]
    assert counted.syncs == 0, dict(counted.sync_ops)
    assert counted.launches > 20


# -- the peers (docs/peers.md): their training steps and reverse processes ----------------------
PEER_TINY = {
    "diffurec": ["model.sample_steps=4"],
    "adrec": ["model.diffusion_steps=4", "model.sample_steps=4", "model.pretrain_epochs=0", "train.grad_merge=sum"],
    "adrec-pcgrad": ["model.diffusion_steps=4", "model.sample_steps=4", "model.pretrain_epochs=0"],
    "diffuasr": ["model.sample_steps=3"],
}


@pytest.mark.parametrize("peer", sorted(PEER_TINY))
def test_peer_training_step_and_reverse_process_do_not_sync(tmp_path, peer):
    model = peer.split("-")[0]
    overrides = ["data.max_users=120", "model.hidden_size=16", "model.num_layers=1", "train.batch_size=32",
                 "eval.batch_size=32", *PEER_TINY[peer]]
    trainer = opcount._build_trainer(str(REPO / f"configs/{model}_beauty.yaml"), overrides, tmp_path)
    assert trainer.cfg.train.grad_merge == ("pcgrad" if peer == "adrec-pcgrad" else "sum")
    counts = opcount.profile_trainer(trainer)
    for phase, counted in counts.items():
        assert counted.syncs == 0, f"{peer} {phase}: {dict(counted.sync_ops)}"
        assert counted.launches > 20, f"{peer} {phase}: the profile recorded nothing"
