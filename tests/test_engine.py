"""End-to-end CPU runs of the DeepSpeed engine on a slice of Beauty: files, resume, NaN stop."""

import json
from pathlib import Path

import pytest
import torch
from adarec.engine.ds_config import build_ds_config
from adarec.engine.offline import evaluate_run
from adarec.engine.run_log import current_rows
from adarec.engine.trainer import TrainingDiverged, run_training

from adarec.config import apply_overrides, load_config
from adarec.metrics import metric_names

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "data.max_users=300", "model.hidden_size=16", "model.num_layers=1", "model.num_intent_clusters=8",
    "train.batch_size=64", "train.log_every=2", "train.device=cpu", "train.precision=fp32",
]


def small_config(epochs: int, model: str = "elcrec"):
    return load_config(REPO / f"configs/{model}_beauty.yaml", [*SMALL, f"train.epochs={epochs}"])


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_two_epoch_run_writes_everything_and_resume_matches(tmp_path):
    straight = tmp_path / "straight"
    result = run_training(small_config(2), straight)
    for name in ("config.yaml", "ds_config.json", "train.log", "metrics.jsonl", "epochs.jsonl",
                 "best_model.pt", "test_metrics.json", "curves.png", "checkpoints/model/latest"):
        assert (straight / name).exists(), name
    assert list((straight / "tensorboard").glob("events.out.tfevents.*"))
    metrics = read_jsonl(straight / "metrics.jsonl")
    assert [(m["epoch"], m["split"]) for m in metrics] == [(1, "valid"), (2, "valid"), (result["epoch"], "test")]
    names = {"epoch", "split", *metric_names((5, 10, 20))}
    assert all(set(m) == names for m in metrics[:2])
    assert set(metrics[2]) == names | {"trained_epochs"} and metrics[2]["trained_epochs"] == 2
    assert json.loads((straight / "test_metrics.json").read_text()) == result
    epochs = read_jsonl(straight / "epochs.jsonl")
    assert {"loss", "rec", "cluster", "instance_cl", "intent_cl", "samples_per_s"} <= set(epochs[0])

    # Stop after one epoch (which ends that run: it is tested), then extend it to two: the same
    # numbers as the uninterrupted run, and the earlier test row is kept, marked superseded.
    split_run = tmp_path / "resumed"
    run_training(small_config(1), split_run)
    before = (split_run / "metrics.jsonl").read_text()
    cfg = apply_overrides(load_config(split_run / "config.yaml"), ["train.epochs=2"])
    resumed = run_training(cfg, split_run, resume=True)
    assert resumed == result
    after = (split_run / "metrics.jsonl").read_text()
    assert after.startswith(before)                                     # append-only
    raw = read_jsonl(split_run / "metrics.jsonl")
    assert [(r.get("event"), r.get("split"), r["epoch"]) for r in raw] == [
        (None, "valid", 1), (None, "test", 1), ("resumed", None, 1), (None, "valid", 2),
        (None, "test", result["epoch"])]
    assert raw[2]["superseded"] == [{"epoch": 1, "split": "test"}]
    assert current_rows(raw) == [{**m, "trained_epochs": 2} if m["split"] == "test" else m for m in metrics]
    assert [e["loss"] for e in current_rows(read_jsonl(split_run / "epochs.jsonl"))] == [e["loss"] for e in epochs]
    assert "extending the run after its test evaluation" in (split_run / "train.log").read_text()

    # adarec evaluate reproduces the test metrics from the saved best weights and records that
    # it touched the test split.
    offline = evaluate_run(straight, "test", "cpu")
    for key in ("HR@20", "NDCG@20"):
        assert offline[key] == pytest.approx(result[key], abs=1e-9)
    last = read_jsonl(straight / "metrics.jsonl")[-1]
    assert last["split"] == "test" and last["source"] == "evaluate"


def test_a_lost_epoch_is_superseded_not_deleted(tmp_path, monkeypatch):
    """A run that dies after logging epoch 2 but before its checkpoint: on resume the epoch-2 rows
    stay in the files, the marker supersedes them, and epoch 2 is logged again."""
    from adarec.engine.trainer import Trainer

    run = tmp_path / "run"
    save = Trainer.save_checkpoint

    def dies_at_epoch_two(self):
        if self.state.epochs_done == 2:
            raise KeyboardInterrupt("killed")
        save(self)

    monkeypatch.setattr(Trainer, "save_checkpoint", dies_at_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        run_training(small_config(2), run)
    monkeypatch.setattr(Trainer, "save_checkpoint", save)
    result = run_training(apply_overrides(load_config(run / "config.yaml"), []), run, resume=True)
    raw = read_jsonl(run / "metrics.jsonl")
    assert [(r.get("event"), r.get("split"), r["epoch"]) for r in raw] == [
        (None, "valid", 1), (None, "valid", 2), ("resumed", None, 1), (None, "valid", 2),
        (None, "test", result["epoch"])]
    assert raw[2]["superseded"] == [{"epoch": 2, "split": "valid"}]
    kept = [(r["epoch"], r["split"]) for r in current_rows(raw)]
    assert kept == [(1, "valid"), (2, "valid"), (result["epoch"], "test")]
    epochs = read_jsonl(run / "epochs.jsonl")
    assert [(r.get("event"), r["epoch"]) for r in epochs] == [(None, 1), (None, 2), ("resumed", 1), (None, 2)]


def test_offline_test_evaluation_of_an_unfinished_run_is_refused(tmp_path):
    from adarec.errors import AdarecError

    run = tmp_path / "run"
    run_training(small_config(1), run)
    (run / "test_metrics.json").unlink()                     # as if the run had been stopped mid-way
    with pytest.raises(AdarecError, match="has not ended"):
        evaluate_run(run, "test", "cpu")
    evaluate_run(run, "test", "cpu", allow_unfinished=True)
    assert read_jsonl(run / "metrics.jsonl")[-1]["source"] == "evaluate"


def test_adarec_evaluate_reproduces_the_runs_own_validation_numbers_exactly(tmp_path):
    run = tmp_path / "adarec"
    cfg = load_config(REPO / "configs/adarec_beauty_sparse5.yaml",
                      [*SMALL, "train.epochs=2", "model.max_depth=3", "kernels.backend=eager"])
    run_training(cfg, run)
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "valid"]
    best = max(rows, key=lambda r: r["NDCG@20"])
    offline = evaluate_run(run, "valid", "cpu")
    assert offline["epoch"] == best["epoch"]
    for key, value in best.items():
        if key.startswith(("HR@", "NDCG@", "MRR@")):
            assert offline[key] == value, key                   # exactly, not approximately


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    from adarec.errors import AdarecError

    with pytest.raises(AdarecError, match="nothing to resume"):
        run_training(small_config(1, "sasrec"), tmp_path / "empty", resume=True)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from adarec.models.sasrec import SASRec

    run = tmp_path / "nan"
    run_training(small_config(1, "sasrec"), run)
    real_forward = SASRec.forward

    def poisoned(self, batch):
        loss, terms = real_forward(self, batch)
        return loss * float("nan"), terms

    monkeypatch.setattr(SASRec, "forward", poisoned)
    cfg = apply_overrides(load_config(run / "config.yaml"), ["train.epochs=3"])
    with pytest.raises(TrainingDiverged, match="non-finite training loss at epoch 2"):
        run_training(cfg, run, resume=True)
    assert (run / "checkpoints/model/latest").read_text().strip() == "epoch1"
    assert (run / "best_model.pt").exists()


def test_ds_config_carries_precision_clipping_and_overlay(tmp_path):
    cfg = small_config(1).train
    cpu = build_ds_config(cfg, 1, torch.device("cpu"))
    assert cpu["bf16"]["enabled"] is False and cpu["gradient_clipping"] == 0.0
    assert cpu["train_batch_size"] == 64 and cpu["zero_optimization"]["stage"] == 0
    cfg.precision = "auto"
    cuda = build_ds_config(cfg, 2, torch.device("cuda", 0))
    assert cuda["bf16"]["enabled"] is True and cuda["train_micro_batch_size_per_gpu"] == 32
    overlay = tmp_path / "ds.json"
    overlay.write_text('{"zero_optimization": {"stage": 2, "overlap_comm": true}}')
    cfg.ds_config = str(overlay)
    merged = build_ds_config(cfg, 1, torch.device("cpu"))
    assert merged["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert merged["train_batch_size"] == 64


def test_curves_plot_single_and_per_member_validation(tmp_path):
    from adarec.engine.curves import plot_curves

    metrics = {"HR@5": 0.1, "HR@20": 0.2, "NDCG@5": 0.05, "NDCG@20": 0.08}
    rows = [{"epoch": e, "split": s, **metrics} for e in (1, 2) for s in ("valid/e5", "valid/e10")]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "epochs.jsonl").write_text("".join(json.dumps({"epoch": e, "loss": 3.0 - e}) + "\n" for e in (1, 2)))
    out = plot_curves(tmp_path)
    assert out.exists() and out.stat().st_size > 10_000


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_one_rank_steps_update_the_weights_at_every_zero_stage(tmp_path, stage):
    """With one rank the trainer switches DeepSpeed's gradient all-reduce off at stage 0 only:
    ZeRO's optimizer collects its gradient partitions in that same call."""
    from adarec.profiling import opcount

    trainer = opcount._build_trainer(str(REPO / "configs/sasrec_beauty.yaml"),
                                     ["data.max_users=60", "model.hidden_size=16", "train.batch_size=16",
                                      f"train.zero_stage={stage}"], tmp_path)
    (engine,) = trainer.engines.values()
    assert engine.enable_backward_allreduce is (stage != 0)
    before = [p.detach().clone() for p in engine.module.parameters()]
    batches = iter(trainer.sampler.epoch(0))
    for _ in range(2):
        loss = trainer.train_step(next(batches))["loss"]
        assert torch.isfinite(loss)
    assert any(not torch.equal(p, b) for p, b in zip(engine.module.parameters(), before, strict=True))


def test_bf16_on_a_cpu_trains_under_autocast_and_ranks_in_fp32(tmp_path, monkeypatch):
    """train.precision=bf16 on the CPU: autocast over fp32 weights (DeepSpeed in fp32), the
    forward's matmuls in bf16, and validation scores in fp32."""
    from adarec.models.sasrec import SASRec

    seen = {}
    real_query = SASRec.user_query

    def user_query(self, input_ids):
        out = real_query(self, input_ids)
        seen["query"] = out.dtype
        return out

    real_linear = torch.nn.Linear.forward

    def linear(self, x):
        out = real_linear(self, x)
        if self.training:
            seen["train_linear"] = out.dtype
        return out

    monkeypatch.setattr(SASRec, "user_query", user_query)
    monkeypatch.setattr(torch.nn.Linear, "forward", linear)
    cfg = apply_overrides(small_config(1, "sasrec"), ["train.precision=bf16"])
    result = run_training(cfg, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "ds_config.json").read_text())["bf16"]["enabled"] is False
    assert "precision bf16 (autocast)" in (tmp_path / "bf16" / "train.log").read_text()
    assert seen["train_linear"] == torch.bfloat16                   # autocast's matmuls
    assert all(p.dtype == torch.float32 for p in torch.load(tmp_path / "bf16" / "best_model.pt")["members"]
               ["model"]["model"].values() if p.is_floating_point())
    assert seen["query"] == torch.float32 and 0 <= result["NDCG@20"] <= 1
