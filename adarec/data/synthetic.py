"""Synthetic interaction files for catalogues of any size (a million items and more).

The public data sets top out at tens of thousands of items; scoring, sampling and memory at a
million items need a file of that size whose sequences still carry a signal a next-item model can
learn. This module writes one in the format :func:`adarec.data.io.read_sequences` reads: one line
per user, ``user_id item item ...``, oldest first, ids from 1.

How a file is drawn (every draw from one ``numpy`` PCG64 stream seeded by ``seed``, in a fixed
order, so a seed gives the same bytes with a given numpy, whose version the sidecar records):

* **Popularity.** Item ranks follow Zipf's law, weight ``rank ** -zipf``, and a random permutation
  assigns ranks to ids, so popularity is not id order. ``zipf = 0`` is uniform.
* **Successors.** Every item gets ``successors`` fixed successor items, drawn once from the same
  popularity law (an item is never its own successor). Because successors are popularity draws,
  the expected share of every item stays close to ``rank ** -zipf`` whatever ``follow`` is: the
  sequential structure does not bend the popularity curve the exponent describes.
* **Sequences.** A user's first item is a popularity draw. Each next item is, with probability
  ``follow``, one of the previous item's successors (uniformly), otherwise a popularity draw. A
  model that learns "what follows what" can therefore predict roughly ``follow`` of the next items
  from a short list, where popularity alone gets only the head's share.
* **Lengths.** ``min_length - 1 + Geometric(1 / (mean_length - min_length + 1))``, cut at
  ``max_length``: mean ``mean_length`` before the cut, a long tail like real logs.
* **The largest id.** ``num_items`` of a file is its largest id, so the last user's first item
  (otherwise a popularity draw) is always item ``items``; the rest of that sequence follows from
  it like any other.

Generation is vectorised: one loop over positions, each step a handful of numpy operations over
all users still active at that position. Writing turns the ids into ASCII digits with numpy too.
The data file is written atomically (temp file, fsync, rename) and ``<output>.json`` next to it
records the parameters, simple statistics and the file's SHA-256, so a run can say what it
trained on.

Command line::

    python -m adarec.data.synthetic --items 1000000 --users 200000 --output data/synthetic_1m.txt
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from adarec.data.io import MAX_ID, MIN_ITEMS, UserSequences
from adarec.engine.atomic_io import atomic_write, atomic_write_text, os_error_text
from adarec.errors import AdarecError, ConfigError, DataError

__all__ = ["SyntheticSpec", "check_output", "format_lines", "generate", "generate_spec", "write", "write_synthetic"]

PROG = "python -m adarec.data.synthetic"
#: Users formatted per block when writing: bounds the temporary arrays (about 40 bytes per id).
_WRITE_BLOCK_USERS = 65536
#: Rounds of redrawing an item that drew itself as a successor before the fallback (next id).
_SELF_REDRAWS = 64


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """What to generate; field names are the command-line flags with '-' for '_'."""

    items: int
    users: int
    seed: int = 0
    mean_length: float = 10.0
    min_length: int = MIN_ITEMS
    max_length: int = 200
    zipf: float = 1.0
    follow: float = 0.7
    successors: int = 4

    def check(self) -> None:
        """Raise ConfigError naming the first bad parameter (by its command-line flag)."""
        if self.items < 2:
            raise ConfigError(f"--items must be at least 2, got {self.items}")
        if self.items > MAX_ID:
            raise ConfigError(f"--items must be at most {MAX_ID}, got {self.items}")
        if self.users < 1:
            raise ConfigError(f"--users must be at least 1, got {self.users}")
        if self.users > MAX_ID:
            raise ConfigError(f"--users must be at most {MAX_ID}, got {self.users}")
        if self.seed < 0:
            raise ConfigError(f"--seed must be >= 0, got {self.seed}")
        if self.min_length < MIN_ITEMS:
            raise ConfigError(f"--min-length must be at least {MIN_ITEMS} (train/valid/test items), "
                              f"got {self.min_length}")
        if self.max_length < self.min_length:
            raise ConfigError(f"--max-length ({self.max_length}) must be >= --min-length ({self.min_length})")
        if not (math.isfinite(self.mean_length) and self.min_length <= self.mean_length <= self.max_length):
            raise ConfigError(f"--mean-length must lie between --min-length ({self.min_length}) and "
                              f"--max-length ({self.max_length}), got {self.mean_length}")
        if not (math.isfinite(self.zipf) and self.zipf >= 0):
            raise ConfigError(f"--zipf must be a finite number >= 0, got {self.zipf}")
        if not (0.0 <= self.follow <= 1.0):
            raise ConfigError(f"--follow must lie in [0, 1], got {self.follow}")
        if self.successors < 1:
            raise ConfigError(f"--successors must be at least 1, got {self.successors}")


def generate(items: int, users: int, seed: int = 0, **knobs) -> UserSequences:
    """Draw ``users`` sequences over items 1..``items`` (knobs: the other SyntheticSpec fields).

    Returns sequences with user ids 1..users and ``num_items == items``; raises ConfigError for
    bad parameters.
    """
    return generate_spec(SyntheticSpec(items=items, users=users, seed=seed, **knobs))


def generate_spec(spec: SyntheticSpec) -> UserSequences:
    """:func:`generate` from a spec (module docstring: the draws and their order)."""
    spec.check()
    rng = np.random.default_rng(spec.seed)
    n, k = spec.items, spec.successors

    stop = 1.0 / (spec.mean_length - spec.min_length + 1.0)
    lengths = np.minimum(spec.min_length - 1 + rng.geometric(stop, size=spec.users), spec.max_length)
    offsets = np.zeros(spec.users + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])

    # Inverse-CDF sampling over ranks; cdf[-1] is exactly 1.0 and random() < 1, so a rank is < n.
    cdf = np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -spec.zipf)
    cdf /= cdf[-1]
    id_of_rank = (rng.permutation(n) + 1).astype(np.int32)

    def popular(count: int) -> np.ndarray:
        return id_of_rank[np.searchsorted(cdf, rng.random(count), side="right")]

    successor = popular(n * k).reshape(n, k)
    _remove_self_successors(successor, popular)

    seq = np.empty(int(offsets[-1]), dtype=np.int32)
    seq[offsets[:-1]] = popular(spec.users)
    seq[offsets[-2]] = n            # the largest id must appear: it sets the file's num_items
    active = np.arange(spec.users)
    for t in range(1, int(lengths.max())):
        active = active[lengths[active] > t]
        at = offsets[active] + t
        follows = rng.random(len(active)) < spec.follow
        pick = rng.integers(0, k, size=len(active))
        nxt = successor[seq[at - 1] - 1, pick]
        fresh = np.flatnonzero(~follows)
        nxt[fresh] = popular(len(fresh))
        seq[at] = nxt
    return UserSequences(items=seq.astype(np.int64), offsets=offsets,
                         user_ids=np.arange(1, spec.users + 1, dtype=np.int64), num_items=n,
                         source=f"synthetic(seed={spec.seed})")


def _remove_self_successors(successor: np.ndarray, popular) -> None:
    """Redraw successors equal to their item; after a few rounds (only a head item holding most of
    the popularity mass gets there) fall back to the next id, which cannot be the item itself."""
    own = np.arange(1, successor.shape[0] + 1, dtype=successor.dtype)[:, None]
    for _ in range(_SELF_REDRAWS):
        bad = np.flatnonzero(successor == own)
        if not len(bad):
            return
        successor.flat[bad] = popular(len(bad))
    rows, cols = np.nonzero(successor == own)
    # Row r is item r + 1; its fallback is item r + 2, wrapping to 1, never itself for n >= 2.
    successor[rows, cols] = (rows + 1) % successor.shape[0] + 1


def format_lines(seqs: UserSequences, first: int = 0, stop: int | None = None) -> bytes:
    """Users first..stop-1 as text lines ``user_id item item ...\\n``, built with numpy: each id's
    digits are written into a byte buffer at offsets from the digit counts (no per-id Python)."""
    stop = len(seqs) if stop is None else stop
    lengths = seqs.lengths()[first:stop]
    users = len(lengths)
    if users == 0:
        return b""
    # Token stream: each user's id, then its items.
    line_start = np.zeros(users, dtype=np.int64)
    np.cumsum(lengths[:-1] + 1, out=line_start[1:])
    tokens = np.empty(int(lengths.sum()) + users, dtype=np.int64)
    tokens[line_start] = seqs.user_ids[first:stop]
    is_item = np.ones(len(tokens), dtype=bool)
    is_item[line_start] = False
    tokens[is_item] = seqs.items[seqs.offsets[first]:seqs.offsets[stop]]

    digits = np.ones(len(tokens), dtype=np.int64)
    for power in range(1, 10):                                   # ids are < 2**31: at most 10 digits
        digits += tokens >= 10**power
    ends = np.cumsum(digits + 1)                                 # one past each token's separator
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    out[ends - 1] = ord(" ")
    last_of_line = np.append(line_start[1:], len(tokens)) - 1
    out[ends[last_of_line] - 1] = ord("\n")
    for place in range(int(digits.max())):
        has = np.flatnonzero(digits > place)
        out[ends[has] - 2 - place] = ord("0") + (tokens[has] // 10**place) % 10
    return out.tobytes()


def check_output(path: str | os.PathLike) -> None:
    """Fail early, before any generation, if ``path`` cannot be written: DataError naming it.

    Creates missing parent folders and writes (then removes) a temp file beside it, which is the
    only test of writability that also holds for root and read-only mounts.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; --output must be a file path")
    parent = path.parent
    for folder in (parent, *parent.parents):
        if folder.exists() and not folder.is_dir():
            raise DataError(f"{path}: cannot write: {folder} is not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise DataError(f"{path}: cannot write ({os_error_text(e)})") from None


def write(path: str | os.PathLike, seqs: UserSequences, parameters: Mapping | None = None) -> dict:
    """Write ``seqs`` to ``path`` atomically and ``<path>.json`` (parameters + statistics + SHA-256).

    The old sidecar is removed before the data file is replaced, so a sidecar on disk always
    describes the data file next to it. Returns the sidecar's record; a path that cannot be
    written raises DataError naming it.
    """
    path = Path(path)
    check_output(path)
    sidecar = Path(f"{path}.json")
    digest = hashlib.sha256()

    def write_blocks(f) -> None:
        for first in range(0, len(seqs), _WRITE_BLOCK_USERS):
            block = format_lines(seqs, first, min(first + _WRITE_BLOCK_USERS, len(seqs)))
            digest.update(block)
            f.write(block)

    try:
        if sidecar.exists():
            sidecar.unlink()
        atomic_write(path, write_blocks)
        lengths = seqs.lengths()
        record = {
            "generator": "adarec.data.synthetic",
            # numpy keeps a seed's stream across releases only as a policy, not a promise.
            "numpy": np.__version__,
            "parameters": dict(parameters or {}),
            "file": path.name,
            "sha256": digest.hexdigest(),
            "bytes": path.stat().st_size,
            "users": len(seqs),
            "items": int(seqs.num_items),
            "interactions": len(seqs.items),
            "distinct_items": int(np.count_nonzero(np.bincount(seqs.items, minlength=seqs.num_items + 1))),
            "length_min": int(lengths.min()),
            "length_mean": round(float(lengths.mean()), 4),
            "length_max": int(lengths.max()),
        }
        atomic_write_text(sidecar, json.dumps(record, indent=2, sort_keys=True) + "\n")
    except OSError as e:
        raise DataError(f"{e.filename or path}: cannot write ({os_error_text(e)})") from None
    return record


def write_synthetic(path: str | os.PathLike, spec: SyntheticSpec) -> dict:
    """Generate from ``spec`` and write the file and its sidecar; returns the sidecar's record.
    Parameters and the output path are checked before anything is generated."""
    spec.check()
    check_output(path)
    return write(path, generate_spec(spec), dataclasses.asdict(spec))


class _OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line on stderr, exit status 2 (the usage is in --help)."""

    def error(self, message: str):
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    d = SyntheticSpec(items=2, users=1)
    p = _OneLineParser(
        prog=PROG,
        description="Write a synthetic interaction file (one line per user: user_id item item ..., oldest first) "
                    "with Zipf item popularity and learnable item-to-item successions, plus OUTPUT.json recording "
                    "the parameters, statistics and SHA-256. The same arguments give the same bytes.",
        epilog=f"example: {PROG} --items 1000000 --users 200000 --output data/synthetic_1m.txt")
    p.add_argument("--items", type=int, required=True, help="catalogue size: ids 1..ITEMS; item ITEMS always appears")
    p.add_argument("--users", type=int, required=True, help="number of users (lines), ids 1..USERS")
    p.add_argument("--output", required=True, help="data file to write (and OUTPUT.json next to it)")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed, >= 0 (default: %(default)s)")
    p.add_argument("--mean-length", type=float, default=d.mean_length,
                   help="mean items per user before the cut at --max-length; lengths are "
                        "min-length - 1 + a geometric draw (default: %(default)s)")
    p.add_argument("--min-length", type=int, default=d.min_length,
                   help=f"fewest items per user, at least {MIN_ITEMS}: train, valid and test items "
                        "(default: %(default)s)")
    p.add_argument("--max-length", type=int, default=d.max_length, help="most items per user (default: %(default)s)")
    p.add_argument("--zipf", type=float, default=d.zipf,
                   help="popularity exponent: the item of popularity rank r has weight r**-ZIPF; 0 = uniform "
                        "(default: %(default)s)")
    p.add_argument("--follow", type=float, default=d.follow,
                   help="probability that the next item is one of the previous item's successors, otherwise a "
                        "popularity draw; 0 = no sequential signal (default: %(default)s)")
    p.add_argument("--successors", type=int, default=d.successors,
                   help="fixed successor items per item, drawn once by popularity (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fields = {f.name for f in dataclasses.fields(SyntheticSpec)}
    spec = SyntheticSpec(**{k: v for k, v in vars(args).items() if k in fields})
    began = time.perf_counter()
    try:
        record = write_synthetic(args.output, spec)
    except AdarecError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"{PROG}: error: not enough memory for --items {spec.items} --users {spec.users} "
              f"--successors {spec.successors}", file=sys.stderr)
        return 2
    print(json.dumps({**record, "seconds": round(time.perf_counter() - began, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
