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
    mask = torch.ones(pairs)
    if st_masks:  # a straight-through mask is exactly 1 in value; vary it so its gradient path is tested
        mask = mask + 0.3 * torch.randn(pairs, generator=g)
    inputs = {
        "fin": torch.randn(pairs, length, dim, generator=g),
        "coar": torch.randn(pairs, dim, generator=g),
        "g": torch.rand(pairs, generator=g) * 0.9 + 0.05,
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


def raw_forward(inputs):
    return torch.ops.adarec.gated_fusion_forward(*(inputs[k] for k in ORDER))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda x: dict(x, fin=x["fin"][0]), "fin must be \\[P, L, D\\]"),
        (lambda x: dict(x, coar=x["coar"][:, :-1]), "coar must be \\[P, D\\]"),
        (lambda x: dict(x, g=x["g"][:-1]), "g must be \\[P\\]"),
        (lambda x: dict(x, m=x["m"].float()), "m must have fin's dtype"),
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
        h, z = ops.gated_fusion(x, torch.randn(3, 4, dtype=torch.float64), torch.rand(3, dtype=torch.float64),
                                torch.ones(3, dtype=torch.float64), torch.tensor([0, 1, 3]),
                                torch.eye(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
        print("jit ok", tuple(h.shape), tuple(z.shape))
    """)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "without jit: adarec._C is not built" in out.stdout
    assert "jit ok (2, 2, 4) (2, 4)" in out.stdout


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
