"""The device check's measured budgets: the launch recorder (profiling/launch_recorder.py), the
ahead-of-time compile of what it records (profiling/aot_compile.py), benchmark rows that survive
a kill (profiling/timing.py RowWriter) and the per-test timeout and as-you-go tracebacks the
check's pytest steps use (tests/conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from adarec.profiling.launch_recorder import LaunchRecorder, gpu_equivalent, record_key, specialisation
from adarec.profiling.timing import RowWriter

REPO = Path(__file__).resolve().parents[1]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _double(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)


def _launch(n: int, block: int = 64, dtype=torch.float32):
    x = torch.arange(n, dtype=dtype)
    out = torch.empty_like(x)
    _double[(triton.cdiv(n, block),)](x, out, n, BLOCK=block)
    return x, out


@pytest.mark.skipif(not INTERPRETED, reason="the recorder hooks Triton's interpreter (on when CUDA is absent)")
def test_recorded_keys_follow_tritons_specialisation_rules():
    """Triton keys an integer argument by value 1 (a constexpr) and by divisibility by 16, and a
    pointer by its dtype (and 16-byte alignment); launches with the same key share a record."""
    recorder = LaunchRecorder().install()
    for n in (32, 48, 33, 1):
        x, out = _launch(n)
        torch.testing.assert_close(out, 2 * x)          # launches still run
    _launch(40, dtype=torch.int32)
    records = {(r["signature"]["n"], r["constexprs"].get("n"), r["attrs"].get("n"), r["signature"]["x_ptr"]):
               r["launches"] for r in recorder.records if r["kernel"] == "_double"}
    assert records == {("i32", None, "D", "*fp32"): 2,       # 32 and 48: divisible by 16
                       ("i32", None, None, "*fp32"): 1,      # 33
                       ("constexpr", 1, None, "*fp32"): 1,   # 1
                       ("i32", None, None, "*i32"): 1}       # 40 on int32 data
    one = next(r for r in recorder.records if r["kernel"] == "_double")
    assert one["constexprs"]["BLOCK"] == 64 and one["attrs"]["x_ptr"] == "D"
    assert specialisation(_double, (torch.zeros(4), torch.zeros(4), 17), {"BLOCK": 8, "num_warps": 2})["options"] \
        == {"num_warps": 2}


@pytest.mark.skipif(not INTERPRETED, reason="the recorder hooks Triton's interpreter (on when CUDA is absent)")
def test_a_bf16_cross_entropy_is_recorded_with_the_gpus_bf16_keys_forward_and_backward():
    """The interpreter runs bf16 CE kernels on fp32 copies; the records are the GPU's bf16 keys
    (FP32_EXACT=False, bf16 hidden and weight), the backward's included."""
    from adarec.kernels.linear_ce import fused_linear_cross_entropy

    recorder = LaunchRecorder().install()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 16, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(40, 16, generator=g).bfloat16().requires_grad_()
    fused_linear_cross_entropy(hidden, weight, torch.tensor([1, 2, 0, 39, 7, 3])).backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    ce = [r for r in recorder.records if r["module"].endswith("linear_ce")]
    assert sorted(r["kernel"] for r in ce) == ["_forward_kernel", "_grad_hidden_kernel", "_grad_weight_kernel"]
    for r in ce:
        assert r["constexprs"]["FP32_EXACT"] is False
        assert r["signature"]["h_ptr"] == r["signature"]["w_ptr"] == "*bf16"


def test_gpu_equivalent_undoes_the_interpreters_substitutions():
    trajectory = {"module": "adarec.kernels.trajectory", "kernel": "_trajectory_bwd_weights_kernel",
                  "signature": {"e0_ptr": "*bf16"}, "constexprs": {"UPCAST": True, "PRECISION": "ieee", "SPLITS": 2},
                  "attrs": {}, "options": {}, "grid": [32, 2]}
    gpu = gpu_equivalent(trajectory, sms=132, row_blocks=500)
    assert gpu["constexprs"] == {"UPCAST": False, "PRECISION": None, "SPLITS": 8}   # 2 * 132 // 32 chunks
    assert gpu_equivalent(trajectory, sms=132, row_blocks=3)["constexprs"]["SPLITS"] == 3
    assert trajectory["constexprs"]["UPCAST"] is True                                   # the input is kept
    fp32 = {**trajectory, "constexprs": {"UPCAST": False, "PRECISION": "ieee"}}
    assert gpu_equivalent(fp32)["constexprs"] == {"UPCAST": False, "PRECISION": "ieee"}
    ce = {"module": "adarec.kernels.linear_ce", "kernel": "_forward_kernel",
          "signature": {"h_ptr": "*fp32", "w_ptr": "*fp32", "t_ptr": "*i64"}, "constexprs": {"FP32_EXACT": False},
          "attrs": {}, "options": {}}
    assert gpu_equivalent(ce)["signature"] == {"h_ptr": "*bf16", "w_ptr": "*bf16", "t_ptr": "*i64"}
    exact = {**ce, "constexprs": {"FP32_EXACT": True}}
    assert record_key(gpu_equivalent(exact)) == record_key(exact)


def test_ahead_of_time_compile_counts_and_measures_each_key_for_sm90(tmp_path):
    """The tool end to end on its smoke workload: four kernel keys recorded through the
    interpreter, each compiled for sm_90 with its time, registers and stack from the cubin."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "adarec.profiling.aot_compile", "--arch", "90", "--steps", "smoke",
                           "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 and any(s in output for s in ("ptxas", "No such file", "backend", "libdevice")):
        pytest.skip(f"no Triton NVIDIA compiler here: {output.strip().splitlines()[-1]}")
    assert proc.returncode == 0, output[-3000:]
    steps = json.loads((tmp_path / "steps.json").read_text())
    assert steps["arch"] == 90 and steps["failures"] == 0
    assert steps["steps"] == [{**steps["steps"][0], "step": "smoke", "keys": 4, "new_keys": 4}]
    keys = json.loads((tmp_path / "launches.json").read_text())
    assert sorted(k["kernel"] for k in keys) == ["_forward_kernel", "_trajectory_bwd_rows_kernel",
                                                 "_trajectory_bwd_weights_kernel", "_trajectory_fwd_kernel"]
    for key in keys:
        assert key["compile_s"] > 0 and key["reg"] > 0 and key["stack"] >= 0 and key["steps"] == ["smoke"]
    assert "| smoke | 4 | 4 | 4 |" in (tmp_path / "steps.md").read_text()


# ----------------------------------------------------------------------------- rows as they come

def test_row_writer_keeps_every_row_on_disk_as_it_is_added(tmp_path):
    writer = RowWriter(tmp_path, "t")
    writer.add({"backend": "eager", "ms": 2.0})
    assert json.loads((tmp_path / "t.json").read_text()) == [{"backend": "eager", "ms": 2.0}]
    writer.add({"backend": "fused", "ms": 1.0, "extra": None})
    assert [json.loads(line) for line in (tmp_path / "t.rows.jsonl").read_text().splitlines()] == writer.rows
    assert (tmp_path / "t.md").read_text().splitlines()[3] == "| fused | 1.000 | n/a |"
    RowWriter(tmp_path, "t").add({"backend": "again"})          # a rerun appends, never truncates
    assert len((tmp_path / "t.rows.jsonl").read_text().splitlines()) == 3
    assert not list(tmp_path.glob("*.part"))


@pytest.mark.parametrize("module", ["bench", "bench_trajectory", "bench_fusion", "bench_catalog", "bench_reverse"])
def test_every_benchmark_writes_its_rows_through_the_row_writer(module):
    source = (REPO / "profiling" / f"{module}.py").read_text()
    assert "RowWriter(" in source and ".add(" in source
    assert "write_tables(" not in source and "rows.append(" not in source


@pytest.mark.skipif(not INTERPRETED, reason="the fused backend runs through the interpreter here")
def test_a_benchmark_killed_mid_way_leaves_its_finished_rows(tmp_path):
    """bench_trajectory: the eager row is written, then the process is killed while the fused
    backend (slow through the interpreter) is being timed; the eager row is on disk, whole."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "adarec.profiling.bench_trajectory", "--device", "cpu",
                             "--batch", "4", "--dim", "16", "--mult", "2", "--dtype", "fp32", "--warmup", "200",
                             "--repeats", "2", "--out", str(tmp_path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    rows_file = tmp_path / "trajectory_fp32_D16.rows.jsonl"
    deadline = time.monotonic() + 240
    while not rows_file.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the benchmark finished before it could be killed mid-way"
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [r["backend"] for r in rows] == ["eager"] and rows[0]["median_ms"] > 0
    assert json.loads((tmp_path / "trajectory_fp32_D16.json").read_text()) == rows


# ----------------------------------------------------------------------------- the pytest steps

SLOW_AND_FAILING = '''
import time

def test_fails():
    assert 1 + 1 == 3, "deliberate"

def test_hangs():
    time.sleep(30)

def test_passes():
    pass
'''


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs a shell")
def test_per_test_timeout_and_tracebacks_as_they_happen(tmp_path):
    (tmp_path / "test_probe.py").write_text(SLOW_AND_FAILING)
    env = {**os.environ, "ADAREC_TEST_TIMEOUT": "2", "ADAREC_TB_AS_YOU_GO": "1",
           "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-v", "--tb=short", "-p", "no:cacheprovider",
                           "-p", "conftest", "--rootdir", str(tmp_path), "-c", os.devnull,
                           str(tmp_path / "test_probe.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout
    assert time.monotonic() - started < 25                                  # the hang was cut at 2 s
    assert "TimeoutError: test still running after ADAREC_TEST_TIMEOUT=2 s" in out
    assert "1 passed" in out and "2 failed" in out
    # The failure's traceback comes right after its own result line, before the next test runs.
    first_tb = out.index("----- test_probe.py::test_fails failed (call):")
    assert out.index("test_probe.py::test_fails FAILED") < first_tb < out.index("test_probe.py::test_hangs")
    assert "deliberate" in out[first_tb:out.index("test_probe.py::test_hangs")]
