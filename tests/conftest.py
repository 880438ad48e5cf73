"""Shared fixtures: a tiny random U-Net, single-threaded torch for the tiny-model tests, and the tiny pixel DAG
built once per session (through the Prefect flow; tests/dag.py). Under pytest-xdist (`make test` runs two
workers) each worker and the processes it starts use one thread; one worker builds the tiny DAG while the other
runs the tests that do not need it, then both share the DAG tests."""

import fcntl
import json
import os
from pathlib import Path

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
def tiny_dag(tmp_path_factory, worker_id):
    """The tiny pixel DAG, every stage, built once per session through the Prefect flow (then the flow once more),
    and read-only from then on: tests that need to change it or run other params work on a copy
    (tests.dag.copy_project).

    Under xdist the first worker to ask builds it into the session's shared temporary directory, under a file
    lock; the other worker waits for it and reads the result (the xdist recipe for a session fixture run once),
    so DAG tests can run on both workers."""
    from tests.dag import Built, build_tiny_dag

    if worker_id == "master":  # not under xdist
        return build_tiny_dag(tmp_path_factory.mktemp("tiny_dag"))
    shared = tmp_path_factory.getbasetemp().parent  # one per session, shared by its workers
    result, failed = shared / "tiny_dag.json", shared / "tiny_dag.failed"
    with open(shared / "tiny_dag.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if failed.exists():
            pytest.fail(f"the tiny DAG build failed on another worker: {failed.read_text()[-2000:]}")
        if result.exists():
            built = json.loads(result.read_text())
            return Built(Path(built["path"]), built["first"], built["second"], built["lock"])
        try:
            built = build_tiny_dag(shared / "tiny_dag")
        except BaseException as exc:
            failed.write_text(f"{type(exc).__name__}: {exc}")
            raise
        result.write_text(json.dumps({"path": str(built.path), "first": built.first, "second": built.second,
                                      "lock": built.lock}))
        return built


# The test that builds the tiny DAG (the first to ask builds it): first in the run, so one worker builds while
# the other runs the tests that do not need it; the rest of the DAG tests last, on whichever worker is free.
BUILDS_THE_DAG = "tests/test_dag.py::test_the_flow_runs_every_stage_and_dvc_repro_then_has_nothing_to_do"


def pytest_xdist_make_scheduler(config, log):
    """One test per unit of work (at most three queued per worker), in the collection order
    pytest_collection_modifyitems sets (xdist's --dist load would queue a quarter of the suite behind the build)."""
    from xdist.scheduler import LoadScopeScheduling

    class OneTestScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return nodeid

    return OneTestScheduling(config, log)


def pytest_configure(config):
    """Two torch processes at full width on 2 cores spin against each other: one thread per xdist worker, and
    (through the environment) per stage process it starts."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """The tiny-DAG build first, the other tests that use the DAG last (they wait for it; stable otherwise).
    The session's tiny-DAG build runs inside whichever test first asks for it: such tests get room for it on a
    busy 2-core machine (pyproject's --timeout covers one test's own work)."""
    for item in items:
        if "tiny_dag" in item.fixturenames and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(2400))
    items.sort(key=lambda item: 0 if item.nodeid == BUILDS_THE_DAG else 2 if "tiny_dag" in item.fixturenames else 1)
