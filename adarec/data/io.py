"""Reading user interaction sequences from disk.

Two formats are understood:

* the plain text format of the ELCRec / CoSeRec data files (any suffix except ``.inter``): one
  line per user, ``user_id item item ...`` in time order;
* RecBole atomic ``.inter`` files (tab separated, ``name:type`` header), grouped by user and
  ordered by timestamp.

Every problem with a file raises :class:`~adarec.errors.DataError` whose message starts with
``"{path}:{lineno}: "`` (or ``"{path}: "`` for whole-file problems), so the CLI can print it as is.

The interaction-count filters (``min_user_items``, ``min_item_users``: data.min_user_items and
data.min_item_users, adarec/data/filters.py) apply right after reading. Without them a user with
fewer than MIN_ITEMS items is an error (the leave-one-out split needs three); with either of them
set, short users are read and whatever the filters leave must then have MIN_ITEMS items.
"""

from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adarec.errors import DataError

__all__ = ["MAX_ID", "MIN_ITEMS", "UserSequences", "read_sequences"]

#: Largest id accepted in a file; ids are later held in int32-friendly embedding tables.
MAX_ID = 2**31 - 1
#: A user needs one item each for train input, valid target and test target.
MIN_ITEMS = 3

_INT_TOKEN = re.compile(r"[+-]?[0-9]+\Z")
_INTER_REQUIRED = ("user_id", "item_id", "timestamp")


@dataclass
class UserSequences:
    """All users' item sequences in CSR layout (items concatenated, user u at offsets[u]:[u+1])."""

    items: np.ndarray
    offsets: np.ndarray
    user_ids: np.ndarray
    num_items: int
    source: str
    item_ids: np.ndarray | None = None
    """When the data filters renumbered the items (adarec/data/filters.py): the file's id of item
    i + 1 at index i (for a .inter file, its number by first appearance). None: items carry the
    ids they were read with."""

    def __len__(self) -> int:
        """Number of users."""
        return len(self.offsets) - 1

    def sequence(self, u: int) -> np.ndarray:
        """Items of user index ``u`` (0-based row, not the file's user id), oldest first."""
        return self.items[self.offsets[u] : self.offsets[u + 1]]

    def lengths(self) -> np.ndarray:
        """Sequence length of every user, int64 [U]."""
        return np.diff(self.offsets)


def read_sequences(path: str | os.PathLike, max_users: int | None = None, min_user_items: int = 0,
                   min_item_users: int = 0) -> UserSequences:
    """Read a sequence file (``.inter`` -> RecBole atomic format, anything else -> one line per user).

    ``max_users`` keeps only the first ``max_users`` users (file order). Reading stops there, so
    problems after the last kept user are not reported; ``num_items`` is the largest id among the
    kept users. ``min_user_items`` / ``min_item_users`` then filter users and items by their
    interaction counts until nothing changes (adarec/data/filters.py; one INFO line on the
    ``adarec.data`` logger counts what was dropped); both 0 (the default) filter nothing.
    """
    if max_users is not None and max_users < 1:
        raise ValueError(f"max_users must be >= 1 or None, got {max_users}")
    filtering = bool(min_user_items or min_item_users)
    seqs = _read_file(path, max_users, 0 if filtering else MIN_ITEMS)
    if not filtering:
        return seqs
    from adarec.data.filters import apply_filters

    return apply_filters(seqs, int(min_user_items), int(min_item_users), MIN_ITEMS)


def _short_user(where: str, user, count: int) -> str:
    return (f"{where}: user {user} has {count} items; at least {MIN_ITEMS} are needed (train/valid/test); "
            f"drop such users with --set data.min_user_items={MIN_ITEMS}")


def _read_file(path: str | os.PathLike, max_users: int | None, min_items: int) -> UserSequences:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{p}: cannot be read ({e.strerror})") from None
    if p.suffix == ".inter":
        return _read_inter(p, text, max_users, min_items)
    return _read_lines(p, text, max_users, min_items)


def _bad_token(tokens: list[str]) -> str:
    """First token that is not a plain ASCII integer (int() alone would accept '1_0' or '١')."""
    for t in tokens:
        if not (t.isascii() and _INT_TOKEN.match(t)):
            return t
    return ""


def _read_lines(p: Path, text: str, max_users: int | None, min_items: int = MIN_ITEMS) -> UserSequences:
    items: list[int] = []
    offsets: list[int] = [0]
    user_ids: list[int] = []
    first_line: dict[int, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        # Fast path: map(int) is C speed; the strict check only runs on lines that look odd.
        bad = _bad_token(tokens) if (not line.isascii() or "_" in line) else ""
        if not bad:
            try:
                vals = list(map(int, tokens))
            except ValueError:
                bad = _bad_token(tokens)
        if bad:
            raise DataError(f"{p}:{lineno}: token {bad!r} is not an integer id")
        uid, seq = vals[0], vals[1:]
        if uid < 0 or uid > MAX_ID:
            raise DataError(f"{p}:{lineno}: user id {uid} out of range; user ids must be in "
                            f"0..{MAX_ID}")
        if uid in first_line:
            raise DataError(f"{p}:{lineno}: user id {uid} appears again "
                            f"(first on line {first_line[uid]})")
        first_line[uid] = lineno
        if len(seq) < min_items:
            raise DataError(_short_user(f"{p}:{lineno}", uid, len(seq)))
        lo, hi = (min(seq), max(seq)) if seq else (1, 1)
        if lo < 1:
            raise DataError(f"{p}:{lineno}: item id {lo} out of range; item ids start at 1")
        if hi > MAX_ID:
            raise DataError(f"{p}:{lineno}: item id {hi} out of range; item ids must be "
                            f"<= {MAX_ID}")
        items.extend(seq)
        offsets.append(len(items))
        user_ids.append(uid)
        if max_users is not None and len(user_ids) >= max_users:
            break
    if not user_ids:
        raise DataError(f"{p}: no users")
    arr = np.array(items, dtype=np.int64)
    return UserSequences(items=arr, offsets=np.array(offsets, dtype=np.int64),
                         user_ids=np.array(user_ids, dtype=np.int64),
                         num_items=int(arr.max(initial=0)), source=str(p))


def _read_inter(p: Path, text: str, max_users: int | None, min_items: int = MIN_ITEMS) -> UserSequences:
    """RecBole atomic file -> sequences.

    Users are numbered 1..U and items 1..N in order of first appearance in the file (raw row
    order, before sorting by time), counting only the kept users' rows so ids stay contiguous
    under ``max_users``. Each user's rows are sorted by timestamp, ties kept in file order.
    """
    # QUOTE_NONE: RecBole never quotes, and a stray quote must not swallow following rows.
    reader = csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE)
    header: list[str] | None = None
    col: dict[str, int] = {}
    user_tok: list[str] = []
    item_tok: list[str] = []
    stamps: list[float] = []
    linenos: list[int] = []
    for row in reader:
        lineno = reader.line_num
        if not any(f.strip() for f in row):
            continue
        if header is None:
            header = [f.split(":", 1)[0].strip() for f in row]
            col = {name: i for i, name in reversed(list(enumerate(header)))}
            missing = [c for c in _INTER_REQUIRED if c not in col]
            if missing:
                raise DataError(f"{p}:{lineno}: missing required column(s) {', '.join(missing)}; "
                                f"columns found: {', '.join(header)}")
            continue
        if len(row) != len(header):
            raise DataError(f"{p}:{lineno}: {len(row)} fields, the header has {len(header)}")
        ts_text = row[col["timestamp"]].strip()
        try:
            ts = float(ts_text)
        except ValueError:
            ts = math.nan
        if not math.isfinite(ts):
            raise DataError(f"{p}:{lineno}: timestamp {ts_text!r} is not a finite number")
        user_tok.append(row[col["user_id"]].strip())
        item_tok.append(row[col["item_id"]].strip())
        stamps.append(ts)
        linenos.append(lineno)
    if not user_tok:
        raise DataError(f"{p}: no users")

    user_index: dict[str, int] = {}
    for t in user_tok:
        user_index.setdefault(t, len(user_index))
    uidx = np.fromiter((user_index[t] for t in user_tok), dtype=np.int64, count=len(user_tok))
    keep_rows = np.arange(len(user_tok))
    if max_users is not None and len(user_index) > max_users:
        keep_rows = np.flatnonzero(uidx < max_users)
        uidx = uidx[keep_rows]
    item_index: dict[str, int] = {}
    for r in keep_rows:
        item_index.setdefault(item_tok[r], len(item_index) + 1)
    iid = np.fromiter((item_index[item_tok[r]] for r in keep_rows), dtype=np.int64,
                      count=len(keep_rows))
    ts_arr = np.asarray(stamps, dtype=np.float64)[keep_rows]
    # lexsort is stable: rows sort by user, then time, and ties keep their file order.
    order = np.lexsort((ts_arr, uidx))
    num_users = int(uidx.max()) + 1
    counts = np.bincount(uidx, minlength=num_users)
    short = np.flatnonzero(counts < min_items)
    if len(short):
        u = int(short[0])
        first = linenos[int(keep_rows[np.argmax(uidx == u)])]
        tok = next(t for t, i in user_index.items() if i == u)
        raise DataError(_short_user(f"{p}:{first}", tok, int(counts[u])))
    offsets = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return UserSequences(items=iid[order], offsets=offsets,
                         user_ids=np.arange(1, num_users + 1, dtype=np.int64),
                         num_items=len(item_index), source=str(p))
