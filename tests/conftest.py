"""GPU tests are marked `gpu` and skip cleanly where CUDA is absent; tiny-tensor model tests
run with one intra-op thread."""

import pytest
import torch


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
    if request.module.__name__.rsplit(".", 1)[-1] not in ("test_adarec", "test_diffusion_fusion", "test_models"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
