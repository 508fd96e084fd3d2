"""The native gated fusion (csrc/, `adarec.ops.gated_fusion`) against its eager twin
(adarec/fusion.py). The CPU extension is built by the README's install command, so these tests
run in CI; the CUDA ones are marked `gpu`."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adarec import backends, ops
from adarec.fusion import gated_fusion as eager_gated_fusion

FLOAT_NAMES = ("fin", "coar", "g", "m", "w_gate", "b_gate")
ORDER = ("fin", "coar", "g", "m", "offsets", "w_gate", "b_gate")


def make_inputs(levels_per_user, length, dim, dtype=torch.float64, device="cpu", seed=0, st_masks=True):
    """Packed expert outputs for users with the given number of levels each (T_u + 1)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor(levels_per_user)
    pairs = int(counts.sum())
    mask = torch.ones(pairs, length)
    if st_masks:  # a straight-through mask is exactly 1 in value; vary it so its gradient path is tested
        mask = mask + 0.3 * torch.randn(pairs, length, generator=g)
    inputs = {
        "fin": torch.randn(pairs, length, dim, generator=g),
        "coar": torch.randn(pairs, length, dim, generator=g),
        "g": torch.rand(pairs, length, generator=g) * 0.9 + 0.05,
        "m": mask,
        "offsets": F.pad(counts.cumsum(0), (1, 0)),
        "w_gate": torch.randn(dim, dim, generator=g) / dim**0.5,
        "b_gate": 0.1 * torch.randn(dim, generator=g),
    }
    return {k: v.to(device=device, dtype=dtype if k in FLOAT_NAMES else torch.int64) for k, v in inputs.items()}


def forward_backward(fn, inputs, seed=1):
    leaves = {k: inputs[k].detach().clone().requires_grad_() for k in FLOAT_NAMES}
    h, z_coar = fn(*(leaves.get(k, inputs[k]) for k in ORDER))
    g = torch.Generator().manual_seed(seed)
    grad_h = torch.randn(h.shape, generator=g).to(h)
    grad_z = torch.randn(z_coar.shape, generator=g).to(z_coar)
    ((h.float() * grad_h.float()).sum() + (z_coar.float() * grad_z.float()).sum()).backward()
    return h.detach(), z_coar.detach(), {k: v.grad for k, v in leaves.items()}


CASES = {
    "ragged": ([1, 9, 3, 4], 6, 8),           # a user with one level and one with T_max + 1 = 9
    "one_user": ([5], 4, 8),                  # B = 1
    "odd_dim": ([2, 1, 7], 5, 13),            # odd D
    "single_pairs": ([1, 1, 1], 3, 4),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_cpu_forward_and_backward_equal_the_eager_twin(case, dtype):
    inputs = make_inputs(*case, dtype=dtype)
    h_e, z_e, grads_e = forward_backward(eager_gated_fusion, inputs)
    h_n, z_n, grads_n = forward_backward(ops.gated_fusion, inputs)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(h_n, h_e, **tol)
    torch.testing.assert_close(z_n, z_e, **tol)
    for name in FLOAT_NAMES:
        torch.testing.assert_close(grads_n[name], grads_e[name], **tol, msg=name)


@pytest.mark.parametrize("case", [CASES["ragged"], CASES["odd_dim"]], ids=["ragged", "odd_dim"])
def test_gradcheck_float64(case):
    inputs = make_inputs(*case)
    args = [inputs[k].detach().clone().requires_grad_(k in FLOAT_NAMES) for k in ORDER]
    assert torch.autograd.gradcheck(ops.gated_fusion, args, eps=1e-6, atol=1e-6)


def test_depth_masking_levels_outside_a_segment_never_leak():
    """Changing user 0's rows leaves every other user's h and z_coar bit-identical."""
    inputs = make_inputs([2, 4, 1], 3, 6)
    h, z, _ = forward_backward(ops.gated_fusion, inputs)
    changed = dict(inputs, fin=inputs["fin"].clone(), coar=inputs["coar"].clone())
    changed["fin"][:2] += 5.0
    changed["coar"][:2] -= 3.0
    h2, z2, _ = forward_backward(ops.gated_fusion, changed)
    assert torch.equal(h[1:], h2[1:]) and torch.equal(z[1:], z2[1:])
    assert not torch.allclose(h[0], h2[0])


def loop_fusion(inputs):
    """The fusion written out user by user, position by position, in float64 Python scalars
    for the weights: an oracle independent of both implementations."""
    fin, coar, g, m, offsets = (inputs[k].double() for k in ("fin", "coar", "g", "m", "offsets"))
    w, b = inputs["w_gate"].double(), inputs["b_gate"].double()
    users, length = offsets.numel() - 1, fin.shape[1]
    h = torch.zeros(users, length, fin.shape[2], dtype=torch.float64)
    z_coar = torch.zeros_like(h)
    for u in range(users):
        rows = range(int(offsets[u]), int(offsets[u + 1]))
        for i in range(length):
            wf = [float(m[k, i] * g[k, i]) for k in rows]
            wc = [float(m[k, i] * (1 - g[k, i])) for k in rows]
            zf = sum(x * fin[k, i] for x, k in zip(wf, rows, strict=True)) / (sum(wf) + 1e-8)
            zc = sum(x * coar[k, i] for x, k in zip(wc, rows, strict=True)) / (sum(wc) + 1e-8)
            gate = torch.sigmoid(w @ zc + b)
            h[u, i] = gate * zf + (1 - gate) * zc
            z_coar[u, i] = zc
    return h, z_coar


@pytest.mark.parametrize("fn", [eager_gated_fusion, ops.gated_fusion], ids=["eager", "native"])
def test_both_implementations_match_a_loop_over_users_and_positions(fn):
    inputs = make_inputs([1, 4, 2], 5, 6)
    h, z = fn(*(inputs[k] for k in ORDER))
    h_ref, z_ref = loop_fusion(inputs)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(z, z_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fn", [eager_gated_fusion, ops.gated_fusion], ids=["eager", "native"])
def test_position_i_reads_only_position_i_of_its_inputs(fn):
    """Per-position contract: perturbing every pair's inputs at position j moves h only at j."""
    inputs = make_inputs([2, 3], 6, 4)
    h, z = fn(*(inputs[k] for k in ORDER))
    j = 3
    changed = dict(inputs, fin=inputs["fin"].clone(), coar=inputs["coar"].clone(), g=inputs["g"].clone())
    changed["fin"][:, j] += 1.0
    changed["coar"][:, j] -= 1.0
    changed["g"][:, j] = 1.0 - changed["g"][:, j]
    h2, z2 = fn(*(changed[k] for k in ORDER))
    others = torch.arange(6) != j
    assert torch.equal(h[:, others], h2[:, others]) and torch.equal(z[:, others], z2[:, others])
    assert not torch.allclose(h[:, j], h2[:, j])


@pytest.mark.parametrize("fn", [eager_gated_fusion, ops.gated_fusion], ids=["eager", "native"])
def test_a_zero_weight_probe_pair_leaves_the_output_bit_exact_and_gets_a_mask_gradient(fn):
    """depth_gradient=probe: an extra last pair per user with mask value 0 (and a straight-through
    gradient) must not change h in any bit, and must receive d m != 0 at every position."""
    base = make_inputs([2, 3], 4, 5, dtype=torch.float32, st_masks=False)
    g = torch.Generator().manual_seed(7)
    offsets = base["offsets"]
    rows, probe_rows = [], []
    for u in range(2):
        rows += [*list(range(int(offsets[u]), int(offsets[u + 1]))), -1]
    pairs = len(rows)
    extra = {"fin": torch.randn(pairs, 4, 5, generator=g), "coar": torch.randn(pairs, 4, 5, generator=g),
             "g": torch.rand(pairs, 4, generator=g)}
    probe = dict(base, offsets=torch.tensor([0, 3, 7]))
    for name in ("fin", "coar", "g"):
        probe[name] = torch.stack([base[name][r] if r >= 0 else extra[name][i] for i, r in enumerate(rows)])
    probe_rows = [i for i, r in enumerate(rows) if r < 0]
    probe["m"] = torch.tensor([0.0 if r < 0 else 1.0 for r in rows])[:, None].expand(-1, 4).contiguous()
    h, z = fn(*(base[k] for k in ORDER))
    h_p, z_p = fn(*(probe[k] for k in ORDER))
    assert torch.equal(h, h_p) and torch.equal(z, z_p)
    _, _, grads = forward_backward(fn, probe)
    assert (grads["m"][probe_rows].abs() > 0).all()
    assert torch.equal(grads["fin"][probe_rows], torch.zeros_like(grads["fin"][probe_rows]))
    assert torch.equal(grads["g"][probe_rows], torch.zeros_like(grads["g"][probe_rows]))


def raw_forward(inputs):
    return torch.ops.adarec.gated_fusion_forward(*(inputs[k] for k in ORDER))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda x: dict(x, fin=x["fin"][0]), "fin must be \\[P, L, D\\]"),
        (lambda x: dict(x, coar=x["coar"][:, :, :-1].contiguous()), "coar must be \\[P, L, D\\]"),
        (lambda x: dict(x, coar=x["coar"][:, 0].contiguous()), "coar must be \\[P, L, D\\]"),
        (lambda x: dict(x, g=x["g"][:-1]), "g must be \\[P, L\\]"),
        (lambda x: dict(x, g=x["g"][:, 0].contiguous()), "g must be \\[P, L\\]"),
        (lambda x: dict(x, m=x["m"].float()), "m must have fin's dtype"),
        (lambda x: dict(x, m=x["m"][:, 0].contiguous()), "m must be \\[P, L\\]"),
        (lambda x: dict(x, offsets=x["offsets"].int()), "offsets must be int64"),
        (lambda x: dict(x, offsets=x["offsets"][:-1]), "offsets must start at 0 and end at P"),
        (lambda x: dict(x, w_gate=x["w_gate"][:-1]), "w_gate must be \\[D, D\\]"),
        (lambda x: dict(x, w_gate=x["w_gate"].t()), "w_gate must be contiguous"),
        (lambda x: dict(x, b_gate=x["b_gate"][:-1]), "b_gate must be \\[D\\]"),
        (lambda x: {k: (v.int() if k != "offsets" else v) for k, v in x.items()}, "floating point"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    inputs = make_inputs([2, 3], 4, 5)
    with pytest.raises(RuntimeError, match=message):
        raw_forward(change(inputs))


# ----------------------------------------------------------------------------- loading and backends


def test_auto_uses_the_native_op_on_cpu_and_eager_stays_eager(monkeypatch):
    monkeypatch.delenv("ADAREC_KERNELS", raising=False)
    cpu = torch.device("cpu")
    assert backends.fusion_function("auto", cpu) is ops.gated_fusion
    assert backends.fusion_function("fused", cpu) is ops.gated_fusion
    assert backends.fusion_function("eager", cpu) is eager_gated_fusion


def test_unloadable_native_op_auto_falls_back_and_logs_once_fused_raises(monkeypatch):
    monkeypatch.delenv("ADAREC_KERNELS", raising=False)

    def unavailable(jit=None):
        raise ops.NativeOpUnavailable("adarec._C is not built (test)")

    monkeypatch.setattr(ops, "load_native", unavailable)
    warnings = []
    monkeypatch.setattr(backends.log, "warning", warnings.append)
    backends._warn_once.cache_clear()
    cpu = torch.device("cpu")
    assert backends.fusion_function("auto", cpu) is eager_gated_fusion
    assert backends.fusion_function("auto", cpu) is eager_gated_fusion
    assert len(warnings) == 1 and "eager gated fusion" in warnings[0] and "not built" in warnings[0]
    with pytest.raises(RuntimeError, match="not built"):
        backends.fusion_function("fused", cpu)
    backends._warn_once.cache_clear()


def test_jit_build_registers_the_operator_when_the_extension_is_missing(tmp_path):
    """A fresh interpreter that cannot import adarec._C builds csrc/ with cpp_extension.load."""
    script = textwrap.dedent("""
        import sys
        sys.modules["adarec._C"] = None          # as if the wheel had been built without it
        import torch
        from adarec import ops
        try:
            ops.load_native(jit=False)
        except ops.NativeOpUnavailable as exc:
            print("without jit:", exc)
        ops._load.cache_clear()
        ops.load_native(jit=True)
        x = torch.randn(3, 2, 4, dtype=torch.float64)
        h, z = ops.gated_fusion(x, torch.randn(3, 2, 4, dtype=torch.float64), torch.rand(3, 2, dtype=torch.float64),
                                torch.ones(3, 2, dtype=torch.float64), torch.tensor([0, 1, 3]),
                                torch.eye(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
        print("jit ok", tuple(h.shape), tuple(z.shape))
    """)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "without jit: adarec._C is not built" in out.stdout
    assert "jit ok (2, 2, 4) (2, 2, 4)" in out.stdout


def test_fusion_benchmark_runs_the_per_position_contract(tmp_path, monkeypatch):
    """profiling/bench_fusion.py at a tiny shape with a scripted clock: both backends run on the
    [P, L, D] / [P, L] inputs, and the native row's speedup is eager median / native median."""
    from adarec.profiling import bench_fusion

    clock = iter([[4.0, 2.0, 3.0], [1.0, 1.5, 0.5]])
    monkeypatch.setattr(bench_fusion, "time_callable", lambda fn, *a, **k: (fn(), next(clock))[1])
    rows = bench_fusion.main(["--batch", "4", "--max-len", "5", "--dim", "6", "--max-depth", "3", "--dtype", "fp32",
                              "--device", "cpu", "--repeats", "3", "--out", str(tmp_path)])
    assert [r["backend"] for r in rows] == ["eager", "native"]
    assert [r["median_ms"] for r in rows] == [3.0, 1.0] and rows[1]["speedup_vs_eager"] == 3.0
    assert 4 <= rows[0]["pairs"] <= 16


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_cuda_fp32_equals_the_eager_twin(case):
    inputs = make_inputs(*case, dtype=torch.float32, device="cuda")
    h_e, z_e, grads_e = forward_backward(eager_gated_fusion, inputs)
    h_n, z_n, grads_n = forward_backward(ops.gated_fusion, inputs)
    torch.testing.assert_close(h_n, h_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_n, z_e, rtol=1e-5, atol=1e-5)
    for name in FLOAT_NAMES:
        torch.testing.assert_close(grads_n[name], grads_e[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.gpu
def test_cuda_bf16_within_twice_the_eager_bf16_error():
    """flash-attention's rule against an fp32 reference: |native - ref| <= 2 |eager_bf16 - ref| + atol."""
    levels = [1, 9, 3, 4, 9, 2, 5, 7]
    ref = forward_backward(eager_gated_fusion, make_inputs(levels, 50, 256, dtype=torch.float32, device="cuda"))
    half = make_inputs(levels, 50, 256, dtype=torch.bfloat16, device="cuda")
    eager = forward_backward(eager_gated_fusion, half)
    native = forward_backward(ops.gated_fusion, half)
    pairs = [(native[0], eager[0], ref[0]), (native[1], eager[1], ref[1])]
    pairs += [(native[2][k], eager[2][k], ref[2][k]) for k in FLOAT_NAMES]
    for got, base, exact in pairs:
        got, base, exact = got.float(), base.float(), exact.float()
        atol = 1e-2 * exact.abs().max().item()
        assert (got - exact).abs().max() <= 2 * (base - exact).abs().max() + atol


@pytest.mark.skipif(torch.cuda.is_available() or shutil.which("nvcc") is None,
                    reason="needs nvcc and no GPU (a GPU machine builds and runs the CUDA op for real)")
def test_cuda_source_compiles_for_an_h100_with_nvcc(tmp_path):
    """Compile csrc/gated_fusion_cuda.cu to an object for sm_90 against this torch's headers, so
    the CUDA implementation is at least type-checked on machines without a GPU. A CPU build of
    torch lacks one generated c10 header; a stand-in declaring shared-library linkage is used."""
    import sysconfig

    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    include = Path(torch.__file__).parent / "include"
    repo = Path(__file__).resolve().parents[1]
    cmd = ["nvcc", "-c", str(repo / "csrc/gated_fusion_cuda.cu"), "-o", str(tmp_path / "fusion.o"), "-std=c++17",
           "-arch=sm_90", "--expt-relaxed-constexpr", f"-I{repo / 'csrc'}", f"-I{tmp_path / 'stub'}",
           f"-I{include}", f"-I{include / 'torch/csrc/api/include'}", f"-I{sysconfig.get_paths()['include']}",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    assert (tmp_path / "fusion.o").stat().st_size > 0


def test_backward_entry_point_names_a_bad_gradient():
    inputs = make_inputs([2, 3], 4, 5)
    h, z_coar, z_fin, gate, den_fin, den_coar = raw_forward(inputs)
    args = [inputs[k] for k in ("fin", "coar", "g", "m", "offsets", "w_gate")]
    with pytest.raises(RuntimeError, match="grad_h must be a contiguous"):
        torch.ops.adarec.gated_fusion_backward(h[:, :-1].contiguous(), torch.zeros_like(z_coar), *args, z_fin, z_coar,
                                               gate, den_fin, den_coar)
    with pytest.raises(RuntimeError, match="grad_z_coar must be"):
        torch.ops.adarec.gated_fusion_backward(torch.zeros_like(h), z_coar.float(), *args, z_fin, z_coar, gate,
                                               den_fin, den_coar)
