"""`Recommender`: top-k items for the run's users or for new histories, through the faiss index.

Per batch of users: the model computes their queries (user_query, float32), the index returns
the best k + h candidates (h = the batch's largest number of distinct history items), the
history items are dropped and the first k kept. The history can remove at most h of a row's
candidates, so k remain whenever the catalog has k items outside the history; when it has fewer,
all of them are returned (shorter rows). An ivf index can also return fewer than asked: its
probed lists may hold fewer candidates (docs/serving.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from adarec import faiss_index
from adarec.errors import AdarecError

from .export import read_export
from .queries import UserRows, as_histories, padded_inputs
from .served_run import ServedRun, load_served_run


class Recommendation(NamedTuple):
    """One user's recommendations, best first: item ids (int64) and their scores (float32)."""

    items: np.ndarray
    scores: np.ndarray


def check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise AdarecError(f"--k must be an integer >= 1, got {k!r}")
    return int(k)


class Recommender:
    def __init__(self, served: ServedRun, index, record: dict, batch_size: int = 1024):
        if batch_size < 1:
            raise AdarecError(f"batch_size must be >= 1, got {batch_size}")
        self.served = served
        self.index = faiss_index.to_search_device(index)
        self.record = record
        self.batch_size = int(batch_size)
        seqs = served.sequences
        # Users are looked up by their file ids through one sorted copy (no per-user dict).
        self._user_rows = UserRows(seqs.user_ids, seqs.source)
        # Generated items before an augmented file's sequences are model input, not history.
        self._real_start = int(served.cfg.data.augmented_prefix)

    @classmethod
    def from_run(cls, run_dir, device: str = "auto", batch_size: int = 1024) -> Recommender:
        """The run's model (best weights, on `device`) with its exported index; an AdarecError
        when the run has no weights or its export is missing or stale."""
        served = load_served_run(Path(run_dir), device, action="serve")
        record, index = read_export(served)
        return cls(served, index, record, batch_size)

    @property
    def num_items(self) -> int:
        return self.served.num_items

    @property
    def user_ids(self) -> np.ndarray:
        return self.served.sequences.user_ids

    def user_rows(self, user_ids) -> np.ndarray:
        """Row of each file user id in the data file; an AdarecError names the first unknown one."""
        return self._user_rows(user_ids)

    def recommend(self, user_ids, k: int = 20) -> list[Recommendation]:
        """Top-k items for each of the data file's `user_ids` (their file ids), none from their history."""
        k = check_k(k)
        rows = self.user_rows([user_ids] if isinstance(user_ids, (int, np.integer)) else user_ids)
        seqs = self.served.sequences
        starts, ends = seqs.offsets[rows], seqs.offsets[rows + 1]
        histories = [seqs.items[s + self._real_start:e] for s, e in zip(starts, ends, strict=True)]
        return self._recommend(seqs.items, ends, ends - starts, histories, k)

    def recommend_histories(self, histories, k: int = 20) -> list[Recommendation]:
        """Top-k items after each new history (item ids oldest first), none from the history."""
        k = check_k(k)
        histories = list(histories)
        items, ends, lengths = as_histories(histories, self.num_items)
        starts = ends - lengths
        return self._recommend(items, ends, lengths, [items[s:e] for s, e in zip(starts, ends, strict=True)], k)

    def _recommend(self, items, ends, lengths, histories, k: int) -> list[Recommendation]:
        out: list[Recommendation] = []
        for start in range(0, len(histories), self.batch_size):
            stop = start + self.batch_size
            inputs = padded_inputs(items, ends[start:stop], lengths[start:stop], self.served.keep,
                                   self.served.batch_width(lengths[start:stop]))
            queries = self.served.queries(inputs)
            seen = [np.unique(h) for h in histories[start:stop]]
            count = min(k + max(len(s) for s in seen), self.num_items)
            scores, ids = faiss_index.search(self.index, queries, count)
            for row_scores, row_ids, row_seen in zip(scores, ids, seen, strict=True):
                # id 0: an empty slot of an ivf search.
                keep = (row_ids > 0) & ~np.isin(row_ids, row_seen, assume_unique=False)
                out.append(Recommendation(row_ids[keep][:k], row_scores[keep][:k]))
        return out
