"""The linear cross-entropy's three implementations (adarec/linear_ce.py, kernels/linear_ce.py)
against F.cross_entropy of the materialised logits: loss and both gradients, on normal and odd
shapes, ignored rows, all-ignored batches, chunk and split sizes that do not divide the items.
The Triton kernels run under the interpreter on CPU (float32) and compiled on a GPU (bfloat16)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from adarec import backends
from adarec.linear_ce import chunked_linear_cross_entropy, kept_softmax_linear_cross_entropy, linear_cross_entropy
from adarec.models.losses import ItemCrossEntropy, ce_next_item_loss

# (rows, items, width): a block-aligned shape, then ragged rows, odd widths and item counts that
# are not multiples of the 64-item block or of the chunk.
SHAPES = [(64, 128, 32), (37, 101, 13), (130, 300, 33), (1, 65, 16), (5, 7, 3)]


def _inputs(rows, items, width, seed=0, ignored_every=4, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, generator=g).to(device, dtype)
    weight = (torch.randn(items, width, generator=g) * 0.5).to(device, dtype)
    target = torch.randint(0, items, (rows,), generator=g).to(device)
    if ignored_every:
        target[1::ignored_every] = -1            # row 0 kept, so even one row has a target
    return hidden, weight, target


def _reference(hidden, weight, target, reduction="mean"):
    """The oracle, independent of adarec: float64 logits and F.cross_entropy."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    loss = F.cross_entropy(h @ w.t(), target, ignore_index=-1, reduction=reduction)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _run(fn, hidden, weight, target, reduction="mean", **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = fn(h, w, target, ignore_index=-1, reduction=reduction, **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _assert_matches(got, want, atol=2e-5, rtol=2e-5):
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), got, want, strict=True):
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


def _fused():
    from adarec.kernels.linear_ce import fused_linear_cross_entropy
    return fused_linear_cross_entropy


def _impl(name):
    return {"chunked": chunked_linear_cross_entropy, "kept": kept_softmax_linear_cross_entropy}.get(name) or _fused()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("fn", [linear_cross_entropy, kept_softmax_linear_cross_entropy], ids=["eager", "kept"])
def test_eager_twin_and_kept_softmax_match_float64_cross_entropy(shape, reduction, fn):
    inputs = _inputs(*shape)
    _assert_matches(_run(fn, *inputs, reduction), _reference(*inputs, reduction))


@pytest.mark.parametrize("shape", [(64, 128, 32), (37, 101, 13)])
def test_kept_softmax_in_bf16_is_as_close_as_the_eager_twin(shape):
    """bf16 inputs: the products in bf16, everything after them in float32, as the eager twin;
    its error against float64 stays within twice the eager one's."""
    inputs = _inputs(*shape, dtype=torch.bfloat16)
    want = _reference(*inputs)
    eager, kept = _run(linear_cross_entropy, *inputs), _run(kept_softmax_linear_cross_entropy, *inputs)
    for a, b, ref in zip(kept, eager, want, strict=True):
        assert a.dtype == b.dtype
        assert float((a.double() - ref).abs().max()) <= 2 * float((b.double() - ref).abs().max()) + 1e-6


def test_kept_softmax_survives_a_second_backward():
    """The softmax it keeps is not consumed: PCGrad (train.grad_merge) takes several gradients of
    one graph."""
    hidden, weight, target = _inputs(37, 101, 13)
    h = hidden.clone().requires_grad_()
    loss = kept_softmax_linear_cross_entropy(h, weight, target, ignore_index=-1)
    (first,) = torch.autograd.grad(loss, h, retain_graph=True)
    (second,) = torch.autograd.grad(loss, h)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("item_chunk", [1, 7, 64, 10_000])
def test_chunked_matches_cross_entropy(shape, item_chunk):
    inputs = _inputs(*shape)
    for reduction in ("mean", "sum"):
        got = _run(chunked_linear_cross_entropy, *inputs, reduction, item_chunk=item_chunk)
        _assert_matches(got, _reference(*inputs, reduction))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("splits", [None, 3])
def test_triton_kernels_match_cross_entropy_in_the_interpreter(shape, splits):
    inputs = _inputs(*shape)
    for reduction in ("mean", "sum"):
        got = _run(_fused(), *inputs, reduction, splits=splits)
        _assert_matches(got, _reference(*inputs, reduction))


@pytest.mark.parametrize("impl", ["chunked", "kept", "fused"])
def test_all_ignored_batch_behaves_like_cross_entropy(impl):
    fn = _impl(impl)
    hidden, weight, target = _inputs(9, 40, 8)
    target[:] = -1
    loss, grad_h, grad_w = _run(fn, hidden, weight, target, "sum", item_chunk=16)
    assert loss.item() == 0.0 and not grad_h.any() and not grad_w.any()
    mean = fn(hidden, weight, target, ignore_index=-1, reduction="mean", item_chunk=16)
    want = F.cross_entropy(hidden @ weight.t(), target, ignore_index=-1)
    assert torch.isnan(mean) and torch.isnan(want)


@pytest.mark.parametrize("impl", ["chunked", "kept", "fused"])
def test_no_rows_at_all(impl):
    fn = _impl(impl)
    hidden, weight, _ = _inputs(3, 40, 8)
    empty, target = hidden[:0].clone().requires_grad_(), torch.zeros(0, dtype=torch.long)
    loss = fn(empty, weight, target, ignore_index=-1, reduction="sum", item_chunk=16)
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.shape == (0, 8)
    assert torch.isnan(fn(empty, weight, target, ignore_index=-1, item_chunk=16))


@pytest.mark.parametrize("impl", ["chunked", "kept", "fused"])
def test_gradients_reach_the_table_through_a_row_slice(impl):
    """The models pass item_weight[1:-1] (items without the padding and mask rows): the
    gradient lands on the sliced rows of the parameter and nowhere else."""
    fn = _impl(impl)
    hidden, table, target = _inputs(20, 52, 12)
    target = torch.where(target >= 0, target % 50, target)                  # classes of the 50-row slice
    table = table.detach().requires_grad_()
    fn(hidden, table[1:-1], target, ignore_index=-1, item_chunk=16).backward()
    ref_table = table.detach().double().requires_grad_()
    F.cross_entropy(hidden.double() @ ref_table[1:-1].t(), target, ignore_index=-1).backward()
    torch.testing.assert_close(table.grad.double(), ref_table.grad, atol=2e-5, rtol=2e-5)
    assert not table.grad[0].any() and not table.grad[-1].any()


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_chunked_path_never_builds_the_rows_by_items_logits():
    rows, items, width, chunk = 48, 1000, 8, 100
    hidden, weight, target = _inputs(rows, items, width)
    hidden.requires_grad_()
    weight.requires_grad_()
    with _LargestTensor() as seen:
        chunked_linear_cross_entropy(hidden, weight, target, ignore_index=-1, item_chunk=chunk).backward()
    # The largest tensors are the weight gradient (items x width) and a chunk's logits.
    assert seen.largest <= max(rows * chunk, items * width) < rows * items
    with _LargestTensor() as seen:
        linear_cross_entropy(hidden, weight, target, ignore_index=-1).backward()
    assert seen.largest >= rows * items                        # the probe sees the eager logits


def test_backend_choice(monkeypatch):
    cpu = torch.device("cpu")
    assert backends.linear_ce_function("eager", cpu, 10**6, 100) is linear_cross_entropy
    assert backends.linear_ce_function("auto", cpu, 100, 100) is kept_softmax_linear_cross_entropy
    assert backends.linear_ce_function("auto", cpu, 101, 100) is chunked_linear_cross_entropy
    assert backends.linear_ce_function("fused", cpu, 10, 100) is _fused()        # interpreter (conftest)
    # On CUDA the Triton kernels stay opt-in until a GPU run of the device check has passed them
    # (README, "Fused kernels"); then auto takes them for tables they can hold.
    cuda = torch.device("cuda")
    assert not backends.LINEAR_CE_GPU_VERIFIED
    assert backends.linear_ce_function("auto", cuda, 10**6, 100, 64) is chunked_linear_cross_entropy
    monkeypatch.setattr(backends, "LINEAR_CE_GPU_VERIFIED", True)
    assert backends.linear_ce_function("auto", cuda, 10**6, 100, 64) is _fused()
    assert backends.linear_ce_function("auto", cuda, 10**6, 100, 512) is chunked_linear_cross_entropy
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        backends.linear_ce_function("fused", cpu, 10, 100)
    monkeypatch.setenv("ADAREC_KERNELS", "eager")
    assert backends.linear_ce_function("auto", cpu, 10**6, 100) is linear_cross_entropy


def test_bad_inputs_are_refused_with_a_reason():
    hidden, weight, target = _inputs(4, 10, 300)
    with pytest.raises(ValueError, match="up to 256"):
        _fused()(hidden, weight, target)
    with pytest.raises(ValueError, match="target must be"):
        chunked_linear_cross_entropy(hidden, weight, target[:2])
    hidden, weight, target = _inputs(4, 10, 8)
    with pytest.raises(ValueError, match="float32 or both bfloat16"):
        _fused()(hidden.half(), weight.half(), target)


@pytest.mark.parametrize("impl", ["chunked", "kept", "fused"])
def test_a_frozen_table_gets_no_gradient(impl):
    """ADRec's warm-up epochs pass a detached table: only the hidden rows get a gradient."""
    fn = _impl(impl)
    hidden, weight, target = _inputs(20, 70, 12)
    h = hidden.clone().requires_grad_()
    fn(h, weight, target, ignore_index=-1, item_chunk=16).backward()
    _, want_h, _ = _reference(hidden, weight, target)
    torch.testing.assert_close(h.grad.double(), want_h, atol=2e-5, rtol=2e-5)


def test_autocast_runs_every_implementation_in_its_dtype():
    """Under bf16 autocast over float32 weights (the engine's one-GPU bf16), ItemCrossEntropy hands
    each implementation bf16 inputs: the chunked and fused losses and gradients match the eager
    one on those inputs, and the gradients come back in the parameters' float32."""
    hidden, weight, target = _inputs(40, 150, 16)
    results = {}
    for name, item_ce in (("eager", ItemCrossEntropy("eager")), ("chunked", ItemCrossEntropy("auto", item_chunk=32)),
                          ("kept", ItemCrossEntropy("auto")), ("fused", ItemCrossEntropy("fused"))):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = item_ce(h, w, target, ignore_index=-1)
        loss.backward()
        assert h.grad.dtype == w.grad.dtype == torch.float32
        results[name] = (loss.detach().float(), h.grad, w.grad)
    # The reference: float64 cross-entropy of the bf16-rounded inputs.
    want = _reference(hidden.bfloat16().float(), weight.bfloat16().float(), target)
    for name, got in results.items():
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a.double(), b, atol=2e-2, rtol=2e-2, msg=name)
    for a, b in zip(results["chunked"], results["fused"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


def test_next_item_loss_is_the_same_whichever_implementation():
    """ce_next_item_loss (items 1..N of the table, padding targets ignored) with the chunked or
    fused CE equals the eager one; the table's padding and mask rows get no gradient."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 6, 16, generator=g)
    table = torch.randn(83, 16, generator=g)
    target = torch.randint(0, 82, (4, 6), generator=g)                      # 0 = padding
    results = []
    for item_ce in (ItemCrossEntropy("eager"), ItemCrossEntropy("auto", item_chunk=10),
                    ItemCrossEntropy("fused")):
        t = table.clone().requires_grad_()
        loss = ce_next_item_loss(hidden, t, target, item_ce=item_ce)
        loss.backward()
        results.append((loss.detach(), t.grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, results[0][1], atol=1e-5, rtol=1e-5)
    assert not results[0][1][0].any() and not results[0][1][-1].any()


def test_training_curves_agree_across_implementations():
    """A small SASRec trained with CE for a few steps with each implementation: the same loss at
    every step (the Liger-style convergence check)."""
    from adarec.config import ModelConfig
    from adarec.models import build_model

    cfg = ModelConfig(name="sasrec", rec_loss="ce", hidden_size=16, num_layers=1, num_heads=2,
                      hidden_dropout=0.0, attn_dropout=0.0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 91, (8, 6), generator=g)
    batch = {"input_ids": ids, "target_pos": torch.roll(ids, -1, 1)}
    curves = {}
    for backend, chunk in (("eager", 32768), ("auto", 17), ("fused", 32768)):
        torch.manual_seed(0)
        model = build_model(cfg, num_items=90, max_len=6, kernel_backend=backend, ce_item_chunk=chunk)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        curve = []
        for _ in range(5):
            optimizer.zero_grad()
            loss, _ = model(batch)
            loss.backward()
            optimizer.step()
            curve.append(loss.item())
        curves[backend] = torch.tensor(curve)
    assert curves["eager"][-1] < curves["eager"][0]                     # it learns
    torch.testing.assert_close(curves["auto"], curves["eager"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(curves["fused"], curves["eager"], atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2048, 12101, 64), (333, 5000, 50), (64, 100_000, 128)])
def test_triton_kernels_bf16_on_gpu(shape):
    """bf16 on a GPU: |fused - fp64 ref| <= 2 |eager bf16 - fp64 ref| + atol, loss and gradients."""
    inputs = _inputs(*shape, dtype=torch.bfloat16, device="cuda")
    want = [t.cuda() for t in _reference(*[x.cpu() for x in inputs[:2]], inputs[2].cpu())]
    got = _run(_fused(), *inputs)
    eager = _run(linear_cross_entropy, *inputs)
    for name, a, b, ref in zip(("loss", "grad hidden", "grad weight"), got, eager, want, strict=True):
        err_fused = (a.double() - ref).abs().max().item()
        err_eager = (b.double() - ref).abs().max().item()
        assert err_fused <= 2 * err_eager + 1e-2 * ref.abs().max().item(), (name, err_fused, err_eager)
