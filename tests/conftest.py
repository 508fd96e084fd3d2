"""GPU tests are marked `gpu` and skip cleanly where CUDA is absent; tiny-tensor model tests
run with one intra-op thread."""

import os
import signal

import pytest
import torch

# Without CUDA the Triton kernels are tested through Triton's interpreter, which must be switched
# on before any kernel module is imported (the test modules import them lazily or after this).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


_CONFIG = None


def pytest_configure(config):
    global _CONFIG
    _CONFIG = config


def pytest_runtest_logreport(report):
    """ADAREC_TB_AS_YOU_GO=1 (the device check): a failure's traceback printed when it happens,
    so a step killed at its time limit still shows why the tests before the kill failed."""
    if not report.failed or os.environ.get("ADAREC_TB_AS_YOU_GO", "0") in ("", "0") or _CONFIG is None:
        return
    terminal = _CONFIG.pluginmanager.getplugin("terminalreporter")
    if terminal is not None:
        terminal.write_line(f"\n----- {report.nodeid} failed ({report.when}):")
        terminal.write_line(report.longreprtext[-4000:])
        terminal.write_line("-----")


@pytest.fixture(autouse=True)
def _per_test_timeout():
    """ADAREC_TEST_TIMEOUT=N (the device check): a test still running after N seconds fails with
    TimeoutError instead of eating the step's whole budget (a signal: it lands between Python
    bytecodes, so a kernel that never returns still needs the step's own timeout)."""
    limit = float(os.environ.get("ADAREC_TEST_TIMEOUT", "0") or 0)
    if limit <= 0 or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"test still running after ADAREC_TEST_TIMEOUT={limit:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _one_thread(request):
    """One intra-op thread for the tiny-tensor model tests: OpenMP threads stall on a CPU shared
    with other work and buy nothing at these sizes."""
    one_thread = ("test_adarec", "test_causality", "test_diffusion_fusion", "test_models", "test_trajectory_kernel",
                  "test_diffurec", "test_adrec", "test_diffuasr", "test_grad_merge", "test_peer_seams")
    if request.module.__name__.rsplit(".", 1)[-1] not in one_thread:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
