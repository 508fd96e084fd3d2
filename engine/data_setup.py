"""Data for a run: read the configured file once, split it, move the tensors to the device."""

from __future__ import annotations

import logging

import torch

from adarec.config import RunConfig, resolve_data_path
from adarec.data import build_split, read_sequences

log = logging.getLogger("adarec.data")


def load_split(cfg: RunConfig, device: torch.device):
    path = resolve_data_path(cfg)
    seqs = read_sequences(path, max_users=cfg.data.max_users)
    split = build_split(seqs, cfg.data.max_len, cfg.data.shorten_seq_to)
    log.info("data %s: %d users, %d items, %d training rows, max_len %d", path, len(seqs),
             split.num_items, split.train_input.shape[0], split.max_len)
    return split.to(device)
