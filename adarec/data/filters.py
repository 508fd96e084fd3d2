"""data.min_user_items / data.min_item_users: RecBole-style interaction-count filters (a k-core).

Applied to the sequences as read (after data.max_users), before the leave-one-out split. Each
round counts, over the interactions still kept, every user's interactions and every item's; an
interaction goes when its user has fewer than ``min_user_items`` or its item fewer than
``min_item_users``; rounds repeat until one drops nothing (dropping an item can make a user too
short, and the reverse), which is the largest subset in which both bounds hold: the same result
as RecBole's filter_by_inter_num. Counts are interactions, so an item a user repeats counts twice.
A bound of 0 filters nothing.

Users keep their ids (a subset of them remains). When any item id that appeared in the file has
no interaction left, the remaining items are renumbered 1..N in the order of their old ids, so
the catalog (embedding table) stays contiguous; ``UserSequences.item_ids`` then holds the old id
of each new one. With nothing dropped the ids are unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from adarec.errors import DataError

log = logging.getLogger("adarec.data")

__all__ = ["FilterReport", "kcore_filter"]


@dataclass(frozen=True)
class FilterReport:
    rounds: int
    users_before: int
    users_after: int
    items_before: int
    items_after: int
    interactions_before: int
    interactions_after: int
    reindexed: bool

    def describe(self, min_user_items: int, min_item_users: int) -> str:
        def dropped(before: int, after: int, what: str) -> str:
            return f"{before - after} of {before} {what}"

        text = (f"data filters (data.min_user_items={min_user_items}, data.min_item_users={min_item_users}, "
                f"{self.rounds} round{'s' if self.rounds != 1 else ''}): dropped "
                f"{dropped(self.users_before, self.users_after, 'users')}, "
                f"{dropped(self.items_before, self.items_after, 'items')}, "
                f"{dropped(self.interactions_before, self.interactions_after, 'interactions')}")
        if self.reindexed:
            text += f"; items renumbered 1..{self.items_after}"
        return text


def kcore_filter(seqs, min_user_items: int = 0, min_item_users: int = 0):
    """(filtered UserSequences, FilterReport); see the module docstring. ``seqs`` is returned
    as is when both bounds are 0."""
    from adarec.data.io import UserSequences

    for name, value in (("min_user_items", min_user_items), ("min_item_users", min_item_users)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    items = np.asarray(seqs.items, dtype=np.int64)
    offsets = np.asarray(seqs.offsets, dtype=np.int64)
    num_users = len(offsets) - 1
    lengths = np.diff(offsets)
    present = np.unique(items)
    if min_user_items == 0 and min_item_users == 0:
        report = FilterReport(0, num_users, num_users, len(present), len(present), len(items), len(items), False)
        return seqs, report
    user = np.repeat(np.arange(num_users, dtype=np.int64), lengths)
    size = int(items.max(initial=0)) + 1
    keep = np.ones(len(items), dtype=bool)
    rounds = 0
    while True:
        rounds += 1
        user_count = np.bincount(user[keep], minlength=num_users)
        item_count = np.bincount(items[keep], minlength=size)
        drop = keep & ((user_count[user] < min_user_items) | (item_count[items] < min_item_users))
        if not drop.any():
            break
        keep &= ~drop
    kept_items = items[keep]
    counts = np.bincount(user[keep], minlength=num_users)
    kept_users = counts > 0
    new_offsets = np.zeros(int(kept_users.sum()) + 1, dtype=np.int64)
    np.cumsum(counts[kept_users], out=new_offsets[1:])
    remaining = np.unique(kept_items)
    reindexed = len(remaining) < len(present)
    item_ids = getattr(seqs, "item_ids", None)
    num_items = int(seqs.num_items)
    if reindexed:
        kept_items = np.searchsorted(remaining, kept_items).astype(np.int64) + 1
        # The file's ids of the new ones (through an earlier renumbering, if any).
        item_ids = remaining if item_ids is None else np.asarray(item_ids)[remaining - 1]
        num_items = len(remaining)
    report = FilterReport(rounds, num_users, int(kept_users.sum()), len(present), len(remaining), len(items),
                          len(kept_items), reindexed)
    out = UserSequences(items=kept_items, offsets=new_offsets, user_ids=np.asarray(seqs.user_ids)[kept_users],
                        num_items=num_items, source=seqs.source, item_ids=item_ids)
    return out, report


def apply_filters(seqs, min_user_items: int, min_item_users: int, min_items: int):
    """kcore_filter, its one log line, and the checks after it: users left, each with at least
    ``min_items`` interactions (the split needs them; a DataError suggests the bound that drops
    the short ones)."""
    out, report = kcore_filter(seqs, min_user_items, min_item_users)
    bounds = f"data.min_user_items={min_user_items}, data.min_item_users={min_item_users}"
    log.info("%s", report.describe(min_user_items, min_item_users))
    if len(out) == 0:
        raise DataError(f"{seqs.source}: no users left after the data filters ({bounds})")
    n = out.lengths()
    if (n < min_items).any():
        u = int(np.argmax(n < min_items))
        raise DataError(f"{seqs.source}: user {int(out.user_ids[u])} has {int(n[u])} items after the data filters "
                        f"({bounds}); at least {min_items} are needed (train/valid/test): drop such users with "
                        f"--set data.min_user_items={min_items}")
    return out
