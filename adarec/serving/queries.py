"""Histories -> the model's input rows and the items a recommendation must not repeat.

A served user's history is their whole sequence in the run's data file (train, valid and test
items alike). The query reads its last `keep` items, right-aligned and left-padded with 0 in a
row of `width` columns: exactly how the split lays out its test inputs (adarec/data/split.py),
whose layout (input_layout) and gather (right_aligned) are reused here rather than written twice.
"""

from __future__ import annotations

import numpy as np
import torch

from adarec.data.split import right_aligned
from adarec.errors import AdarecError


def padded_inputs(items: np.ndarray, ends: np.ndarray, lengths: np.ndarray, keep: int, width: int) -> torch.Tensor:
    """int64 [B, width]: row b holds the last min(lengths[b], keep) items of items[:ends[b]]
    (the sequence ending at ends[b]) in its last columns, 0 before them."""
    ends = np.asarray(ends, dtype=np.int64)
    count = np.minimum(np.asarray(lengths, dtype=np.int64), keep)
    return torch.from_numpy(np.ascontiguousarray(right_aligned(items, ends, count, width)))


def as_histories(histories, num_items: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lists of item ids (oldest first) -> CSR (items, ends, lengths); an AdarecError names an
    empty history or an id outside the catalog."""
    arrays = []
    for i, history in enumerate(histories):
        try:
            arr = np.asarray(list(history), dtype=np.int64)
        except (TypeError, ValueError, OverflowError):
            raise AdarecError(f"history {i}: item ids must be integers, got {history!r}") from None
        if arr.ndim != 1 or arr.size == 0:
            raise AdarecError(f"history {i}: needs at least one item id")
        bad = arr[(arr < 1) | (arr > num_items)]
        if bad.size:
            raise AdarecError(f"history {i}: item id {int(bad[0])} is not in the catalog (ids 1..{num_items})")
        arrays.append(arr)
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    items = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    return items, np.cumsum(lengths), lengths


class UserRows:
    """The data file's user ids -> their rows in the file (the sequences' order)."""

    def __init__(self, user_ids: np.ndarray, source: str):
        self._order = np.argsort(user_ids, kind="stable")
        self._sorted_ids = np.asarray(user_ids)[self._order]
        self._source = source

    def __call__(self, user_ids) -> np.ndarray:
        """Row of each file user id; an AdarecError names the first unknown (or non-integer) one."""
        ids = []
        for uid in user_ids:
            if isinstance(uid, bool) or not isinstance(uid, (int, np.integer)):
                raise AdarecError(f"user id {uid!r} is not an integer")
            ids.append(int(uid))
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self._sorted_ids, ids).clip(max=max(len(self._sorted_ids) - 1, 0))
        found = self._sorted_ids[pos] == ids
        if not found.all():
            missing = int(ids[np.argmin(found)])
            raise AdarecError(f"user {missing} is not in the run's data file {self._source} "
                              f"({len(self._sorted_ids)} users)")
        return self._order[pos]
