"""train.cuda_graphs (engine/graphed_step.py): the static-buffer step against the DeepSpeed step
on the CPU (capture=False runs the same code eagerly), the settings it refuses, and on a GPU the
captured graphs against eager steps."""

from pathlib import Path

import pytest
import torch
from adarec.engine.graphed_step import GRAD_NORMS, GraphedStep, check_graph_config
from adarec.profiling import opcount

from adarec.config import load_config
from adarec.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.max_users=120", "model.hidden_size=16", "model.num_layers=1", "model.num_intent_clusters=4",
        "model.max_depth=3", "train.batch_size=32", "eval.batch_size=32", "model.kmeans_init=false"]


def _parameters(trainer):
    return {n: p.detach().clone() for name, e in trainer.engines.items() for n, p in e.module.named_parameters()}


@pytest.mark.parametrize("model", ["adarec", "adarec-dual"])
def test_static_buffer_step_matches_the_deepspeed_step(tmp_path, model):
    """Two identical trainers; one steps through DeepSpeed, the other through GraphedStep's
    static input buffers (copied into, shapes bucketed): same losses and weights after steps
    over batches of two different shapes (the last batch of the epoch is smaller)."""
    config = str(REPO / f"configs/{model}_beauty.yaml")
    reference = opcount._build_trainer(config, TINY, tmp_path / "a")
    graphed = opcount._build_trainer(config, TINY, tmp_path / "b")
    steps = {name: GraphedStep(e.module, e.optimizer, capture=False) for name, e in graphed.engines.items()}
    for engine in (*reference.engines.values(), *graphed.engines.values()):
        engine.train()
    batches = list(reference.sampler.epoch(0))
    shapes = {GraphedStep.bucket_key(b) for b in batches}
    assert len(shapes) >= 2
    for i, batch in enumerate(batches):
        torch.manual_seed(i)                 # dropout, Gumbel and noise draws alike on both sides
        want = reference.train_step(batch)
        torch.manual_seed(i)
        for name, step in steps.items():
            got = step(batch)
            prefix = "" if len(steps) == 1 else f"{name}/"
            for key, value in got.items():
                if key == GRAD_NORMS:           # for the trainer's non-finite watch, one per parameter
                    assert value.shape == (len(step.grad_names),) and torch.isfinite(value).all()
                    continue
                torch.testing.assert_close(value, want[prefix + key], rtol=1e-6, atol=1e-7)
    assert {len(step.buckets) for step in steps.values()} == {len(shapes)}
    ref_params, got_params = _parameters(reference), _parameters(graphed)
    for name, value in ref_params.items():
        torch.testing.assert_close(got_params[name], value, rtol=1e-5, atol=1e-6)


def test_snapshot_and_restore_undo_a_step_in_place():
    """What capture relies on after its warm-up steps: the parameters (the same Parameter objects,
    so a graph's pointers stay valid) get their values back, and optimizer state the steps
    created goes back to zero."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.GELU(), torch.nn.Linear(3, 1))
    optimizer = torch.optim.Adam(module.parameters(), lr=0.1)
    step = GraphedStep(module, optimizer, capture=False)
    before = [p.detach().clone() for p in module.parameters()]
    objects = [id(p) for p in module.parameters()]
    saved = step.snapshot()
    module(torch.randn(8, 4)).sum().backward()
    optimizer.step()
    assert not all(torch.equal(p, b) for p, b in zip(module.parameters(), before, strict=True))
    state = [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    assert state and any(bool(v.abs().sum()) for v in state)
    step.restore(saved)
    assert [id(p) for p in module.parameters()] == objects
    for p, b in zip(module.parameters(), before, strict=True):
        assert torch.equal(p, b)
    assert all(not bool(v.abs().sum()) for v in state)


def test_graph_settings_are_refused_with_the_reason():
    cfg = load_config(REPO / "configs/adarec_beauty.yaml", ["train.cuda_graphs=true"])
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        check_graph_config(cfg.train, torch.device("cpu"), 1)
    with pytest.raises(ConfigError, match="one GPU"):
        check_graph_config(cfg.train, torch.device("cuda"), 2)
    cfg = load_config(REPO / "configs/adarec_beauty.yaml", ["train.cuda_graphs=true", "train.zero_stage=1"])
    with pytest.raises(ConfigError, match="zero_stage=0"):
        check_graph_config(cfg.train, torch.device("cuda"), 1)
    cfg = load_config(REPO / "configs/adarec_beauty.yaml", ["train.cuda_graphs=true", "model.level_layout=compact"])
    with pytest.raises(ConfigError, match="level_layout"):
        check_graph_config(cfg.train, torch.device("cuda"), 1, cfg.model)
    with pytest.raises(ConfigError, match="turns on bf16"):
        check_graph_config(cfg.train, torch.device("cuda"), 1, None, {"bf16": {"enabled": True}})


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["adarec", "adarec-dual"])
def test_captured_steps_match_eager_steps_on_the_gpu(tmp_path, model):
    """Replayed graphs against the same static-buffer step run eagerly, fp32, the batch shapes of
    an epoch: the same losses (capture restores the random stream its warm-up used, so the first
    replay draws what the eager step draws)."""
    config = str(REPO / f"configs/{model}_beauty.yaml")
    overrides = [*TINY, "train.device=cuda", "train.precision=fp32", "kernels.backend=fused",
                 "train.cuda_graphs=true"]            # capturable Adam
    eager = opcount._build_trainer(config, overrides, tmp_path / "a")
    captured = opcount._build_trainer(config, overrides, tmp_path / "b")
    for t in (eager, captured):
        for engine in t.engines.values():
            engine.train()
    eager_steps = {n: GraphedStep(e.module, e.optimizer, capture=False) for n, e in eager.engines.items()}
    graph_steps = {n: GraphedStep(e.module, e.optimizer, capture=True) for n, e in captured.engines.items()}
    batches = list(eager.sampler.epoch(0))
    for batch in batches:
        for name in eager_steps:
            torch.manual_seed(0)
            want = eager_steps[name](batch)
            torch.manual_seed(0)
            got = graph_steps[name](batch)
            torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-4, atol=1e-5)
    assert all(graph is not None for step in graph_steps.values() for graph, *_ in step.buckets.values())
