"""Random draws keyed by training row: a row gets the same numbers wherever it is computed.

Data-parallel training splits every global batch over the ranks (docs/method.md, "Data
parallelism"). For N ranks at batch B / N to train the model one rank trains at batch B, each
random number that belongs to a row (its negatives, its augmented views, its Gumbel noise, its
diffusion noise) must not depend on which rank, or which position of the local batch, the row
lands in. So those draws are a pure function of (row key, stream, call, element):

- the sampler gives every row of an epoch a 62-bit key derived from (seed, epoch, row)
  (`row_keys`, on the host);
- `KeyedDraws(keys, stream)` turns the keys of a batch [B] into draws [B, ...] with a
  counter-based hash (no generator state): the purpose (`stream`) salts the key, and the call
  number and the element index make the counter.

The hash works on 32-bit words held in int64 tensors with multipliers below 2**27, so no
product overflows and CPU and CUDA give bit-identical results; it runs on the device without a
host sync. A row's state is its 62-bit key in two words, so two rows' sequences coincide only
if their keys do. This is statistical quality for sampling, not cryptography.

`GeneratorDraws` gives the same interface over a `torch.Generator` (unit tests, and callers
that have no row keys).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["GeneratorDraws", "KeyedDraws", "Streams", "as_draws", "normal_from_words", "open_unit", "row_keys",
           "uniform_from_words"]

_MASK32 = 0xFFFFFFFF
# Below 2**27: a 32-bit word times this stays under 2**59, so int64 never overflows.
_MUL = 0x45D9F3B
_TWO_PI = 2.0 * math.pi
# Counter values per call: a row's calls draw from disjoint blocks of its 2**32 counters.
_CALL_SPAN = 2**24


class Streams:
    """One stream id per purpose, so that no two kinds of draw share numbers."""

    NEGATIVES = 1
    VIEWS = 2
    GUMBEL = 3
    DIFFUSION = 4
    NOISED_COPIES = 5
    # The peers (docs/peers.md): diffusion timesteps, their Gaussian noise, DiffuRec's lambda,
    # DiffuASR's guide dropout, and the start noise of a reverse process at evaluation.
    TIMESTEPS = 6
    PEER_NOISE = 7
    LAMBDA = 8
    GUIDE_DROP = 9
    REVERSE = 10


def row_keys(seed: int, epoch: int, rows: np.ndarray) -> np.ndarray:
    """62-bit keys (int64 >= 0) of training rows in an epoch: SplitMix64 of (seed, epoch, row)."""
    with np.errstate(over="ignore"):
        x = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)) ^ (np.uint64(epoch) << np.uint64(40))
        x = x + np.asarray(rows, dtype=np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
        for shift, mul in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            x = (x ^ (x >> np.uint64(shift))) * np.uint64(mul)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(2)).astype(np.int64)


def sequence_keys(input_ids: torch.Tensor, seed: int) -> torch.Tensor:
    """Keys [B] (int64) of evaluation rows from their contents and ``seed``: a user's reverse-process
    noise is then the same whatever batch, rank or batch size scores it, and fixed per run.

    Two independent 32-bit hashes of the (column, id) pairs of the items, columns counted from the
    right end (where the newest item sits) and padding left out, so a row trimmed to fewer padding
    columns gets the same key: two rows share a key only if both hashes collide.
    """
    ids = input_ids.to(torch.int64) & _MASK32
    cols = torch.arange(ids.shape[1] - 1, -1, -1, device=ids.device, dtype=torch.int64)
    halves = []
    for salt in (0x2545F491, 0x9E3779B1):
        # Each (column, id) mixed on its own, weighted by an odd per-column multiplier, summed:
        # a few whole-tensor ops, not a loop over columns.
        cell = _mix32((ids + cols * 0x61C88647 + _mix32_int(int(seed) ^ salt)) & _MASK32)
        weight = (_mix32((cols * 0x85EBCA6B + salt) & _MASK32) | 1) * (ids > 0)
        halves.append(_mix32((cell * weight).sum(1) & _MASK32))
    return halves[0] | (halves[1] << 32)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit mixer (xor-shift-multiply) on values in [0, 2**32) held as int64."""
    x = ((x >> 16) ^ x) * _MUL & _MASK32
    x = ((x >> 16) ^ x) * _MUL & _MASK32
    return (x >> 16) ^ x


def _mix32_int(x: int) -> int:
    """_mix32 of a Python integer (salts are computed on the host, not as tensors)."""
    x &= _MASK32
    for _ in range(2):
        x = (((x >> 16) ^ x) * _MUL) & _MASK32
    return (x >> 16) ^ x


def open_unit(u: torch.Tensor) -> torch.Tensor:
    """u clamped into the open interval (0, 1) as u's dtype represents it: to the largest value
    below 1 and the smallest normal number above 0.

    A draw that rounds to 1.0 or 0.0 is not rare at training scale: in float32 the top 24-bit
    word maps to 1 - 2**-25, which rounds to 1.0 (one word in 2**24, about one Beauty step in
    150 for ADARec's Gumbel noise), and in bf16 every draw above 1 - 2**-9 rounds to 1.0. The
    consumers take -log(-log(u)) (Gumbel) and log(u) (Box-Muller), which are finite only inside
    (0, 1). 1 - eps / 2 is exactly representable in every float dtype (eps is the spacing above 1,
    the spacing below 1 is half of it)."""
    info = torch.finfo(u.dtype)
    return u.clamp(info.tiny, 1.0 - info.eps / 2)


def _uniform32(bits: torch.Tensor) -> torch.Tensor:
    """The top 24 bits of 32-bit words as float32 in (0, 1): (k + 1/2) / 2**24, whose top value
    rounds to 1.0 in float32 and is therefore clamped to 1 - 2**-24 (open_unit)."""
    return open_unit(((bits >> 8).to(torch.float32) + 0.5) * (2.0 ** -24))


def uniform_from_words(words: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform numbers in (0, 1) from 32-bit words (int64 in [0, 2**32)), in ``dtype``.

    float64 takes 53 bits from two words: ``words`` [2, ...] (high, low); every other dtype one
    word each, computed in float32 and rounded, then clamped so that rounding never reaches 0
    or 1. What KeyedDraws.uniform computes from its hashed words."""
    if dtype == torch.float64:
        high, low = words.unbind(0)
        k = (high >> 6).to(torch.float64) * 2.0 ** 26 + (low >> 6).to(torch.float64)
        return open_unit((k + 0.5) * 2.0 ** -52)
    return open_unit(_uniform32(words).to(dtype))


def normal_from_words(words: torch.Tensor) -> torch.Tensor:
    """Standard normal float32 numbers from pairs of 32-bit words [2, ...] by Box-Muller:
    [2, ...] again, the cos and the sin output of each pair. log() takes the first word's
    uniform, which is at least 2**-25, so the radius is at most sqrt(2 * 25 * ln 2) < 6.
    What KeyedDraws.normal computes from its hashed words."""
    u1, u2 = _uniform32(words).unbind(0)
    radius, angle = torch.sqrt(-2.0 * torch.log(u1)), _TWO_PI * u2
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)])


class KeyedDraws:
    """Draws for the rows of a batch from their keys [B] (int64): every result is [B, *tail].

    Successive calls give independent numbers (each call has its own block of counters), so a
    function may draw several times; the sequence of calls must be the same wherever the rows
    are processed, which it is since it depends on shapes only.
    """

    def __init__(self, keys: torch.Tensor, stream: int):
        if keys.dtype != torch.int64 or keys.dim() != 1:
            raise ValueError(f"row keys must be a 1-D int64 tensor, got {keys.dtype} {tuple(keys.shape)}")
        self.keys, self.stream = keys, int(stream)
        self._calls = 0
        # The keys are already well mixed (row_keys is SplitMix64), so a row's two state words are
        # its key's halves with the stream's salts folded in: four cheap ops, not a hash per row.
        self._state = ((keys & _MASK32) ^ _mix32_int(self.stream * 0x9E3779B1),
                       (keys >> 32) ^ _mix32_int(self.stream * 0x85EBCA77 + 1))

    @property
    def rows(self) -> int:
        return self.keys.shape[0]

    def bits(self, tail: tuple[int, ...], block: torch.Tensor | None = None, blocks: int = 1,
             align_right: bool = False) -> torch.Tensor:
        """Uniform 32-bit words [B, *tail] as int64 in [0, 2**32).

        `block` [B] (int64 in [0, blocks)) gives each row one of `blocks` disjoint sub-blocks of
        this call's counters: what row r draws depends on (its key, block[r]) only. ADARec's
        noise uses it to draw a (row, level) pair's numbers for the pairs it computes, without
        drawing the whole [row, level] grid.

        `align_right`: tail[0] is a sequence width W and the numbers of each position are keyed by
        its distance from the right end (the newest item), in a block of fixed size whatever W is.
        Sequences are left-padded, so a batch trimmed to a narrower width (fewer padding columns)
        draws exactly the same numbers at every position it keeps (docs/method.md, "Trimmed
        batches").
        """
        count = math.prod(tail)
        if self._calls >= 2**32 // _CALL_SPAN:
            raise ValueError(f"keyed draws take at most {2**32 // _CALL_SPAN} calls per row")
        span = _CALL_SPAN // blocks if align_right else count
        if count > span or span * blocks > _CALL_SPAN:
            raise ValueError(f"keyed draws take at most {_CALL_SPAN} numbers per row per call; asked "
                             f"{count} x {blocks} at call {self._calls}")
        # The call number selects a block of the 32-bit counter: no per-call work on the rows.
        first = self._calls * _CALL_SPAN
        self._calls += 1
        a, b = self._state
        device = self.keys.device
        if align_right:
            width, per = tail[0], math.prod(tail[1:])
            distance = torch.arange(width - 1, -1, -1, device=device, dtype=torch.int64)
            offsets = (distance[:, None] * per + torch.arange(per, device=device, dtype=torch.int64)).reshape(-1)
            counter = (offsets + first)[None, :]
        else:
            counter = torch.arange(first, first + count, device=device, dtype=torch.int64)[None, :]
        if block is not None:
            counter = counter + (block * span)[:, None]
        out = _mix32(_mix32(a[:, None] ^ counter) ^ b[:, None])
        return out.view(self.rows, *tail)

    def uniform(self, tail: tuple[int, ...], dtype: torch.dtype = torch.float32,
                block: torch.Tensor | None = None, blocks: int = 1, align_right: bool = False) -> torch.Tensor:
        """Uniform in (0, 1) [B, *tail], never 0 or 1 in ``dtype`` (uniform_from_words); float64
        takes 53 bits from two words. `block`, `align_right`: see bits."""
        if dtype == torch.float64:
            # Two words per number from one hash pass over twice the counters (per position when
            # aligned, so that a position's words stay its own).
            if align_right:
                words = self.bits((tail[0], 2, *tail[1:]), block, blocks, align_right=True).movedim(2, 0)
            else:
                words = self.bits((2, *tail), block, blocks).movedim(1, 0)
            return uniform_from_words(words, dtype)
        return uniform_from_words(self.bits(tail, block, blocks, align_right), dtype)

    def normal(self, tail: tuple[int, ...], dtype: torch.dtype = torch.float32,
               block: torch.Tensor | None = None, blocks: int = 1, align_right: bool = False) -> torch.Tensor:
        """Standard normal [B, *tail], computed in float32: Box-Muller on pairs of uniforms from
        one hash pass, both of its outputs used (cos and sin), so a number costs one word.
        With `align_right` the pairs are formed within each position, whose numbers then depend
        on its distance from the right end only. `block`, `align_right`: see bits."""
        if align_right:
            width, per = tail[0], math.prod(tail[1:])
            half = (per + 1) // 2
            z = normal_from_words(self.bits((width, 2, half), block, blocks, align_right=True).movedim(2, 0))
            z = torch.cat([z[0], z[1]], dim=-1)                                  # [B, W, 2 half]
            return z[..., :per].reshape(self.rows, *tail).to(dtype)
        count = math.prod(tail)
        half = (count + 1) // 2
        z = normal_from_words(self.bits((2, half), block, blocks).movedim(1, 0))    # [2, B, half]
        z = torch.cat([z[0], z[1]], dim=1)
        return z[:, :count].reshape(self.rows, *tail).to(dtype)


class GeneratorDraws:
    """KeyedDraws' interface over a torch.Generator (or torch's global RNG when None)."""

    def __init__(self, generator: torch.Generator | None, rows: int, device: torch.device | str | None = None):
        self.generator, self.rows = generator, rows
        self.device = generator.device if generator is not None else device

    def uniform(self, tail: tuple[int, ...], dtype: torch.dtype = torch.float32,
                align_right: bool = False) -> torch.Tensor:
        """Uniform in (0, 1): torch.rand draws from [0, 1), so its exact zeros are clamped too.
        (`align_right` is accepted for KeyedDraws' interface; a generator's numbers follow no key.)"""
        return open_unit(torch.rand((self.rows, *tail), generator=self.generator, device=self.device, dtype=dtype))

    def normal(self, tail: tuple[int, ...], dtype: torch.dtype = torch.float32,
               align_right: bool = False) -> torch.Tensor:
        return torch.randn((self.rows, *tail), generator=self.generator, device=self.device, dtype=dtype)


def as_draws(source, rows: int, device: torch.device | str | None = None):
    """KeyedDraws / GeneratorDraws pass through; a torch.Generator or None is wrapped."""
    if isinstance(source, (KeyedDraws, GeneratorDraws)):
        if source.rows != rows:
            raise ValueError(f"draws are for {source.rows} rows, the batch has {rows}")
        return source
    return GeneratorDraws(source, rows, device)
