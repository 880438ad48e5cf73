"""Shared fixtures: a tiny random U-Net, single-threaded torch for the tiny-model tests, and the tiny pixel DAG
built once per session (through the Prefect flow; tests/dag.py). Under pytest-xdist (`make test` runs two
workers) each worker and the processes it starts use one thread, and every test that builds on the tiny DAG or
runs Prefect goes to one worker, so the DAG is built once and Prefect's local API is not shared."""

import os

import pytest
import torch

import flows  # noqa: F401  (sets Prefect's ephemeral-API start-up timeout before any test imports prefect)
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


# Test files that build on the shared tiny DAG or run Prefect: under xdist all on one worker (the DAG is built once,
# and no two Prefect local APIs start at once).
SHARED_DAG_FILES = ("test_dag.py", "test_fault_injection.py", "test_serve.py", "test_registry.py",
                    "test_experiments.py", "test_concurrent.py", "test_flows.py")


def pytest_xdist_make_scheduler(config, log):
    """Like --dist load, except that the tests of SHARED_DAG_FILES form one unit of work. (xdist's own `loadgroup`
    marks do not reach the node ids under pytest 9, so the grouping is by file here.)"""
    from xdist.scheduler import LoadScopeScheduling

    class SharedDagScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "shared-dag" if nodeid.split("::")[0].rsplit("/", 1)[-1] in SHARED_DAG_FILES else nodeid

    return SharedDagScheduling(config, log)


def pytest_configure(config):
    """Two torch processes at full width on 2 cores spin against each other: one thread per xdist worker, and
    (through the environment) per stage process it starts."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """The session's tiny-DAG build runs inside whichever test first asks for it: such tests get room for it on a
    busy 2-core machine (pyproject's --timeout covers one test's own work)."""
    for item in items:
        if "tiny_dag" in item.fixturenames and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(2400))
