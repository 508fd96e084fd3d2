"""The Python API (notebooks, scripts): `adarec.train` and `adarec.load_run`.

    import adarec

    result = adarec.train("configs/sasrec_beauty.yaml", ["train.epochs=5"], output_dir="runs/try")
    result.test["NDCG@20"], result.best_epoch, result.run_dir
    run = adarec.load_run(result.run_dir)
    run.recommend([[12, 7, 301]], k=10)       # top-10 item ids and scores after a new history
    run.recommend_users([1, 2], k=10)          # for users of the run's data file
    run.score([[12, 7, 301]])                  # [1, num_items + 1]: column i scores item i

`train` is `adarec train` without the command line: the same engine (DeepSpeed, one process
here; several under torchrun / the deepspeed launcher), the same run folder. `load_run` rebuilds
the run's best weights exactly as `adarec evaluate` and serving do (adarec/engine/run_model.py,
adarec/serving/served_run.py) and scores every item exactly, with torch (no faiss index: for
large catalogs `adarec export` + `adarec.serving.Recommender` is the faster path).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from adarec.config import RunConfig, apply_overrides, load_config
from adarec.errors import AdarecError
from adarec.serving.queries import UserRows

__all__ = ["RunResult", "TrainedRun", "load_run", "train"]


@dataclass(frozen=True)
class RunResult:
    """What `adarec.train` returns.

    run_dir: the run folder (docs/running.md lists what it holds); best_epoch: the epoch whose
    weights were tested; valid: the validation metrics of the best epoch (with several members,
    as in adarec-dual, keys are "<member>/<metric>" for each member's best epoch); test: the
    test metrics ({"HR@5": ..., "NDCG@20": ...})."""

    run_dir: Path
    best_epoch: int
    valid: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)


def _metrics_only(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if "@" in k and isinstance(v, (int, float))}


def best_validation(run_dir: Path, select_metric: str) -> dict[str, float]:
    """The validation row(s) in force with the best `select_metric` (the first best, as early
    stopping keeps it), from the run's metrics.jsonl."""
    from adarec.engine.run_log import current_rows, read_jsonl

    rows = [r for r in current_rows(read_jsonl(Path(run_dir) / "metrics.jsonl"))
            if str(r.get("split", "")).startswith("valid")]
    out: dict[str, float] = {}
    splits = sorted({r["split"] for r in rows})
    for split in splits:
        mine = [r for r in rows if r["split"] == split and select_metric in r]
        if not mine:
            continue
        best = max(mine, key=lambda r: r[select_metric])      # max keeps the first of equal values
        prefix = "" if split == "valid" else f"{split.split('/', 1)[1]}/"
        out.update({f"{prefix}{k}": float(v) for k, v in _metrics_only(best).items()})
    return out


def train(config: str | Path | RunConfig | None, overrides: Sequence[str] = (), output_dir: str | Path | None = None,
          resume: bool = False, overwrite: bool = False) -> RunResult:
    """Train a run (or resume one) and return its RunResult.

    config: a YAML config file (configs/*.yaml) or a RunConfig (adarec.config.load_config);
    overrides: "section.key=value" settings over it, as `--set` takes them; output_dir: the run
    folder (default runs/<config file stem>, as `adarec train`; required with a RunConfig).
    resume=True continues the run in output_dir from its latest checkpoint with the config it
    saved (config.yaml) and `overrides` over it, as `adarec train --resume` does; a RunConfig
    passed then is used as it is instead. overwrite=True moves a run already in output_dir aside
    (to <folder>.old-<UTC time>) instead of refusing the folder.

    Errors about the data, the config or the folder are AdarecError (adarec.errors).
    """
    from adarec.cli import default_run_dir

    if resume and overwrite:
        raise AdarecError("resume continues the run in output_dir and overwrite moves it aside: pass one")
    overrides = [overrides] if isinstance(overrides, str) else list(overrides)
    if output_dir is not None:
        run_dir = Path(output_dir)
    elif isinstance(config, (str, Path)):
        run_dir = default_run_dir(str(config))
    else:
        raise AdarecError("train: pass output_dir (the run folder) with a RunConfig or with config=None")
    if isinstance(config, RunConfig):
        cfg = apply_overrides(config, overrides)
    elif resume:
        saved = run_dir / "config.yaml"
        if not saved.exists():
            raise AdarecError(f"{run_dir}: nothing to resume (no config.yaml)")
        cfg = apply_overrides(load_config(saved), overrides)
    elif config is None:
        raise AdarecError("train needs a config (a YAML file or a RunConfig), or resume=True with output_dir")
    else:
        cfg = load_config(config, overrides)
    from adarec.engine.trainer import run_training

    result = run_training(cfg, run_dir, resume=resume, overwrite=overwrite)
    return RunResult(run_dir=run_dir, best_epoch=int(result["epoch"]),
                     valid=best_validation(run_dir, cfg.eval.select_metric), test=_metrics_only(result))


class TrainedRun:
    """A trained run's best weights in eval mode, with exact scoring and top-k recommendation.

    Attributes: run_dir, cfg (the run's RunConfig), model (the scorer: one network, or the members'
    average for adarec-dual; it has user_query(input_ids) and item_table(), adarec/models/
    scoring.py), device, best_epoch, num_items, sequences (the run's data file as the run read
    it: adarec.data.UserSequences). Item ids are the ids the model numbers, 1..num_items: the
    data file's own for a line-format file (unless data filters renumbered them:
    sequences.item_ids then maps back), first-appearance numbers for a RecBole .inter file.
    """

    def __init__(self, served, batch_size: int = 1024):
        self.served = served
        self.batch_size = int(batch_size)
        self._table: torch.Tensor | None = None
        seqs = served.sequences
        self._user_rows = UserRows(seqs.user_ids, seqs.source)
        # Generated items before an augmented file's sequences are model input, not history.
        self._real_start = int(served.cfg.data.augmented_prefix)

    def __repr__(self) -> str:
        return (f"TrainedRun({str(self.run_dir)!r}, model={self.cfg.model.name}, best_epoch={self.best_epoch}, "
                f"users={len(self.sequences)}, items={self.num_items}, device={self.device})")

    run_dir = property(lambda self: self.served.run_dir)
    cfg = property(lambda self: self.served.cfg)
    model = property(lambda self: self.served.model)
    device = property(lambda self: self.served.device)
    best_epoch = property(lambda self: self.served.best_epoch)
    num_items = property(lambda self: self.served.num_items)
    sequences = property(lambda self: self.served.sequences)

    @property
    def user_ids(self) -> np.ndarray:
        """The data file's user ids, in file order."""
        return self.sequences.user_ids

    def history(self, user_id: int) -> np.ndarray:
        """A data-file user's whole sequence (item ids, oldest first)."""
        row = int(self._rows([user_id])[0])
        return self.sequences.sequence(row).copy()

    def _rows(self, user_ids) -> np.ndarray:
        """Row of each file user id; an AdarecError names the first unknown one."""
        return self._user_rows(user_ids)

    @torch.no_grad()
    def _item_table(self) -> torch.Tensor:
        if self._table is None:
            self._table = self.model.item_table()
        return self._table

    def _as_histories(self, histories):
        from adarec.serving.queries import as_histories

        histories = list(histories)
        if histories and isinstance(histories[0], (int, np.integer)):
            histories = [histories]             # one history given as a flat list
        return as_histories(histories, self.num_items)

    @torch.no_grad()
    def _scores(self, items: np.ndarray, ends: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
        """float32 [B, num_items + 1] on the model's device, column 0 (padding) -inf."""
        from adarec.models.scoring import inner_product_scores
        from adarec.serving.queries import padded_inputs

        table = self._item_table()
        out = []
        for start in range(0, len(ends), self.batch_size):
            stop = start + self.batch_size
            inputs = padded_inputs(items, ends[start:stop], lengths[start:stop], self.served.keep,
                                   self.served.batch_width(lengths[start:stop])).to(self.device)
            out.append(inner_product_scores(self.model.user_query(inputs), table)[:, :self.num_items + 1])
        scores = torch.cat(out) if out else torch.zeros(0, self.num_items + 1, device=self.device)
        never = [i for i in getattr(self.model, "never_rank", (0,)) if 0 <= i <= self.num_items]
        scores[:, never] = -torch.inf
        return scores

    def score(self, histories) -> torch.Tensor:
        """Scores of every item after each history (lists of item ids, oldest first; one flat list
        is one history): float32 [B, num_items + 1] on the CPU, column i scoring item i, column 0
        (padding) -inf. The model reads each history's last data.max_len items (shorten_seq_to
        under the sparse setting), left-padded exactly as the split's inputs are, so a user's
        sequence without its last item scores as the run's test evaluation scored it."""
        items, ends, lengths = self._as_histories(histories)
        return self._scores(items, ends, lengths).cpu()

    def score_users(self, user_ids) -> torch.Tensor:
        """score() of data-file users' whole sequences (what comes after their last item)."""
        seqs = self.sequences
        rows = self._rows([user_ids] if isinstance(user_ids, (int, np.integer)) else user_ids)
        ends = seqs.offsets[rows + 1]
        return self._scores(seqs.items, ends, ends - seqs.offsets[rows]).cpu()

    def recommend(self, histories, k: int = 20, exclude_seen: bool = True):
        """Top-k items after each history, best first: a list of adarec.serving.Recommendation
        (items int64, scores float32); with exclude_seen (default), none from the history."""
        items, ends, lengths = self._as_histories(histories)
        seen = [items[e - n:e] for e, n in zip(ends, lengths, strict=True)]
        return self._top_k(self._scores(items, ends, lengths), seen if exclude_seen else None, k)

    def recommend_users(self, user_ids, k: int = 20, exclude_seen: bool = True):
        """recommend() for data-file users after their whole sequence (by their file ids)."""
        seqs = self.sequences
        rows = self._rows([user_ids] if isinstance(user_ids, (int, np.integer)) else user_ids)
        starts, ends = seqs.offsets[rows], seqs.offsets[rows + 1]
        seen = [seqs.items[s + self._real_start:e] for s, e in zip(starts, ends, strict=True)]
        return self._top_k(self._scores(seqs.items, ends, ends - starts), seen if exclude_seen else None, k)

    def _top_k(self, scores: torch.Tensor, seen, k: int):
        from adarec.serving.recommender import Recommendation, check_k

        k = check_k(k)
        if seen is not None:
            for row, history in enumerate(seen):
                scores[row, torch.as_tensor(np.unique(history), device=scores.device)] = -torch.inf
        top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        out = []
        for values, ids in zip(top.values.cpu().numpy(), top.indices.cpu().numpy(), strict=True):
            keep = np.isfinite(values)         # fewer than k items outside the history
            out.append(Recommendation(ids[keep].astype(np.int64), values[keep].astype(np.float32)))
        return out


def load_run(run_dir: str | Path, device: str = "auto", batch_size: int = 1024) -> TrainedRun:
    """The trained run in run_dir (its config.yaml and best_model.pt) on `device` (auto: CUDA when
    present, else the CPU), ready to score and recommend (TrainedRun). An AdarecError names what
    is missing (no such folder, no weights yet) or what does not fit."""
    from adarec.serving.served_run import load_served_run

    if batch_size < 1:
        raise AdarecError(f"batch_size must be >= 1, got {batch_size}")
    return TrainedRun(load_served_run(Path(run_dir), device, action="load"), batch_size)
