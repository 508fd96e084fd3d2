"""Random draws at the extreme bit patterns: every public draw stays strictly inside (0, 1) in
every dtype it is produced in or cast to, and every consumer that takes a log of a draw (the
depth controller's Gumbel noise, Box-Muller on the CPU and in the Triton trajectory kernel) is
finite there. A hash word of all ones used to give exactly 1.0 in float32 and an infinite
Gumbel draw, about once every 150 ADARec Beauty steps."""

import pytest
import torch
import triton
import triton.language as tl
from adarec.kernels.trajectory import _normal_from_words

from adarec.keyed_random import (
    GeneratorDraws,
    KeyedDraws,
    Streams,
    normal_from_words,
    open_unit,
    uniform_from_words,
)
from adarec.models.controller import DepthController, gumbel_from_uniform

# All zeros, all ones, each half set, and the values either side of the bits a float32 keeps.
EXTREME_WORDS = [0x00000000, 0xFFFFFFFF, 0x0000FFFF, 0xFFFF0000, 0x7FFFFFFF, 0x80000000, 0x000000FF,
                 0xFFFFFF00, 0x00000100, 0xFFFFFEFF]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def words(values=EXTREME_WORDS) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def strictly_inside(u: torch.Tensor) -> bool:
    return bool(((u > 0) & (u < 1)).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_uniform_from_extreme_words_is_inside_the_open_interval(dtype):
    w = words()
    if dtype == torch.float64:
        w = torch.stack(torch.meshgrid(w, w, indexing="ij")).reshape(2, -1)       # every (high, low) pair
    u = uniform_from_words(w, dtype)
    assert u.dtype == dtype and strictly_inside(u)
    # The extreme words still map to the extremes, not somewhere arbitrary.
    info = torch.finfo(dtype)
    assert float(u.max()) > 1 - 2 * info.eps and float(u.min()) <= max(1e-6, info.tiny)


def test_the_all_ones_word_is_below_one_in_float32():
    """(2**24 - 1/2) / 2**24 rounds to 1.0 in float32: the value that made the Gumbel noise infinite."""
    top = uniform_from_words(words([0xFFFFFFFF]))
    assert float(top) == 1 - 2 ** -24
    # Below the top the mapping is unchanged: (k + 1/2) / 2**24 rounded to float32.
    k = torch.tensor([0, 1, 2 ** 23, 2 ** 24 - 2], dtype=torch.int64)
    expected = ((k.double() + 0.5) / 2 ** 24).float()
    assert torch.equal(uniform_from_words(k << 8), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_open_unit_keeps_every_dtype_inside(dtype):
    u = torch.tensor([0.0, 1.0, 0.5, 1 - 1e-12, 1e-30], dtype=torch.float64).to(dtype)
    clamped = open_unit(u)
    assert strictly_inside(clamped) and clamped[2] == 0.5
    assert torch.isfinite(gumbel_from_uniform(clamped)).all()


def test_box_muller_is_finite_at_extreme_words():
    w = words()
    pairs = torch.stack(torch.meshgrid(w, w, indexing="ij")).reshape(2, -1)
    z = normal_from_words(pairs)
    assert z.shape == pairs.shape and torch.isfinite(z).all()
    assert float(z.abs().max()) < 6.0          # radius <= sqrt(-2 ln 2**-25)
    # u1 of the zero word is 2**-25: the largest radius there is.
    zero_first = normal_from_words(words([0, 0]).view(2, 1))
    assert float(zero_first.norm()) == pytest.approx((-2 * torch.log(torch.tensor(2.0 ** -25))).sqrt().item(),
                                                     rel=1e-6)


class ExtremeBits:
    """KeyedDraws.bits replaced by a cycle through the extreme words (same shapes)."""

    def __init__(self, monkeypatch):
        real = KeyedDraws.bits

        def bits(draws, tail, block=None, blocks=1, align_right=False):
            shape = real(draws, tail, block, blocks, align_right).shape
            n = 1
            for s in shape:
                n *= s
            return words()[torch.arange(n) % len(EXTREME_WORDS)].view(shape)

        monkeypatch.setattr(KeyedDraws, "bits", bits)


@pytest.mark.parametrize("dtype", DTYPES)
def test_keyed_draws_at_extreme_words(monkeypatch, dtype):
    ExtremeBits(monkeypatch)
    draws = KeyedDraws(torch.arange(6, dtype=torch.int64), Streams.GUMBEL)
    u = draws.uniform((7, 3), dtype)
    assert u.shape == (6, 7, 3) and u.dtype == dtype and strictly_inside(u)
    z = draws.normal((5,), dtype)
    assert z.shape == (6, 5) and torch.isfinite(z).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_generator_draws_are_inside_even_when_torch_rand_gives_zero(monkeypatch, dtype):
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.zeros(shape, dtype=kw.get("dtype")))
    u = GeneratorDraws(None, 3).uniform((4,), dtype)
    assert strictly_inside(u) and torch.isfinite(gumbel_from_uniform(u)).all()


def test_depth_controller_is_finite_when_every_gumbel_word_is_extreme(monkeypatch):
    ExtremeBits(monkeypatch)
    torch.manual_seed(0)
    controller = DepthController(hidden=8, max_len=6, max_depth=4).train()
    ids = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 9]])
    e0 = torch.randn(3, 6, 8, requires_grad=True)
    decision = controller(e0, ids, KeyedDraws(torch.arange(3, dtype=torch.int64), Streams.GUMBEL))
    assert torch.isfinite(decision.probs).all() and torch.isfinite(decision.exploration)
    (decision.survival.sum() + decision.exploration).backward()
    assert torch.isfinite(e0.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in controller.parameters() if p.grad is not None)


@triton.jit
def _convert_words(first_ptr, second_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    i1 = tl.load(first_ptr + offs, mask=mask, other=0).to(tl.uint32)
    i2 = tl.load(second_ptr + offs, mask=mask, other=0).to(tl.uint32)
    tl.store(out_ptr + offs, _normal_from_words(i1, i2), mask=mask)


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is off on CUDA")),
    pytest.param("cuda", marks=pytest.mark.gpu)])
def test_triton_box_muller_matches_the_cpu_and_is_finite_at_extreme_words(device):
    """The trajectory kernel's in-kernel noise converts Philox words with _normal_from_words;
    on the extreme words (compiled on a GPU, in the interpreter on the CPU) it gives the CPU's
    cos output."""
    w = words()
    pairs = torch.stack(torch.meshgrid(w, w, indexing="ij")).reshape(2, -1)
    out = torch.full((pairs.shape[1],), float("nan"), device=device)
    _convert_words[(1,)](pairs[0].to(device), pairs[1].to(device), out, pairs.shape[1], BLOCK=128)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.cpu(), normal_from_words(pairs)[0], rtol=1e-5, atol=1e-5)
