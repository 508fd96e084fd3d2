"""The fused ops as torch.library custom ops: the native gated fusion (csrc/, adarec/ops.py) and
the Triton trajectory (kernels/trajectory.py).

`torch.library.opcheck` runs its default checks on each op (schema, autograd registration, fake
implementation against the real op, AOT dispatch with dynamic shapes, forward and backward), and
`torch.compile(fullgraph=True)` traces through the public entry points with no graph break; the
compiled forward and backward must equal the uncompiled call and match the eager twins. Without
CUDA the Triton kernels run under TRITON_INTERPRET=1 (set by conftest before any kernel import),
so every shape here is tiny.
"""

import shutil

import pytest
import torch
from adarec.kernels.trajectory import fused_diffusion_trajectory
from test_gated_fusion_op import FLOAT_NAMES, ORDER, make_inputs
from test_trajectory_kernel import WEIGHT_NAMES, make_problem
from torch._dynamo.testing import AotEagerAndRecordGraphs
from torch._subclasses.fake_tensor import FakeTensorMode

from adarec import ops
from adarec.diffusion import diffusion_trajectory
from adarec.fusion import gated_fusion as eager_gated_fusion

TRAJECTORY_ARGS = ("e0", "lengths", "pair_user", "pair_level", "sqrt_abar", "sqrt_one_minus_abar", *WEIGHT_NAMES)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread, as conftest gives the other tiny-tensor tests: OpenMP threads stall on
    a CPU shared with other work and buy nothing at these sizes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _fresh_compile_state():
    """Each compile test traces from scratch, so one test's cached graphs never serve another."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- gated fusion inputs

# (pairs owned by each user, L, D): a user with no pair (its denominators are eps alone), users
# owning 1..3 pairs, L = 1, odd D.
GATED_CASES = {
    "users_own_0_to_3_pairs": ([1, 0, 3, 2], 4, 3),
    "length_one": ([2, 1, 3], 1, 3),
    "ragged": ([3, 1], 5, 8),
}


def gated_args(case, dtype, device="cpu", requires_grad=True):
    """The op's seven arguments in order; the floating ones are leaves that require grad."""
    inputs = make_inputs(*case, dtype=dtype, device=device)
    return [inputs[k].requires_grad_(requires_grad and k in FLOAT_NAMES) for k in ORDER]


def gated_backward_args(case, dtype, device="cpu"):
    """The backward op's 13 arguments: incoming gradients, the forward's inputs and what the
    forward saved. No input requires grad: the backward op has no derivative of its own."""
    args = gated_args(case, dtype, device, requires_grad=False)
    fin, coar, g, m, offsets, w_gate, _b_gate = args
    h, z_coar, z_fin, gate, den_fin, den_coar = torch.ops.adarec.gated_fusion_forward(*args)
    gen = torch.Generator().manual_seed(5)
    grad_h = torch.randn(h.shape, generator=gen).to(h)
    grad_z_coar = torch.randn(z_coar.shape, generator=gen).to(z_coar)
    return [grad_h, grad_z_coar, fin, coar, g, m, offsets, w_gate, z_fin, z_coar, gate, den_fin, den_coar]


# ----------------------------------------------------------------------------- trajectory inputs

# Three users of lengths 2, 1, 3 and depths 1, 0, 2; D = 3 and H = 8 (padded to the kernel tiles).
TRAJECTORY_SHAPE = {"lengths": [2, 1, 3], "depths": [1, 0, 2], "length": 3, "dim": 3, "width": 8, "max_depth": 2}


def trajectory_problem(dtype=torch.float32):
    return make_problem(**TRAJECTORY_SHAPE, dtype=dtype)


def trajectory_row_keys(problem):
    """One int64 row key per user, with high words of their own (both halves reach the counter)."""
    batch = problem["e0"].shape[0]
    return torch.tensor([2**62 + 2**32 * u + 2 * u + 1 for u in range(batch)], device=problem["e0"].device)


def trajectory_args(problem, noise_mode, requires_grad=True):
    """trajectory_forward's 16 arguments: E^0 and the weights as leaves, a seed [1], and the
    noise / zero_noise / loss weights / row keys of the given mode ("keyed": drawn noise keyed
    by row keys). The loss weights of "given" drop one noisy pair from L_deno, as the
    depth-gradient probe does."""
    tensors = [problem[k].detach().clone().requires_grad_(requires_grad and k in ("e0", *WEIGHT_NAMES))
               for k in TRAJECTORY_ARGS]
    seed = torch.tensor([7], dtype=torch.int64, device=problem["e0"].device)
    if noise_mode == "given":
        weight = (problem["pair_level"] != problem["pair_level"].max()).float()
        return [*tensors, problem["noise"], seed, False, weight, None]
    keys = trajectory_row_keys(problem) if noise_mode == "keyed" else None
    return [*tensors, None, seed, noise_mode == "zero", None, keys]


def trajectory_backward_args(problem, noise_mode):
    """trajectory_backward's 24 arguments: the gradients of (ehat, loss), the forward's
    arguments, then the row map the forward returned."""
    args = trajectory_args(problem, noise_mode, requires_grad=False)
    ehat, _, *row_map = torch.ops.adarec.trajectory_forward(*args)
    grad_ehat = torch.randn(ehat.shape, generator=torch.Generator().manual_seed(5)).to(ehat)
    return [grad_ehat, torch.tensor(1.5, device=ehat.device), *args, *row_map]


# ----------------------------------------------------------------------------- opcheck


def assert_opcheck(op, args):
    """opcheck with its full default set of checks; every one must succeed."""
    results = torch.library.opcheck(op, args)
    assert results and set(results.values()) == {"SUCCESS"}, results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("case", GATED_CASES.values(), ids=GATED_CASES.keys())
def test_opcheck_gated_fusion_forward(case, dtype):
    ops.load_native()
    assert_opcheck(torch.ops.adarec.gated_fusion_forward.default, gated_args(case, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", GATED_CASES.values(), ids=GATED_CASES.keys())
def test_opcheck_gated_fusion_backward(case, dtype):
    ops.load_native()
    assert_opcheck(torch.ops.adarec.gated_fusion_backward.default, gated_backward_args(case, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=["bf16", "fp32", "fp64"])
def test_gated_fusion_fakes_give_the_real_ops_shapes_dtypes_and_strides(dtype):
    """The fake implementations against the real ops, output by output: z_fin, gate and h in the
    input dtype, the denominators in the accumulation dtype (fp32 for bf16, fp64 for fp64)."""
    ops.load_native()
    case = GATED_CASES["users_own_0_to_3_pairs"]
    args = gated_args(case, dtype, requires_grad=False)
    backward_args = gated_backward_args(case, dtype)
    real = (torch.ops.adarec.gated_fusion_forward(*args), torch.ops.adarec.gated_fusion_backward(*backward_args))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = (torch.ops.adarec.gated_fusion_forward(*(mode.from_tensor(a) for a in args)),
                torch.ops.adarec.gated_fusion_backward(*(mode.from_tensor(a) for a in backward_args)))
    for real_outputs, fake_outputs in zip(real, fake, strict=True):
        assert len(real_outputs) == len(fake_outputs) == 6
        for r, f in zip(real_outputs, fake_outputs, strict=True):
            assert (f.shape, f.dtype, f.stride()) == (r.shape, r.dtype, r.stride())
    assert real[0][4].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("noise_mode", ["rng", "keyed", "given", "zero"])
def test_opcheck_trajectory_forward(noise_mode):
    assert_opcheck(torch.ops.adarec.trajectory_forward.default, trajectory_args(trajectory_problem(), noise_mode))


@pytest.mark.parametrize("noise_mode", ["rng", "keyed"])
def test_opcheck_trajectory_backward(noise_mode):
    assert_opcheck(torch.ops.adarec.trajectory_backward.default,
                   trajectory_backward_args(trajectory_problem(), noise_mode))


def test_trajectory_forward_schema_takes_optional_row_keys_last():
    """`keys` is the forward's last argument and optional (callers without it are unchanged);
    the backward takes it after the forward's other inputs, before the row map."""
    forward = torch.ops.adarec.trajectory_forward.default._schema
    backward = torch.ops.adarec.trajectory_backward.default._schema
    keys = forward.arguments[-1]
    assert keys.name == "keys" and str(keys.type) == "Optional[Tensor]" and keys.default_value is None
    assert [a.name for a in backward.arguments][-7:] == ["keys", "row_user", "row_pos", "num_rows", "depth",
                                                         "offsets", "noisy_rows"]


# ----------------------------------------------------------------------------- torch.compile


def gated_loss(fusion, args, seed=1):
    """A scalar of both results with fixed random weights, so every gradient path is used."""
    h, z_coar = fusion(*args)
    gen = torch.Generator().manual_seed(seed)
    return (h * torch.randn(h.shape, generator=gen).to(h)).sum() + (z_coar * z_coar).sum()


def gated_forward_backward(fusion, case):
    args = gated_args(case, torch.float32)
    loss = gated_loss(fusion, args)
    loss.backward()
    return loss.detach(), [a.grad for a in args if a.requires_grad]


def assert_same(got, want, atol=1e-6):
    (loss_got, grads_got), (loss_want, grads_want) = got, want
    torch.testing.assert_close(loss_got, loss_want, rtol=atol, atol=atol)
    for name, g, w in zip(FLOAT_NAMES, grads_got, grads_want, strict=True):
        torch.testing.assert_close(g, w, rtol=atol, atol=atol, msg=name)


def test_compiled_gated_fusion_equals_the_uncompiled_op_and_the_eager_twin():
    """aot_eager, no graph break; a second call with other P and B recompiles with dynamic
    shapes (the fake implementation on symbolic sizes) and must still be right."""
    compiled = torch.compile(ops.gated_fusion, backend="aot_eager", fullgraph=True)
    for case in (GATED_CASES["ragged"], GATED_CASES["users_own_0_to_3_pairs"]):
        got = gated_forward_backward(compiled, case)
        assert_same(got, gated_forward_backward(ops.gated_fusion, case))
        assert_same(got, gated_forward_backward(eager_gated_fusion, case), atol=1e-5)


def fusion_then_pointwise(*args):
    """The native op followed by elementwise work, which inductor turns into generated code."""
    h, z_coar = ops.gated_fusion(*args)
    return torch.tanh(h) * z_coar, z_coar


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("clang++") is None,
                    reason="inductor's CPU backend compiles its generated kernels with a C++ compiler")
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch's own
def test_gated_fusion_under_inductor_equals_the_uncompiled_op():
    """The default backend: the op runs as an extern kernel between generated C++ kernels (the
    compile of those kernels is most of this test's time)."""
    case = GATED_CASES["ragged"]
    compiled = torch.compile(fusion_then_pointwise, fullgraph=True)
    assert_same(gated_forward_backward(compiled, case), gated_forward_backward(fusion_then_pointwise, case))


def test_compiled_gated_fusion_raises_the_loaders_reason_when_the_library_is_unavailable(monkeypatch):
    """Where the library cannot load, the compiled call falls back to running the entry point
    as Python, which raises NativeOpUnavailable with the loader's reason, as the eager call does."""
    def unavailable(jit=None):
        raise ops.NativeOpUnavailable("adarec._C is not built (test)")

    monkeypatch.setattr(ops, "load_native", unavailable)
    args = gated_args(GATED_CASES["length_one"], torch.float32)
    for fusion in (ops.gated_fusion, torch.compile(ops.gated_fusion, backend="aot_eager")):
        with pytest.raises(ops.NativeOpUnavailable, match="not built"):
            fusion(*args)


def traced_targets(graphs):
    return {node.target for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd:UserWarning")  # the recorder's, harmless
def test_each_op_is_one_node_of_the_compiled_graphs_forward_and_backward():
    """torch.compile traces through the entry points: the forward op is a node of the forward
    graph and the backward op of the backward graph (not an opaque call or a graph break)."""
    recorder = AotEagerAndRecordGraphs()
    gated_forward_backward(torch.compile(ops.gated_fusion, backend=recorder, fullgraph=True),
                           GATED_CASES["length_one"])
    assert torch.ops.adarec.gated_fusion_forward.default in traced_targets(recorder.fw_graphs)
    assert torch.ops.adarec.gated_fusion_backward.default in traced_targets(recorder.bw_graphs)

    recorder = AotEagerAndRecordGraphs()
    trajectory_forward_backward(torch.compile(fused_diffusion_trajectory, backend=recorder, fullgraph=True),
                                trajectory_problem(), seed=3)
    assert torch.ops.adarec.trajectory_forward.default in traced_targets(recorder.fw_graphs)
    assert torch.ops.adarec.trajectory_backward.default in traced_targets(recorder.bw_graphs)


def trajectory_forward_backward(trajectory, problem, **kw):
    """(ehat, loss, grads of E^0 and the weights) of a forward and backward through both results."""
    leaves = {k: problem[k].detach().clone().requires_grad_() for k in ("e0", *WEIGHT_NAMES)}
    args = {k: leaves.get(k, problem[k]) for k in TRAJECTORY_ARGS}
    ehat, loss = trajectory(**args, **kw)
    grad_out = torch.randn(ehat.shape, generator=torch.Generator().manual_seed(2)).to(ehat)
    ((ehat * grad_out).sum() + 3.0 * loss).backward()
    return ehat.detach(), loss.detach(), {k: v.grad for k, v in leaves.items()}


def assert_same_trajectory(got, want, atol):
    torch.testing.assert_close(got[0], want[0], rtol=atol, atol=atol)
    torch.testing.assert_close(got[1], want[1], rtol=atol, atol=atol)
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=atol, atol=atol, msg=name)


def test_compiled_trajectory_with_given_noise_equals_the_uncompiled_op_and_the_eager_twin():
    problem = trajectory_problem()
    compiled = torch.compile(fused_diffusion_trajectory, backend="aot_eager", fullgraph=True)
    got = trajectory_forward_backward(compiled, problem, noise=problem["noise"])
    assert_same_trajectory(got, trajectory_forward_backward(fused_diffusion_trajectory, problem,
                                                            noise=problem["noise"]), atol=1e-6)
    # The eager twin sums in another order: the tolerances of tests/test_trajectory_kernel.py.
    assert_same_trajectory(got, trajectory_forward_backward(diffusion_trajectory, problem, noise=problem["noise"]),
                           atol=1e-4)


def test_compiled_trajectory_with_in_kernel_noise_equals_the_uncompiled_op():
    """The RNG path: the same seed (and row keys) draw the same Philox noise, compiled or not, and
    the compiled backward regenerates it; zero_noise must be honoured through the compiled call too."""
    problem = trajectory_problem()
    compiled = torch.compile(fused_diffusion_trajectory, backend="aot_eager", fullgraph=True)
    for kw in ({"seed": 11}, {"seed": 11, "zero_noise": True}, {"seed": 11, "keys": trajectory_row_keys(problem)}):
        assert_same_trajectory(trajectory_forward_backward(compiled, problem, **kw),
                               trajectory_forward_backward(fused_diffusion_trajectory, problem, **kw), atol=1e-6)


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck_both_ops_on_cuda(dtype):
    """The CUDA implementations: the compiled Triton kernels and the CUDA gated fusion (a build
    with nvcc) pass the same default checks as the CPU paths."""
    ops.load_native()
    for case in GATED_CASES.values():
        assert_opcheck(torch.ops.adarec.gated_fusion_forward.default, gated_args(case, dtype, device="cuda"))
        assert_opcheck(torch.ops.adarec.gated_fusion_backward.default, gated_backward_args(case, dtype, "cuda"))
    problem = trajectory_problem(dtype)
    for noise_mode in ("rng", "keyed", "given", "zero"):
        assert_opcheck(torch.ops.adarec.trajectory_forward.default, trajectory_args(problem, noise_mode))
    for noise_mode in ("rng", "keyed"):
        assert_opcheck(torch.ops.adarec.trajectory_backward.default, trajectory_backward_args(problem, noise_mode))


# -- the whole model under torch.compile ------------------------------------------------------------
@pytest.mark.parametrize("backend", ["eager", "fused"])
def test_compiled_adarec_forward_and_backward_match_eager(backend):
    """torch.compile (aot_eager) of ADARec's training forward, then the backward, against the
    uncompiled model: the same loss and gradients. With the fused backend the trajectory (Triton,
    interpreter) and the gated fusion (C++) are custom ops inside the compiled graphs. (Dynamo
    breaks the graph at the GRU, which it does not trace, and at the native-op availability check.)"""
    from test_adarec import batch_for, make_model

    model = make_model(backend=backend).train()
    batch = batch_for()
    params = [p for p in model.parameters() if p.requires_grad]

    def step(module):
        torch.manual_seed(1)                       # the same Gumbel and noise draws
        loss, _ = module(batch)
        return loss, torch.autograd.grad(loss, params, allow_unused=True)

    want_loss, want_grads = step(model)
    torch._dynamo.reset()
    got_loss, got_grads = step(torch.compile(model, backend="aot_eager"))
    torch._dynamo.reset()
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-7)
    assert sum(g is not None for g in want_grads) > 20
    for got, want in zip(got_grads, want_grads, strict=True):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
