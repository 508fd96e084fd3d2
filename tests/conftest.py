"""GPU tests are marked `gpu` and skip cleanly where CUDA is absent; tiny-tensor model tests
run with one intra-op thread."""

import os

import pytest
import torch

# Without CUDA the Triton kernels are tested through Triton's interpreter, which must be switched
# on before any kernel module is imported (the test modules import them lazily or after this).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
