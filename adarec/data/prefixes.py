"""Prefix expansion: one training row per (user, target), as DiffuRec trains (docs/peers.md).

A user with items s[0..n-1] trains on the targets s[1..n-3] (the last two items are validation
and test). Row-per-user training scores every position of one row; DiffuRec's model reads the
whole history without a causal mask, so each target needs its own row: the left-padded last
``max_len`` items before it, with the target in the last column of ``train_target`` (0
elsewhere). Beauty gives 131,413 rows instead of 22,363. The prefixes come from the full
sequences, so a long user's early targets keep their own (shorter) history.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from adarec.data.io import MIN_ITEMS, UserSequences
from adarec.data.split import SplitData, right_aligned

__all__ = ["expand_prefixes"]


def expand_prefixes(seqs: UserSequences, split: SplitData, augmented_prefix: int = 0) -> SplitData:
    """``split`` with its training rows replaced by one row per training target.

    ``augmented_prefix = a``: targets that are generated items (index < a) get no row, as in
    `build_split`. Validation and test tensors are shared with ``split``.
    """
    items = np.asarray(seqs.items, dtype=np.int64)
    offsets = np.asarray(seqs.offsets, dtype=np.int64)
    n = np.diff(offsets)
    first = max(1, int(augmented_prefix))
    per_user = np.maximum(n - (MIN_ITEMS - 1) - first, 0)      # targets j = first .. n-3
    user = np.repeat(np.arange(len(n), dtype=np.int64), per_user)
    # j runs first, first + 1, ... within each user's block of rows.
    block_start = np.repeat(np.cumsum(per_user) - per_user, per_user)
    j = first + np.arange(len(user), dtype=np.int64) - block_start
    width = split.max_len
    start = offsets[user]
    inputs = right_aligned(items, start + j, np.minimum(j, width), width)
    targets = np.zeros_like(inputs)
    targets[:, -1] = items[start + j]
    return dataclasses.replace(split, train_input=torch.from_numpy(inputs).to(split.train_input.device),
                               train_target=torch.from_numpy(targets).to(split.train_input.device),
                               train_user=torch.from_numpy(user).to(split.train_input.device))
