"""Batches of similar lengths, trimmed to their longest row (docs/method.md, "Trimmed batches").

Sequences are left-padded to max_len, and on the shipped Beauty file 87% of the positions of a
training input are padding. A random batch of 256 rows has a longest row of about 48, so
trimming a random batch saves nothing. So:

- **Grouping** (`grouped_order`, training): the epoch's shuffled rows are cut into *groups* of
  `group_batches` batches, each group is sorted by length and cut into batches, and the full
  batches are served in a random order (the partial batch, if any, last). This is the approach
  of Hugging Face's `group_by_length`; a batch then holds rows of similar lengths while every
  row still lands in a random batch at a random step. The order is a pure function of its
  inputs (the epoch permutation and a generator seeded from (seed, epoch)), so a resumed run and
  N data-parallel ranks reproduce it exactly.
- **Trimming** (`bucket_width`): a batch keeps only its last W columns, W its longest row
  rounded up to the next of a few widths (`data.width_buckets`, max_len always among them), so a
  GPU sees a handful of shapes and a CUDA graph per width. Columns cut are padding in every row.
- **Evaluation** (`evaluation_batches`): the users are sorted by length and batched in that
  order, each batch trimmed the same way; the metrics are sums over users, so order does not
  matter.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["bucket_width", "evaluation_batches", "grouped_order", "padding_fraction", "sequence_lengths"]

DEFAULT_GROUP_BATCHES = 8


def sequence_lengths(input_ids: torch.Tensor) -> np.ndarray:
    """Items per row of a left-padded [R, L] tensor, on the host (one read, done once per split)."""
    return (input_ids > 0).sum(1).cpu().numpy().astype(np.int64)


def bucket_width(longest: int, buckets: Sequence[int] | None, max_len: int) -> int:
    """The width a batch whose longest row holds `longest` items is trimmed to: the smallest
    bucket >= longest (at least 1), max_len when none is, or when `buckets` is None (no trimming)."""
    if buckets is None:
        return max_len
    for width in sorted(buckets):
        if width >= max(longest, 1) and width <= max_len:
            return int(width)
    return max_len


def grouped_order(perm: np.ndarray, lengths: np.ndarray, batch_size: int, group_batches: int,
                  generator: np.random.Generator) -> np.ndarray:
    """The rows of `perm` (an epoch's shuffled row ids) reordered so that every consecutive
    `batch_size` rows are one length-grouped batch (module docstring); the same rows, once each.

    Each group of `group_batches * batch_size` rows is sorted by length, longest first (stable,
    so ties keep the shuffled order), and cut into batches; the full batches are then permuted by
    `generator`, and a partial batch (the epoch's last rows) stays at the end, where the batch
    boundaries of `order[i * batch_size:(i + 1) * batch_size]` expect it."""
    perm = np.asarray(perm, dtype=np.int64)
    group = max(int(group_batches), 1) * batch_size
    parts = []
    for start in range(0, len(perm), group):
        rows = perm[start:start + group]
        parts.append(rows[np.argsort(-lengths[rows], kind="stable")])
    ordered = np.concatenate(parts) if parts else perm
    full = len(ordered) // batch_size
    batches = ordered[: full * batch_size].reshape(full, batch_size)
    shuffled = batches[generator.permutation(full)].reshape(-1)
    return np.concatenate([shuffled, ordered[full * batch_size:]])


def evaluation_batches(lengths: np.ndarray, batch_size: int, buckets: Sequence[int] | None,
                       max_len: int) -> list[tuple[np.ndarray, int]]:
    """(positions into `lengths`, width) of every evaluation batch: sorted by length (stable), cut
    into batches of `batch_size`, each with the bucket width of its longest row. Without buckets
    the positions keep their order and every width is max_len."""
    order = np.arange(len(lengths)) if buckets is None else np.argsort(lengths, kind="stable")
    out = []
    for start in range(0, len(order), batch_size):
        part = order[start:start + batch_size]
        out.append((part, bucket_width(int(lengths[part].max(initial=0)), buckets, max_len)))
    return out


def padding_fraction(lengths: np.ndarray, batches: Sequence[tuple[np.ndarray, int]]) -> float:
    """Share of the computed positions that are padding, over (rows, width) batches."""
    computed = sum(len(rows) * width for rows, width in batches)
    items = sum(int(np.minimum(lengths[rows], width).sum()) for rows, width in batches)
    return 1.0 - items / max(computed, 1)
