"""The training loop: DeepSpeed step, periodic validation, early stopping, resume, final test.

One epoch = every training row once, in batches built on the device by the sampler. After each
epoch (and its evaluation) a DeepSpeed checkpoint is written with the sampler, RNG and
early-stopping state, so `--resume` continues exactly where the run stopped.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from adarec.config import RunConfig, save_config
from adarec.errors import AdarecError
from adarec.models import build_model

from .checkpoint import atomic_torch_save, atomic_write_json, latest_tag, prune_checkpoints, rng_state, set_rng_state
from .curves import plot_curves
from .data_setup import load_split
from .distributed import DistInfo, pick_device, setup_distributed
from .ds_config import build_ds_config
from .evaluator import evaluate_split
from .run_log import RunLog, setup_logging

log = logging.getLogger("adarec.train")
CHECKPOINTS = "checkpoints"
BEST_WEIGHTS = "best_model.pt"


class TrainingDiverged(AdarecError):
    """The loss became NaN/inf; the last good checkpoint is left in place."""


@dataclass
class TrainState:
    epochs_done: int = 0
    global_step: int = 0
    best_metric: float = -math.inf
    best_epoch: int = 0
    bad_evals: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _mean_terms(sums: dict[str, torch.Tensor], steps: int) -> dict[str, float]:
    return {k: float(v) / max(steps, 1) for k, v in sums.items()}


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path, dist: DistInfo, split, resume: bool):
        import deepspeed

        self.cfg, self.run_dir, self.dist = cfg, Path(run_dir), dist
        self.device = dist.device
        seed_everything(cfg.train.seed)
        self.split = split
        model = build_model(cfg.model, self.split.num_items, self.split.max_len).to(self.device)
        self.model = model
        self.ds_config = build_ds_config(cfg.train, dist.world_size, self.device)
        optimizer = torch.optim.Adam(
            model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.adam_betas),
            weight_decay=cfg.train.weight_decay, fused=self.device.type == "cuda",
        )
        if not resume:
            # Before deepspeed.initialize: under bf16 the optimizer's fp32 master weights are
            # copied from the model there, so data-dependent init must already be in place.
            model.prepare(self.split, self.device, cfg.train.seed)
        self.resume = resume
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        from adarec.data import TrainBatchSampler

        self.sampler = TrainBatchSampler(
            self.split, cfg.train.batch_size, cfg.train.seed, rank=dist.rank,
            world_size=dist.world_size, with_views=model.needs_views,
            crop_ratio=cfg.model.crop_ratio, mask_ratio=cfg.model.mask_ratio,
            reorder_ratio=cfg.model.reorder_ratio, device=self.device,
            # Equal step counts on every rank, or a collective would wait forever.
            pad_ranks=dist.world_size > 1,
        )
        self.state = TrainState()
        self.runlog = RunLog(self.run_dir, enabled=dist.is_main)

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        tag = f"epoch{self.state.epochs_done}"
        client = {"train_state": asdict(self.state), "sampler": self.sampler.state_dict(), "rng": rng_state()}
        self.engine.save_checkpoint(str(self.run_dir / CHECKPOINTS), tag=tag, client_state=client)
        if self.dist.is_main:
            prune_checkpoints(self.run_dir / CHECKPOINTS, keep=2)

    def restore(self) -> None:
        ckpt_dir = self.run_dir / CHECKPOINTS
        tag = latest_tag(ckpt_dir)
        if tag is None:
            raise AdarecError(f"{self.run_dir}: nothing to resume (no checkpoint in {ckpt_dir})")
        path, client = self.engine.load_checkpoint(str(ckpt_dir), tag=tag)
        if path is None:
            raise AdarecError(f"{ckpt_dir}: checkpoint {tag!r} could not be loaded")
        self.state = TrainState(**client["train_state"])
        self.sampler.load_state_dict(client["sampler"])
        set_rng_state(client["rng"])
        self.runlog.truncate_after(self.state.epochs_done)
        log.info("resumed from %s after epoch %d", tag, self.state.epochs_done)

    def save_best(self, epoch: int, metric: float) -> None:
        if self.dist.is_main:
            state = {k: v.detach().cpu() for k, v in self.engine.module.state_dict().items()}
            atomic_torch_save(self.run_dir / BEST_WEIGHTS, {"model": state, "epoch": epoch, "metric": metric})

    # -- one epoch ---------------------------------------------------------------------------
    def train_epoch(self, epoch_index: int) -> dict:
        engine, cfg = self.engine, self.cfg.train
        engine.train()
        steps = len(self.sampler)
        sums: dict[str, torch.Tensor] = {}
        bar = tqdm(total=steps, desc=f"epoch {epoch_index + 1}", disable=not self.dist.is_main,
                   dynamic_ncols=True, leave=False)
        start = time.perf_counter()
        samples = 0
        for step, batch in enumerate(self.sampler.epoch(epoch_index)):
            loss, terms = engine(batch)
            engine.backward(loss)
            engine.step()
            samples += batch["input_ids"].shape[0] * self.dist.world_size
            for name, value in {"loss": loss.detach(), **terms}.items():
                sums[name] = sums.get(name, 0.0) + value.float()
            if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
                # The only host sync of the step loop, every log_every steps.
                running = float(sums["loss"]) / (step + 1)
                if not math.isfinite(running):
                    raise TrainingDiverged(self._diverged_message(epoch_index + 1, step + 1))
                bar.set_postfix(loss=f"{running:.4f}", samples_s=f"{samples / (time.perf_counter() - start):.0f}")
            bar.update()
        bar.close()
        elapsed = time.perf_counter() - start
        self.state.global_step += steps
        record = _mean_terms(sums, steps)
        if not all(math.isfinite(v) for v in record.values()):
            raise TrainingDiverged(self._diverged_message(epoch_index + 1, steps))
        record.update(seconds=elapsed, step_ms=1000 * elapsed / max(steps, 1), samples_per_s=samples / elapsed)
        # Model-specific epoch statistics (ADARec: depth histogram, router weights, pairs computed).
        pop_stats = getattr(engine.module, "pop_epoch_stats", None)
        if pop_stats is not None:
            record.update(pop_stats())
        return record

    def _diverged_message(self, epoch: int, step: int) -> str:
        kept = latest_tag(self.run_dir / CHECKPOINTS) or "none yet"
        return (f"non-finite training loss at epoch {epoch}, step {step}; stopped. The last good "
                f"checkpoint ({kept}) is kept in {self.run_dir / CHECKPOINTS}; lower train.lr or "
                f"set train.grad_clip, then resume with --resume.")

    def evaluate(self, which: str) -> dict[str, float]:
        ev = self.cfg.eval
        return evaluate_split(self.engine.module, self.split, which, ev.ks, ev.protocol, ev.batch_size,
                              self.dist.rank, self.dist.world_size)

    # -- the run -----------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        cfg = self.cfg.train
        if self.resume:
            self.restore()
        select = self.cfg.eval.select_metric
        log.info("training %s on %s: %d users, %d items, %d steps/epoch, device %s, precision %s",
                 self.cfg.model.name, self.cfg.data.path, self.split.num_users(), self.split.num_items,
                 len(self.sampler), self.device, "bf16" if self.ds_config["bf16"]["enabled"] else "fp32")
        while self.state.epochs_done < cfg.epochs:
            epoch = self.state.epochs_done + 1
            record = self.train_epoch(epoch - 1)
            self.state.epochs_done = epoch
            self.runlog.epoch(epoch, record)
            log.info("epoch %d: %s", epoch, " ".join(f"{k}={v:.4g}" for k, v in record.items()))
            stop = False
            if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                metrics = self.evaluate("valid")
                self.runlog.evaluation(epoch, "valid", metrics)
                log.info("epoch %d valid: %s", epoch, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
                if metrics[select] > self.state.best_metric:
                    self.state.best_metric, self.state.best_epoch, self.state.bad_evals = metrics[select], epoch, 0
                    self.save_best(epoch, metrics[select])
                else:
                    self.state.bad_evals += 1
                    stop = self.state.bad_evals >= cfg.patience
            self.save_checkpoint()
            if stop:
                log.info("early stop after epoch %d: %s has not improved for %d evaluations (best %.4f at epoch %d)",
                         epoch, select, cfg.patience, self.state.best_metric, self.state.best_epoch)
                break
        return self.test()

    def test(self) -> dict[str, float]:
        best = self.run_dir / BEST_WEIGHTS
        if best.exists():
            saved = torch.load(best, map_location=self.device, weights_only=True)
            self.engine.module.load_state_dict(saved["model"])
        metrics = self.evaluate("test")
        result = {"epoch": self.state.best_epoch, "split": "test", **metrics}
        self.runlog.evaluation(self.state.best_epoch, "test", metrics)
        if self.dist.is_main:
            atomic_write_json(self.run_dir / "test_metrics.json", result)
            plot_curves(self.run_dir)
        log.info("test (best epoch %d): %s", self.state.best_epoch,
                 " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        self.runlog.close()
        return result


def run_training(cfg: RunConfig, run_dir: Path, resume: bool = False) -> dict[str, float]:
    """Train (or resume) a run in run_dir and return its test metrics."""
    run_dir = Path(run_dir)
    is_main = os.environ.get("RANK", "0") == "0"
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir, is_main)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    # Data first: a bad file should fail in a second, before DeepSpeed starts a process group.
    split = load_split(cfg, pick_device(cfg.train.device))
    dist = setup_distributed(cfg.train.device)
    trainer = Trainer(cfg, run_dir, dist, split, resume)
    if dist.is_main:
        save_config(cfg, run_dir / "config.yaml")
        atomic_write_json(run_dir / "ds_config.json", trainer.ds_config)
    return trainer.fit()
