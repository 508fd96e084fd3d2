"""On-device training batches: shuffled rows, exact negative sampling, augmented views.

Nothing here synchronises with the host per batch: batch boundaries are known from the number
of training rows (a host integer), negatives are drawn in closed form (no rejection loop), and
the row permutation is drawn on the host (once per epoch, then copied over), so the host knows
how many positions of a batch have a target without reading the device.

Each batch carries `target_rows`: the flat indices (into B * L) of its positions with a target,
in order, padded with positions without one to a multiple of TARGET_BUCKET. The next-item loss
scores those rows only, so it costs about what scoring the real targets costs, its shape takes
one of a few values (a CUDA graph per value), and no boolean selection has to read a count on
the host (docs/method.md, "The training step on a GPU"). On a CPU the trainer asks for a bucket
of 1: no graph needs few shapes there, and a padding row costs a row of the catalogue's logits.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from adarec.data.augment import random_views
from adarec.data.length_groups import (
    DEFAULT_GROUP_BATCHES,
    bucket_width,
    grouped_order,
    padding_fraction,
    sequence_lengths,
)
from adarec.data.split import SplitData
from adarec.keyed_random import KeyedDraws, Streams, as_draws, row_keys

__all__ = ["TARGET_BUCKET", "TrainBatchSampler", "sample_negatives", "target_rows"]

# Target counts are rounded up to a multiple of this: a Beauty batch (256 rows, about 1,800
# targets) then takes one of three or four shapes, at most 511 padding rows scored for nothing.
TARGET_BUCKET = 512


def target_rows(target_pos: torch.Tensor, count: int) -> torch.Tensor:
    """The flat indices of target_pos's nonzero entries in order, then of zero entries, `count`
    in all (count >= the number of targets, a host integer: nothing is read from the device)."""
    missing = (target_pos.reshape(-1) == 0).to(torch.uint8)
    return torch.sort(missing, stable=True).indices[:count]


def sample_negatives(seen_sorted: torch.Tensor, seen_count: torch.Tensor,
                     shape_or_like: torch.Tensor, num_items: int, draws) -> torch.Tensor:
    """For every element of ``shape_or_like`` [B, L], an item uniform over {1..N} minus row b's seen set.

    ``seen_sorted`` [B, S] holds each row's unique seen items ascending, padded with a sentinel
    > N + S; ``seen_count`` [B] the number of real entries. If a row has seen every item there is
    no valid negative and the result for that row is unspecified (but still in 1..N).
    ``draws``: a torch.Generator or row-keyed draws (adarec.keyed_random).
    """
    B, L = shape_or_like.shape
    device = seen_sorted.device
    # Draw the rank r of the negative among the row's unseen items, uniform in [0, N - count).
    free = (num_items - seen_count).clamp_min(1)[:, None]
    u = as_draws(draws, B, device).uniform((L,), torch.float64, align_right=True)
    r = torch.minimum(torch.floor(u * free).to(torch.int64), free - 1)
    # Map r to the r-th unseen item. With h_i the seen items ascending (i 0-based),
    # a_i = h_i - 1 - i is the number of unseen items below h_i (non-decreasing in i).
    # The r-th unseen item x has exactly j = #{i : a_i <= r} seen items below it, so
    # x = r + 1 + j. Sentinel pads give a_i >= 2N + 1 > r and never count.
    idx = torch.arange(seen_sorted.shape[1], device=device)
    a = seen_sorted - 1 - idx[None, :]
    j = torch.searchsorted(a, r, right=True)
    return (r + 1 + j).clamp_(1, num_items)


def _derived_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers, so nearby (seed, epoch) give unrelated streams."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


class TrainBatchSampler:
    """Yields one epoch of training batches for one rank, all tensors on ``device``.

    Every epoch's randomness is derived from (seed, epoch) for the row permutation (identical on
    all ranks, so each rank takes the disjoint slice ``perm[rank::world_size]``, and the union of
    the ranks' i-th batches is the one-rank i-th batch) and from (seed, epoch, row) for everything
    drawn for a row: its key ``row_key`` (adarec.keyed_random.row_keys) drives its negatives and
    views here and its Gumbel and diffusion noise in the model, so a row gets the same numbers on
    whichever rank it lands (docs/method.md, "Data parallelism"). Reseeding per epoch makes
    ``epoch(e)`` a pure function of the constructor arguments and ``e``: a resumed run reproduces
    an uninterrupted one even if an earlier epoch was stopped part-way.

    Each batch: ``input_ids``, ``target_pos``, ``target_neg`` (0 where ``target_pos`` is 0),
    ``target_rows`` (module docstring), ``user``, ``row_key``, with ``with_views``
    ``view1`` / ``view2``, and with ``group_by_length`` ``target_share`` (a float32 scalar the
    per-target losses are scaled by, `_target_shares`).

    ``group_by_length`` serves batches of similar lengths and ``width_buckets`` trims every batch to
    the bucket width of its longest row (adarec/data/length_groups.py); both are decided per
    *global* batch, so every rank's part of a batch has the global batch's width.
    The per-rank batch size is ``batch_size // world_size`` and the last partial batch is kept.
    When the row count is not a multiple of ``world_size`` ranks can differ by one step; ``pad_ranks=True`` pads the
    permutation with its first rows (as torch's DistributedSampler does) so every rank gets the
    same number of rows and steps, at the cost of a few rows seen twice per epoch.
    """

    def __init__(self, split: SplitData, batch_size: int, seed: int, *, rank: int = 0,
                 world_size: int = 1, with_views: bool = False, crop_ratio: float = 0.2,
                 mask_ratio: float = 0.7, reorder_ratio: float = 0.2,
                 device: torch.device | str | None = None, pad_ranks: bool = False,
                 group_by_length: bool = False, group_batches: int = DEFAULT_GROUP_BATCHES,
                 width_buckets: list[int] | tuple[int, ...] | None = None,
                 target_bucket: int | None = None) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size // world_size < 1:
            raise ValueError(f"batch_size {batch_size} is smaller than world_size {world_size}")
        self.device = torch.device(device) if device is not None else split.train_input.device
        if split.train_input.device != self.device or split.seen_sorted.device != self.device:
            raise ValueError(f"split is on {split.train_input.device}, sampler device is "
                             f"{self.device}; call split.to(device) first")
        self.split = split
        self.batch_size = batch_size
        self.local_batch = batch_size // world_size
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.with_views = with_views
        self.ratios = (crop_ratio, mask_ratio, reorder_ratio)
        self.pad_ranks = pad_ranks
        self.group_by_length, self.group_batches = bool(group_by_length), int(group_batches)
        self.width_buckets = None if width_buckets is None else tuple(int(w) for w in width_buckets)
        # None: TARGET_BUCKET. The trainer passes 1 on a CPU, where no CUDA graph needs a few
        # shapes and every padding row of target_rows would be scored against the whole catalogue.
        self.target_bucket = target_bucket
        self.num_rows = int(split.train_input.shape[0])
        # Read once here, so that a batch's target count is known on the host (target_rows).
        # numpy, not torch: host-side bookkeeping must not look like a device read in a profile.
        self._row_targets = (split.train_target > 0).sum(1).cpu().numpy()
        self._row_lengths = sequence_lengths(split.train_input)
        self._positions = int(split.train_target.shape[1])
        if pad_ranks:
            self.rank_rows = math.ceil(self.num_rows / world_size)
        else:
            self.rank_rows = len(range(rank, self.num_rows, world_size))
        self._last_epoch = -1

    def __len__(self) -> int:
        """Steps per epoch on this rank."""
        return math.ceil(self.rank_rows / self.local_batch)

    def _generator(self, seed: int, device: torch.device | str | None = None) -> torch.Generator:
        g = torch.Generator(device=device or self.device)
        g.manual_seed(seed)
        return g

    def _global_order(self, epoch: int) -> tuple[torch.Tensor, np.ndarray]:
        """The epoch's row order (every consecutive batch_size rows one global batch; padded for
        the ranks when pad_ranks) and the pass over the permutation each position is."""
        perm = torch.randperm(self.num_rows, generator=self._generator(_derived_seed(self.seed, epoch, 0), "cpu"))
        if self.group_by_length:
            batch_order = np.random.default_rng(_derived_seed(self.seed, epoch, 1))
            perm = torch.from_numpy(grouped_order(perm.numpy(), self._row_lengths, self.batch_size,
                                                  self.group_batches, batch_order))
        total = self.rank_rows * self.world_size
        # Which pass over the permutation each position is: the rows padded onto the end are
        # repeats, and draw other numbers than their first appearance (their key counts the pass).
        passes = np.zeros(self.num_rows, dtype=np.int64)
        if self.pad_ranks and self.num_rows and total > self.num_rows:
            perm = perm.repeat(math.ceil(total / self.num_rows))[:total]
            passes = np.arange(total, dtype=np.int64) // self.num_rows
        return perm, passes

    def _width(self, global_rows: np.ndarray, i: int) -> int:
        """The width of global batch i (the rows of every rank), so that all ranks agree."""
        longest = self._row_lengths[global_rows[i * self.batch_size:(i + 1) * self.batch_size]].max(initial=0)
        return bucket_width(int(longest), self.width_buckets, self._positions)

    def _target_shares(self, global_rows: np.ndarray) -> list[float]:
        """Per global batch: its target count over the epoch's mean count per batch.

        A loss that is a mean over a batch's targets weighs each target by 1 / (the batch's
        count). Random batches hold about the same count, but length-grouped ones do not (a batch
        of one-item rows has 256 targets, one of 40-item rows 10,000), and the per-batch mean then
        weighs short users' targets up to 40 times more than long users'. Scaled by this share,
        the per-batch means add up over an epoch to the mean over all its targets, the objective
        random batches estimate (docs/method.md, "Trimmed batches")."""
        counts = [float(self._row_targets[global_rows[i * self.batch_size:(i + 1) * self.batch_size]].sum())
                  for i in range(len(self))]
        mean = sum(counts) / max(len(counts), 1)
        return [c / mean if mean else 1.0 for c in counts]

    def padding_fraction(self, epoch: int = 0) -> float:
        """Share of the positions this rank computes in epoch ``epoch`` that are padding."""
        perm, _ = self._global_order(epoch)
        rows = perm.numpy()[self.rank :: self.world_size]
        batches = [(rows[i * self.local_batch:(i + 1) * self.local_batch], self._width(perm.numpy(), i))
                   for i in range(len(self))]
        return padding_fraction(self._row_lengths, batches)

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of epoch ``epoch`` for this rank (same result however often it is called)."""
        self._last_epoch = epoch
        s = self.split
        perm, passes = self._global_order(epoch)
        global_rows = perm.numpy()
        rows_host = perm[self.rank :: self.world_size]
        rows = rows_host.to(self.device)
        rows_host = rows_host.numpy()
        shares = self._target_shares(global_rows) if self.group_by_length else None
        # One training row per user: keying by the row is keying by (seed, epoch, user).
        draw_ids = rows_host + self.num_rows * passes[self.rank :: self.world_size]
        keys = torch.from_numpy(row_keys(self.seed, epoch, draw_ids)).to(self.device)
        for i in range(len(self)):
            part = slice(i * self.local_batch, (i + 1) * self.local_batch)
            idx, key = rows[part], keys[part]
            width = self._width(global_rows, i)
            targets = int(self._row_targets[rows_host[part]].sum())
            step = self.target_bucket or TARGET_BUCKET
            bucket = min(math.ceil(max(targets, 1) / step) * step, idx.numel() * width)
            user = s.train_user[idx]
            inp, pos = s.train_input[:, -width:][idx], s.train_target[:, -width:][idx]
            neg = sample_negatives(s.seen_sorted[user], s.seen_count[user], pos, s.num_items,
                                   KeyedDraws(key, Streams.NEGATIVES))
            batch = {"input_ids": inp, "target_pos": pos, "target_rows": target_rows(pos, bucket),
                     "target_neg": torch.where(pos > 0, neg, torch.zeros_like(neg)), "user": user,
                     "row_key": key}
            if shares is not None:
                batch["target_share"] = torch.tensor(shares[i], dtype=torch.float32).to(self.device, non_blocking=True)
            if self.with_views:
                views = KeyedDraws(key, Streams.VIEWS)
                batch["view1"] = random_views(inp, views, *self.ratios)
                batch["view2"] = random_views(inp, views, *self.ratios)
            yield batch

    def state_dict(self) -> dict:
        """What determines future batches: every epoch's seeds derive from these values."""
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "batch_size": self.batch_size, "with_views": self.with_views,
                "ratios": list(self.ratios), "pad_ranks": self.pad_ranks,
                "group_by_length": self.group_by_length, "group_batches": self.group_batches,
                "width_buckets": None if self.width_buckets is None else list(self.width_buckets),
                "num_rows": self.num_rows, "last_epoch": self._last_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; afterwards ``epoch(e)`` matches the saved sampler's.

        Since batches are a pure function of (seed, epoch, layout), there is no generator state to
        restore. A different seed or number of training rows means a different run and raises
        ValueError; a changed rank layout or batch size is allowed (an elastic resume) but then
        the batches differ from the uninterrupted run, as they must.
        """
        for key in ("seed", "num_rows"):
            if key not in state or state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state.get(key)!r}, this sampler has "
                                 f"{getattr(self, key)!r}")
        self._last_epoch = int(state.get("last_epoch", -1))
