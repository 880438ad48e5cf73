"""Shared fixtures: a tiny random U-Net, single-threaded torch for the tiny-model tests, and the tiny pixel DAG
built once per session (through the Prefect flow; tests/dag.py)."""

import pytest
import torch

from pipeline.diffusion import build_unet


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight a busy machine); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def unet():
    """A randomly initialised 16×16 class-conditional U-Net (10 classes + the null class), deterministic."""
    torch.manual_seed(0)
    return build_unet(resolution=16, num_classes=10, block_out_channels=[16, 32], layers_per_block=1,
                      attention=False).eval()


@pytest.fixture(scope="session")
def tiny_dag(tmp_path_factory):
    """The tiny pixel DAG, every stage, built once per session through the Prefect flow (then the flow once more).
    Tests that change it put it back (tests/test_dag.py); tests that need other params work on a copy
    (tests.dag.copy_project)."""
    from tests.dag import build_tiny_dag

    return build_tiny_dag(tmp_path_factory.mktemp("tiny_dag"))


def pytest_collection_modifyitems(items):
    """The session's tiny-DAG build runs inside whichever test first asks for it: such tests get room for it on a
    busy 2-core machine (pyproject's --timeout covers one test's own work)."""
    for item in items:
        if "tiny_dag" in item.fixturenames and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(2400))
