"""Data for a run: read the configured file once, split it, move the tensors to the device."""

from __future__ import annotations

import logging

import torch

from adarec.config import RunConfig, resolve_data_path
from adarec.data import build_split, read_sequences
from adarec.data.prefixes import expand_prefixes
from adarec.models import model_class

log = logging.getLogger("adarec.data")


def read_run_sequences(cfg: RunConfig):
    """The sequences of the configured data file as every consumer of a run reads them (training,
    `adarec evaluate`, serving, `adarec augment`): data.max_users first, then the interaction-count
    filters data.min_user_items / data.min_item_users (adarec/data/filters.py), so that item ids
    and the catalog size agree with the run's weights."""
    data = cfg.data
    return read_sequences(resolve_data_path(cfg), max_users=data.max_users,
                          min_user_items=getattr(data, "min_user_items", 0) or 0,
                          min_item_users=getattr(data, "min_item_users", 0) or 0)


def load_split(cfg: RunConfig, device: torch.device, training_rows: str | None = None):
    """The split on ``device``. training_rows: users (one row per user, a target at every
    position) or prefixes (one row per training target, adarec/data/prefixes.py); None: what
    model.name trains on (its class attribute ``training_rows``, default users)."""
    if training_rows is None:
        training_rows = getattr(model_class(cfg.model.name), "training_rows", "users")
    path = resolve_data_path(cfg)
    seqs = read_run_sequences(cfg)
    split = build_split(seqs, cfg.data.max_len, cfg.data.shorten_seq_to, cfg.data.augmented_prefix)
    if training_rows == "prefixes":
        split = expand_prefixes(seqs, split, cfg.data.augmented_prefix)
    elif training_rows != "users":
        raise ValueError(f"training_rows must be 'users' or 'prefixes', got {training_rows!r}")
    log.info("data %s: %d users, %d items, %d training rows, max_len %d", path, len(seqs),
             split.num_items, split.train_input.shape[0], split.max_len)
    return split.to(device)
