"""Leave-one-out split into padded train / valid / test tensors (docs/method.md section 4).

For a user sequence s (n >= 3 items, oldest first):

* train: input s[:-3], target s[1:-2] (the item after each input position), last ``max_len``;
* valid: input s[:-2] -> s[-2]; test: input s[:-1] -> s[-1];
* exclusion histories: all of s[:-2] (valid) and s[:-1] (test), not truncated;
* sparse setting ``shorten_seq_to = k``: every input (and history) is cut to its last k items
  and the padded length becomes k + 3.

Inputs are left-padded with 0 so the newest item sits at column L-1. Everything is built with
vectorised numpy gathers over the CSR arrays (no per-user Python loop).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from adarec.data.io import MIN_ITEMS, UserSequences
from adarec.errors import DataError

__all__ = ["SplitData", "build_split"]


@dataclass
class SplitData:
    """Padded int64 tensors of one dataset split; see the module docstring for the layout."""

    num_items: int
    max_len: int
    train_input: torch.Tensor
    train_target: torch.Tensor
    train_user: torch.Tensor
    valid_input: torch.Tensor
    valid_target: torch.Tensor
    valid_history: torch.Tensor
    test_input: torch.Tensor
    test_target: torch.Tensor
    test_history: torch.Tensor
    seen_sorted: torch.Tensor
    seen_count: torch.Tensor

    def to(self, device: torch.device | str) -> SplitData:
        """A copy with every tensor on ``device`` (tensors already there are shared)."""
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **moved)

    def num_users(self) -> int:
        """Number of users (rows of the valid / test tensors)."""
        return int(self.valid_input.shape[0])


def right_aligned(items: np.ndarray, end: np.ndarray, count: np.ndarray, width: int) -> np.ndarray:
    """Row u holds items[end[u]-count[u] : end[u]] in its last count[u] columns, 0 elsewhere.

    ``items`` must be non-empty; out-of-row sources are clipped and then masked to 0.
    """
    col = np.arange(width, dtype=np.int64)
    src = end[:, None] - width + col[None, :]
    valid = col[None, :] >= (width - count)[:, None]
    return np.where(valid, items[np.clip(src, 0, len(items) - 1)], 0)


def _seen_sorted(items: np.ndarray, offsets: np.ndarray, num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Each user's unique items ascending, padded with a sentinel larger than any item."""
    num_users = len(offsets) - 1
    user = np.repeat(np.arange(num_users, dtype=np.int64), np.diff(offsets))
    # One global unique over (user, item) keys sorts every row at once.
    keys = np.unique(user * (num_items + 1) + items)
    ku, ki = keys // (num_items + 1), keys % (num_items + 1)
    count = np.bincount(ku, minlength=num_users).astype(np.int64)
    width = int(count.max())
    start = np.zeros(num_users, dtype=np.int64)
    np.cumsum(count[:-1], out=start[1:])
    # Sentinel > N + S so that padded a_i = h_i - 1 - i in sample_negatives stays above any r < N.
    sentinel = 2 * num_items + width + 1
    out = np.full((num_users, width), sentinel, dtype=np.int64)
    out[ku, np.arange(len(keys)) - start[ku]] = ki
    return out, count


def input_layout(max_len: int = 50, shorten_seq_to: int | None = None) -> tuple[int, int]:
    """(keep, width): the history items an input row holds and the row's columns. Under the
    sparse setting shorten_seq_to = k rows keep k items in k + 3 columns (the width the model's
    position table is built for); otherwise both are max_len. Every builder of model inputs
    (the split, the augmentation file, serving) takes its layout from here."""
    if shorten_seq_to is not None:
        if isinstance(shorten_seq_to, bool) or not isinstance(shorten_seq_to, (int, np.integer)) \
                or shorten_seq_to < 1:
            raise ValueError(f"shorten_seq_to must be an integer >= 1 or None, got {shorten_seq_to!r}")
        return int(shorten_seq_to), int(shorten_seq_to) + 3
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 1:
        raise ValueError(f"max_len must be an integer >= 1, got {max_len!r}")
    return int(max_len), int(max_len)


def build_split(seqs: UserSequences, max_len: int = 50, shorten_seq_to: int | None = None,
                augmented_prefix: int = 0) -> SplitData:
    """Build the leave-one-out split of ``seqs`` (see module docstring).

    ``max_len`` is ignored when ``shorten_seq_to`` is given (the length is then k + 3).
    ``augmented_prefix = a``: each sequence starts with a generated items (an `adarec augment`
    file, DiffuASR). They stay in the inputs, but no training target is a generated item and the
    evaluation histories hold only real items.
    """
    keep, width = input_layout(max_len, shorten_seq_to)
    items = np.asarray(seqs.items, dtype=np.int64)
    offsets = np.asarray(seqs.offsets, dtype=np.int64)
    n = np.diff(offsets)
    if len(n) == 0:
        raise DataError(f"{seqs.source}: no users")
    if (n < MIN_ITEMS).any():
        u = int(np.argmax(n < MIN_ITEMS))
        raise DataError(f"{seqs.source}: user {int(seqs.user_ids[u])} has {int(n[u])} items; at "
                        f"least {MIN_ITEMS} are needed (train/valid/test)")
    if augmented_prefix and (n < MIN_ITEMS + augmented_prefix).any():
        u = int(np.argmax(n < MIN_ITEMS + augmented_prefix))
        raise DataError(f"{seqs.source}: user {int(seqs.user_ids[u])} has {int(n[u])} items, fewer than "
                        f"data.augmented_prefix ({augmented_prefix}) generated + {MIN_ITEMS} real ones")
    if len(items) and (items.min() < 1 or items.max() > seqs.num_items):
        raise DataError(f"{seqs.source}: item ids must lie in 1..{seqs.num_items}")
    end = offsets[1:]

    def padded(cut: int, length_cap: int, cols: int, shift: int = 0, skip: int = 0) -> np.ndarray:
        # Prefix s[:-cut] (optionally shifted right by `shift` for targets), last length_cap items,
        # never its first `skip` items.
        return right_aligned(items, end - cut + shift, np.minimum(n - cut - skip, length_cap), cols)

    a = int(augmented_prefix)
    train_rows = np.flatnonzero(n > MIN_ITEMS)
    train_in = padded(3, keep, width)[train_rows]
    # The target in column c of a row is item s[j] with j = n - 2 - width + c; generated ones
    # (j < a) are not targets.
    train_tg = padded(3, keep, width, shift=1, skip=max(a - 1, 0))[train_rows]
    valid_in, test_in = padded(2, keep, width), padded(1, keep, width)
    if shorten_seq_to is not None:
        valid_hist = padded(2, keep, int(np.minimum(n - 2 - a, keep).max()), skip=a)
        test_hist = padded(1, keep, int(np.minimum(n - 1 - a, keep).max()), skip=a)
    else:
        valid_hist = padded(2, int(n.max()), int((n - 2 - a).max()), skip=a)
        test_hist = padded(1, int(n.max()), int((n - 1 - a).max()), skip=a)
    seen, seen_count = _seen_sorted(items, offsets, int(seqs.num_items))

    t = torch.from_numpy
    return SplitData(
        num_items=int(seqs.num_items), max_len=width,
        train_input=t(np.ascontiguousarray(train_in)), train_target=t(np.ascontiguousarray(train_tg)),
        train_user=t(train_rows.astype(np.int64)),
        valid_input=t(valid_in), valid_target=t(items[end - 2].copy()), valid_history=t(valid_hist),
        test_input=t(test_in), test_target=t(items[end - 1].copy()), test_history=t(test_hist),
        seen_sorted=t(seen), seen_count=t(seen_count),
    )
