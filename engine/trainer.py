"""The training loop: DeepSpeed step, periodic validation, early stopping, resume, final test.

A model is one or more *members*, each a separately optimised network with its own DeepSpeed
engine and its own early stopping (one member for SASRec/ELCRec/ADARec; the experts e5 and e10
for adarec-dual). All members see the same batches; a member whose patience has run out stops
training while the others go on. The test ranks with the best weights of every member (their
scores averaged when there are several).

One epoch = every training row once, in batches built on the device by the sampler. After each
epoch (and its evaluation) a DeepSpeed checkpoint per member is written with the sampler, RNG
and early-stopping state, so `--resume` continues exactly where the run stopped.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from adarec.profiling import nvtx
from adarec.profiling.opcount import optimizer_range
from tqdm import tqdm

from adarec.backends import check_backend_runs_here
from adarec.config import RunConfig, config_to_dict, save_config
from adarec.errors import AdarecError
from adarec.models import build_members, scorer

from .atomic_io import atomic_torch_save, atomic_write_json
from .checkpoint import (
    KEEP_TAGS,
    LOAD_ERRORS,
    commit_tag,
    describe_load_failure,
    describe_unresumable,
    describe_write_failure,
    discard_tag,
    find_resume_point,
    is_write_failure,
    load_rank_rng,
    rng_file,
    rng_state,
    set_rng_state,
    tag_name,
)
from .curves import plot_curves
from .data_setup import load_split
from .distributed import DistInfo, pick_device, setup_distributed, share_from_rank0, sync_ranks
from .ds_config import build_ds_config, resolve_precision, use_autocast
from .evaluator import NonFiniteScores, batch_metric_sums, evaluate_split
from .graphed_step import GRAD_NORMS, GraphedStep, check_graph_config
from .hierarchy_plot import plot_hierarchy
from .nonfinite_watch import NonFiniteWatch, gradient_norms
from .output_dir import check_free_space, checkpoint_bytes_estimate, probe_output_dir, tree_bytes
from .rank_watch import RankWatch
from .run_dir import claim_run_dir, removed_if_setup_fails
from .run_log import RunLog, setup_logging
from .run_record import end_record, package_versions, source_commit, start_record, utc_now, versions_line

log = logging.getLogger("adarec.train")
CHECKPOINTS = "checkpoints"
PROGRESS_EVERY_S = 60.0
BEST_WEIGHTS = "best_model.pt"


class TrainingDiverged(AdarecError):
    """A loss term or a gradient became NaN/inf, or validation scores did; the last good
    checkpoint is left in place."""


@dataclass
class MemberState:
    best_metric: float = -math.inf
    best_epoch: int = 0
    bad_evals: int = 0
    stopped: bool = False


@dataclass
class TrainState:
    epochs_done: int = 0
    global_step: int = 0
    members: dict[str, MemberState] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path, dist: DistInfo, split, resume: bool):
        import deepspeed

        self.cfg, self.run_dir, self.dist, self.split, self.resume = cfg, Path(run_dir), dist, split, resume
        self.device = dist.device
        seed_everything(cfg.train.seed)
        members = {name: net.to(self.device)
                   for name, net in build_members(cfg.model, split.num_items, split.max_len,
                                                   cfg.kernels.backend, cfg.kernels.ce_item_chunk).items()}
        graphs = cfg.train.cuda_graphs
        self.precision = resolve_precision(cfg.train.precision, self.device)
        # bf16 by torch.autocast over fp32 weights (DeepSpeed in fp32), or by DeepSpeed's bf16 engine.
        self.ds_config = build_ds_config(cfg.train, dist.world_size, self.device)
        zero_stage = int(self.ds_config["zero_optimization"]["stage"])     # after any train.ds_config overlay
        # On a CPU bf16 is always autocast: DeepSpeed's bf16 engine and optimizers are for accelerators.
        autocast = self.precision == "bf16" and (self.device.type == "cpu"
                                                 or use_autocast(cfg.train, dist.world_size, zero_stage))
        self.autocast_dtype = torch.bfloat16 if autocast else None
        if autocast:
            self.ds_config = build_ds_config(cfg.train, dist.world_size, self.device, autocast=True)
        if graphs:
            check_graph_config(cfg.train, self.device, dist.world_size, cfg.model, self.ds_config)
        self.engines, self.graphed = {}, {}
        for name, net in members.items():
            if not resume:
                # Before deepspeed.initialize: under bf16 the optimizer's fp32 master weights are
                # copied from the model there, so data-dependent init must already be in place.
                net.prepare(split, self.device, cfg.train.seed)
            optimizer = torch.optim.Adam(
                net.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.adam_betas),
                weight_decay=cfg.train.weight_decay, fused=self.device.type == "cuda",
                # A captured step must keep Adam's step count on the device.
                capturable=graphs,
            )
            engine, *_ = deepspeed.initialize(model=net, optimizer=optimizer, config=self.ds_config)
            if dist.world_size == 1 and zero_stage == 0:
                # Nothing to reduce with one rank; DeepSpeed's bucketed all-reduce would still copy
                # every gradient into a flat buffer and back (two launches per parameter). Not under
                # ZeRO, whose optimizer gathers its gradient partitions in that same call.
                engine.enable_backward_allreduce = False
            self.engines[name] = engine
            if graphs:
                # DeepSpeed keeps the module, the optimizer and the checkpoints; the graphs run them.
                self.graphed[name] = GraphedStep(engine.module, engine.optimizer, grad_clip=cfg.train.grad_clip,
                                                 autocast_dtype=self.autocast_dtype)
        self.needs_views = any(net.needs_views for net in members.values())
        from adarec.data import TrainBatchSampler

        # Trimmed, length-grouped batches (adarec/data/length_groups.py), unless a member's
        # reference code reads the padding (then grouping would buy nothing either).
        trims = all(getattr(net, "trims_batches", True) for net in members.values())
        self.width_buckets = cfg.data.width_buckets if trims else None
        self.sampler = TrainBatchSampler(
            split, cfg.train.batch_size, cfg.train.seed, rank=dist.rank, world_size=dist.world_size,
            with_views=self.needs_views, crop_ratio=cfg.model.crop_ratio, mask_ratio=cfg.model.mask_ratio,
            reorder_ratio=cfg.model.reorder_ratio, device=self.device,
            # Equal step counts on every rank, or a collective would wait forever.
            pad_ranks=dist.world_size > 1,
            group_by_length=cfg.data.group_by_length and self.width_buckets is not None,
            group_batches=cfg.data.group_batches, width_buckets=self.width_buckets,
            target_bucket=None if self.device.type == "cuda" else 1,
        )
        self.state = TrainState(members={name: MemberState() for name in members})
        self.runlog = RunLog(self.run_dir, enabled=dist.is_main)
        # The first non-finite loss term or gradient of the epoch, recorded on the device.
        self.watch = NonFiniteWatch()
        self._epoch_step = 0

    @property
    def single(self) -> bool:
        return len(self.engines) == 1

    def _prefixed(self, name: str, key: str) -> str:
        return key if self.single else f"{name}/{key}"

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Write this epoch's checkpoint, tag epochN, in every member's folder.

        Every rank writes its DeepSpeed files and its own RNG state; once all ranks are done, rank
        0 writes each member's manifest (the commit marker) and only then prunes older tags, so the
        last good checkpoint survives a failure at any point before. A write the file system
        refuses (disk full, no permission) removes the partial tag and ends the run with an
        AdarecError naming the folder, the OS error and the checkpoint that is kept.
        """
        tag = tag_name(self.state.epochs_done)
        rng = rng_state()
        client = {"train_state": asdict(self.state), "sampler": self.sampler.state_dict(), "rng": rng}
        root = self.run_dir / CHECKPOINTS
        member_dirs = [root / name for name in self.engines]
        try:
            if self.dist.is_main:
                # A folder of this tag can only be left by an attempt the run resumed before.
                discard_tag(member_dirs, tag)
            sync_ranks()
            for name, engine in self.engines.items():
                engine.save_checkpoint(str(root / name), tag=tag, client_state=client)
                atomic_torch_save(root / name / tag / rng_file(self.dist.rank), rng)
            sync_ranks()
            if self.dist.is_main:
                commit_tag(member_dirs, tag)
        except Exception as err:
            if not is_write_failure(err):
                raise
            if self.dist.world_size == 1:
                # With several ranks the others may still be writing into the tag: it is left
                # without a manifest, which --resume skips and the next save removes.
                discard_tag(member_dirs, tag)
            kept = find_resume_point(member_dirs).tag
            raise AdarecError(describe_write_failure(err, tag, root, kept)) from err

    def restore(self) -> None:
        """Load the newest checkpoint whose manifest verifies for every member.

        Newer tags that fail (no manifest: an interrupted save; a file missing, truncated or
        corrupted) are skipped with one warning naming the file and the problem. Rank 0 decides and
        every rank loads that tag. A run saved before manifests existed loads DeepSpeed's `latest`
        tag unverified. No loadable tag, or a load that still fails, is an AdarecError.
        """
        root = self.run_dir / CHECKPOINTS
        member_dirs = [root / name for name in self.engines]
        point = share_from_rank0(find_resume_point(member_dirs) if self.dist.is_main else None)
        if point.tag is None:
            raise AdarecError(describe_unresumable(root, point))
        if point.rejected:
            log.warning("checkpoint %s; falling back to %s", "; checkpoint ".join(point.rejected), point.tag)
        if not point.verified:
            log.warning("checkpoint %s: saved without a manifest (before checksums were recorded); loading it "
                        "unverified", member_dirs[0] / point.tag)
        client = None
        for name, engine in self.engines.items():
            tag_dir = root / name / point.tag
            try:
                path, client = engine.load_checkpoint(str(root / name), tag=point.tag)
            except LOAD_ERRORS as err:
                raise AdarecError(describe_load_failure(err, tag_dir)) from err
            if path is None:
                raise AdarecError(f"checkpoint {tag_dir} could not be loaded (DeepSpeed found no checkpoint files)")
        saved = client["train_state"]
        self.state = TrainState(epochs_done=saved["epochs_done"], global_step=saved["global_step"],
                                members={k: MemberState(**v) for k, v in saved["members"].items()})
        self.sampler.load_state_dict(client["sampler"])
        set_rng_state(load_rank_rng(member_dirs[0] / point.tag, self.dist.rank, fallback=client["rng"]))
        # The logs are append-only: a marker supersedes what the checkpoint does not contain.
        for row in self.runlog.mark_resumed(self.state.epochs_done):
            log.warning("extending the run after its test evaluation (%s%d epochs trained, best epoch %d): the test "
                        "split has been seen; that row stays in metrics.jsonl, marked superseded, and the run "
                        "will be tested again when it ends",
                        "offline, " if row.get("source") == "evaluate" else "",
                        row.get("trained_epochs", row["epoch"]), row["epoch"])
        log.info("resumed after epoch %d", self.state.epochs_done)

    def save_best(self, name: str, epoch: int, metric: float) -> None:
        if not self.dist.is_main:
            return
        path = self.run_dir / BEST_WEIGHTS
        saved = torch.load(path, weights_only=True) if path.exists() else {"members": {}}
        state = {k: v.detach().cpu() for k, v in self.engines[name].module.state_dict().items()}
        saved["members"][name] = {"model": state, "epoch": epoch, "metric": metric}
        atomic_torch_save(path, saved)

    # -- one epoch ---------------------------------------------------------------------------
    def train_epoch(self, epoch_index: int) -> dict:
        active = self.active_engines()
        for engine in active.values():
            engine.train()
            # Staged training (ADRec's frozen warm-up) keys off the epoch; a resumed run calls it too.
            begin_epoch = getattr(engine.module, "begin_epoch", None)
            if begin_epoch is not None:
                begin_epoch(epoch_index)
        steps, log_every = len(self.sampler), self.cfg.train.log_every
        sums: dict[str, torch.Tensor] = {}
        # None: shown on a terminal only, so a log file (nohup, CI) holds no bars. Rank 0 only.
        bar = tqdm(total=steps, desc=f"epoch {epoch_index + 1}", disable=(not self.dist.is_main) or None,
                   dynamic_ncols=True, leave=False)
        start, samples = time.perf_counter(), 0
        last_note = start
        batches = iter(self.sampler.epoch(epoch_index))
        self.watch.reset()
        self._epoch_step = 0
        for step in range(steps):
            with nvtx.phase("data"):
                batch = next(batches)
            for key, value in self.train_step(batch).items():
                sums[key] = sums.get(key, 0.0) + value.float()
            samples += batch["input_ids"].shape[0] * self.dist.world_size
            if (step + 1) % log_every == 0 or step + 1 == steps:
                # The only host syncs of the step loop, every log_every steps.
                running = {k: float(v) / (step + 1) for k, v in sums.items() if k.endswith("loss")}
                first = self.watch.report()
                if first is not None or not all(math.isfinite(v) for v in running.values()):
                    raise TrainingDiverged(self._diverged_message(epoch_index + 1, step + 1, first))
                rate = samples / (time.perf_counter() - start)
                bar.set_postfix(loss=" ".join(f"{v:.4f}" for v in running.values()), samples_s=f"{rate:.0f}")
                if bar.disable and self.dist.is_main and time.perf_counter() - last_note >= PROGRESS_EVERY_S:
                    # No bar (not a terminal: nohup, CI): a progress line at most once a PROGRESS_EVERY_S.
                    last_note = time.perf_counter()
                    log.info("epoch %d: step %d/%d, loss %s, %.0f samples/s", epoch_index + 1, step + 1, steps,
                             " ".join(f"{v:.4f}" for v in running.values()), rate)
            bar.update()
        bar.close()
        elapsed = time.perf_counter() - start
        self.state.global_step += steps
        record = {k: v / max(steps, 1) for k, v in self._mean_over_ranks(sums).items()}
        if not all(math.isfinite(v) for v in record.values()):
            # Another rank's terms (each rank watches its own; this one stayed finite).
            raise TrainingDiverged(self._diverged_message(epoch_index + 1, steps, self.watch.report()))
        if not self.single:
            record["loss"] = sum(v for k, v in record.items() if k.endswith("/loss"))
        record.update(seconds=elapsed, step_ms=1000 * elapsed / max(steps, 1), samples_per_s=samples / elapsed)
        for name, engine in active.items():
            # Model-specific epoch statistics (ADARec: depth histogram, router weights, pairs).
            pop_stats = getattr(engine.module, "pop_epoch_stats", None)
            if pop_stats is not None:
                record.update({self._prefixed(name, k): v for k, v in pop_stats().items()})
            # Model diagnostics on fixed validation rows (ADARec: is the hierarchy alive?).
            diagnose = getattr(engine.module, "epoch_diagnostics", None)
            if diagnose is not None and self.dist.is_main:
                record.update({self._prefixed(name, k): v for k, v in diagnose(self.split).items()})
        return record

    def _mean_over_ranks(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """The epoch's loss sums averaged over the ranks: each rank's loss is its share of the
        global batch's (adarec/parallel.py), so their mean is the global batch's loss. One
        collective per epoch."""
        if not sums:
            return {}
        names = list(sums)
        values = torch.stack([torch.as_tensor(sums[k], device=self.device).float() for k in names])
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(values)
            values /= self.dist.world_size
        return dict(zip(names, values.cpu().tolist(), strict=True))

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def active_engines(self) -> dict:
        """The members still training (early stopping has not stopped them)."""
        return {n: e for n, e in self.engines.items() if not self.state.members[n].stopped}

    def train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """One optimisation step of every active member on one batch: the loss and its terms,
        detached, on the device. The step of `adarec train` and of the benchmarks; nothing in it
        waits for the device (tests/test_sync_free.py). Every loss term and, where the parameters
        hold them, every gradient goes through the non-finite watch (engine/nonfinite_watch.py)."""
        out = {}
        self._epoch_step += 1
        for name, engine in self.active_engines().items():
            member = "" if self.single else name
            if name in self.graphed:
                with nvtx.phase("graph_replay"):
                    terms = dict(self.graphed[name](batch))
                norms = terms.pop(GRAD_NORMS, None)
                if norms is not None:
                    self.watch.observe_gradients((self.graphed[name].grad_names, norms), self._epoch_step, member)
                out.update({self._prefixed(name, key): value for key, value in terms.items()})
                continue
            with nvtx.phase("forward"), self._autocast():
                loss, terms = engine(batch)
            with nvtx.phase("backward"):
                if self.cfg.train.grad_merge == "pcgrad":
                    from adarec.grad_merge import merged_gradient_loss

                    # One gradient per loss, merged; the engine then back-propagates a surrogate
                    # whose gradient is the merged one (adarec/grad_merge.py).
                    engine.backward(merged_gradient_loss(engine.module, engine.module.loss_parts, "pcgrad"))
                else:
                    engine.backward(loss)
                # Before the step: a non-finite gradient is named while the weights are still finite.
                self.watch.observe_gradients(gradient_norms(engine.module), self._epoch_step, member)
            # The launch counter (profiling/opcount.py) counts this range as one fused launch.
            with nvtx.phase("optimizer_step"), optimizer_range():
                engine.step()
            out.update({self._prefixed(name, key): value for key, value in {"loss": loss.detach(), **terms}.items()})
        self.watch.observe_terms(out, self._epoch_step)
        return out

    def eval_batch(self, model, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Metric sums of one evaluation batch, on the device: inputs are the first rows of the
        validation split (what the launch counter profiles)."""
        ev, s = self.cfg.eval, self.split
        rows = slice(0, inputs.shape[0])
        history = s.valid_history[rows].to(self.device)
        targets = s.valid_target[rows].to(self.device)
        return batch_metric_sums(model, inputs, history, targets, ev.ks, ev.protocol, item_chunk=ev.item_chunk)

    def _kept_checkpoint(self) -> str:
        kept = find_resume_point([self.run_dir / CHECKPOINTS / name for name in self.engines]).tag or "none yet"
        return f"The last good checkpoint ({kept}) is kept in {self.run_dir / CHECKPOINTS}"

    def _diverged_message(self, epoch: int, step: int, first: tuple[str, str] | None = None) -> str:
        """`first`: the watch's report (kind, text) of what went non-finite first in this epoch."""
        what = "gradient" if first is not None and first[0] == "gradient" else "training loss"
        origin = f" First non-finite in epoch {epoch}: {first[1]}." if first else ""
        return (f"non-finite {what} at epoch {epoch}, step {step}; stopped.{origin} {self._kept_checkpoint()}; "
                "lower train.lr or set train.grad_clip, then resume with --resume.")

    def evaluate(self, model, which: str, label: str | None = None) -> dict[str, float]:
        ev = self.cfg.eval
        label = label or self.cfg.model.name
        with nvtx.phase("evaluation"):
            try:
                return evaluate_split(model, self.split, which, ev.ks, ev.protocol, ev.batch_size,
                                      self.dist.rank, self.dist.world_size, item_chunk=ev.item_chunk, label=label,
                                      width_buckets=self.width_buckets)
            except NonFiniteScores as err:
                raise TrainingDiverged(f"{err}; stopped. {self._kept_checkpoint()}.") from err

    def validate_members(self, epoch: int) -> None:
        """Validate every training member, update its early stopping and best weights."""
        select, patience = self.cfg.eval.select_metric, self.cfg.train.patience
        for name, engine in self.engines.items():
            member = self.state.members[name]
            if member.stopped:
                continue
            metrics = self.evaluate(engine.module, "valid", self.cfg.model.name if self.single
                                    else f"{self.cfg.model.name} member {name}")
            split = "valid" if self.single else f"valid/{name}"
            self.runlog.evaluation(epoch, split, metrics)
            log.info("epoch %d %s: %s", epoch, split, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            if metrics[select] > member.best_metric:
                member.best_metric, member.best_epoch, member.bad_evals = metrics[select], epoch, 0
                self.save_best(name, epoch, metrics[select])
            else:
                member.bad_evals += 1
                if member.bad_evals >= patience:
                    member.stopped = True
                    log.info("%s: early stop after epoch %d, %s has not improved for %d evaluations "
                             "(best %.4f at epoch %d)", name, epoch, select, patience, member.best_metric,
                             member.best_epoch)

    # -- the run -----------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        cfg = self.cfg.train
        if self.resume:
            self.restore()
        how = ("CUDA graphs, autocast" if self.graphed else "autocast") if self.autocast_dtype else "DeepSpeed"
        log.info("training %s on %s: %d users, %d items, %d steps/epoch, device %s, precision %s (%s)",
                 self.cfg.model.name, self.cfg.data.path, self.split.num_users(), self.split.num_items,
                 len(self.sampler), self.device, self.precision, how)
        while self.state.epochs_done < cfg.epochs and not all(m.stopped for m in self.state.members.values()):
            epoch = self.state.epochs_done + 1
            record = self.train_epoch(epoch - 1)
            self.state.epochs_done = epoch
            self.runlog.epoch(epoch, record)
            log.info("epoch %d: %s", epoch, " ".join(
                f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, (int, float))))
            if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                self.validate_members(epoch)
            self.save_checkpoint()
        return self.test()

    def test(self) -> dict[str, float]:
        best = self.run_dir / BEST_WEIGHTS
        if best.exists():
            saved = torch.load(best, map_location=self.device, weights_only=True)["members"]
            for name, entry in saved.items():
                self.engines[name].module.load_state_dict(entry["model"])
        model = scorer({name: engine.module for name, engine in self.engines.items()})
        metrics = self.evaluate(model, "test")
        best_epoch = max(m.best_epoch for m in self.state.members.values())
        result = {"epoch": best_epoch, "split": "test", **metrics}
        # The only test evaluation of a run, when it ends; trained_epochs says when that was.
        self.runlog.evaluation(best_epoch, "test", metrics, trained_epochs=self.state.epochs_done)
        if self.dist.is_main:
            atomic_write_json(self.run_dir / "test_metrics.json", result)
            plot_curves(self.run_dir)
            plot_hierarchy(self.run_dir)
        select = self.cfg.eval.select_metric
        best = {f"best_valid_{select}" if self.single else f"best_valid_{select}/{name}": m.best_metric
                for name, m in self.state.members.items() if math.isfinite(m.best_metric)}
        self.runlog.hparams(config_to_dict(self.cfg), {**best, **{f"test_{k}": v for k, v in metrics.items()}})
        log.info("test (best epoch %d): %s", best_epoch, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        self.runlog.close()
        return result


def _free_space_error(run_dir: Path, need: int) -> str | None:
    try:
        check_free_space(run_dir, need)
    except AdarecError as err:
        return str(err)
    return None


def run_training(cfg: RunConfig, run_dir: Path, resume: bool = False, overwrite: bool = False) -> dict[str, float]:
    """Train (or resume) a run in run_dir and return its test metrics.

    A new run refuses a folder that already holds a run (unless `overwrite`, which moves that run
    aside), so two runs' rows never mix in one metrics.jsonl; a folder the call creates is removed
    again if the run fails before training starts (engine/run_dir.py)."""
    run_dir = Path(run_dir)
    start_time = utc_now()
    is_main = os.environ.get("RANK", "0") == "0"
    if not resume and is_main:
        claim_run_dir(run_dir, overwrite)
    with removed_if_setup_fails(run_dir, enabled=is_main and not resume):
        probe_output_dir(run_dir)               # creates it; an unwritable folder fails here, not at epoch 1
        setup_logging(run_dir, is_main)
        versions, git = (package_versions(), source_commit()) if is_main else ({}, {})
        if is_main:
            _log_header(cfg, versions, git, resume)
        nvtx.enable(cfg.profiling.nvtx)
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        device = pick_device(cfg.train.device)
        check_backend_runs_here(cfg.kernels.backend, device)
        # Data first: a bad file should fail in a second, before DeepSpeed starts a process group.
        split = load_split(cfg, device)
        dist = setup_distributed(cfg.train.device, cfg.train.dist_timeout_s)
        trainer = Trainer(cfg, run_dir, dist, split, resume)
        modules = [engine.module for engine in trainer.engines.values()]
        need = checkpoint_bytes_estimate(modules, KEEP_TAGS) - tree_bytes(run_dir / CHECKPOINTS)
        # Decided on rank 0 (the run directory is shared), so that every rank stops or none does.
        space_error = share_from_rank0(_free_space_error(run_dir, need) if dist.is_main else None)
        if space_error:
            raise AdarecError(space_error)
        if dist.is_main:
            save_config(cfg, run_dir / "config.yaml")
            atomic_write_json(run_dir / "ds_config.json", trainer.ds_config)
            start_record(run_dir, start_time=start_time, resume=resume, device=trainer.device,
                         precision=trainer.precision, world_size=dist.world_size, versions=versions, git=git)
    try:
        # A rank that dies mid-run ends the others with a message naming it, not a bare gloo/NCCL error. Its
        # heartbeats live in run_dir/.ranks, so run_dir must be on a file system all nodes share (as for
        # checkpoints).
        with RankWatch(run_dir, dist.rank, dist.world_size, run_dir / CHECKPOINTS):
            result = trainer.fit()
    except KeyboardInterrupt:
        if dist.is_main:
            end_record(run_dir, "interrupted")
        raise
    except BaseException as err:
        if dist.is_main:
            end_record(run_dir, "failed", f"{type(err).__name__}: {err}")
        raise
    if dist.is_main:
        end_record(run_dir, "completed")
    return result


def _log_header(cfg: RunConfig, versions: dict, git: dict, resume: bool) -> None:
    """The first lines of a run's (or a resume's) train.log: versions and commit, then the resolved
    config as YAML. File only: the console starts with the run's own lines (and a bad data file or
    config ends it with nothing but the error)."""
    import yaml

    commit = git.get("commit")
    where = "unknown" if commit is None else commit[:12] + (" (dirty)" if git.get("dirty") else "")
    log.info("%s adarec run: %s; commit %s", "resuming" if resume else "new", versions_line(versions), where,
             extra={"file_only": True})
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None).rstrip()
    log.info("config (resolved):\n%s", text, extra={"file_only": True})
