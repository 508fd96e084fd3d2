"""A trained run loaded for serving: its config, its data file's sequences and its model.

The model is rebuilt exactly as `adarec evaluate` rebuilds it (adarec/engine/run_model.py). The
data file is read as the run read it (same data.max_users), because the served users, their
histories and the catalog size (the shape of the weights) all come from it; the split itself is
not built, a query only needs each user's raw sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adarec.config import RunConfig
from adarec.data.io import UserSequences
from adarec.data.length_groups import bucket_width
from adarec.data.split import input_layout
from adarec.engine.data_setup import read_run_sequences
from adarec.engine.distributed import pick_device
from adarec.engine.run_model import load_model, read_run_config
from adarec.errors import AdarecError
from adarec.models import model_class


@dataclass
class ServedRun:
    run_dir: Path
    cfg: RunConfig
    sequences: UserSequences
    model: torch.nn.Module
    device: torch.device
    weights_path: Path
    best_epoch: int
    keep: int        # items of a history the query reads
    width: int       # columns of the model's input rows

    @property
    def num_items(self) -> int:
        return int(self.sequences.num_items)

    def batch_width(self, lengths: np.ndarray) -> int:
        """Columns of a query batch whose histories have these lengths: trimmed to the longest
        (data.width_buckets) unless the model reads padding; the queries are the same either way."""
        buckets = self.cfg.data.width_buckets if getattr(self.model, "trims_batches", True) else None
        return bucket_width(int(np.minimum(lengths, self.keep).max(initial=0)), buckets, self.width)

    @torch.no_grad()
    def item_vectors(self) -> np.ndarray:
        """float32 [N, D]: the rows 1..N of the model's item table (row i = item i + 1)."""
        table = self.model.item_table()
        return np.ascontiguousarray(table[1:self.num_items + 1].float().cpu().numpy())

    @torch.no_grad()
    def queries(self, inputs: torch.Tensor) -> np.ndarray:
        """float32 [B, D]: the model's user_query of left-padded input rows [B, width]."""
        return np.ascontiguousarray(self.model.user_query(inputs.to(self.device)).float().cpu().numpy())


def load_served_run(run_dir: Path, device: str = "auto", action: str = "serve") -> ServedRun:
    """The run in `run_dir` with its model in eval mode on `device` (auto: CUDA when present)."""
    run_dir = Path(run_dir)
    # The kernels the run trained with may not run here (a fused run served on a CPU); auto picks
    # what can, and every backend computes the same queries.
    cfg, weights_path = read_run_config(run_dir, ("kernels.backend=auto",), action)
    if getattr(model_class(cfg.model.name), "eval_view", None) is not None:
        # DiffuASR generates the items before a sequence (an augmented data file), it does not
        # rank the next item.
        raise AdarecError(f"{run_dir}: model.name={cfg.model.name} is a data generator, not a recommender; "
                          "serve a run trained on its augmented file instead")
    if device not in ("auto", "cpu", "cuda"):
        raise AdarecError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise AdarecError("device cuda: no CUDA device is available (use auto or cpu)")
    dev = pick_device(device)
    # As the run read it: data.max_users, then the data filters (the items the weights number).
    seqs = read_run_sequences(cfg)
    keep, width = input_layout(cfg.data.max_len, cfg.data.shorten_seq_to)
    loaded = load_model(cfg, weights_path, int(seqs.num_items), width, dev)
    return ServedRun(run_dir, cfg, seqs, loaded.model, dev, weights_path, loaded.best_epoch, keep, width)
