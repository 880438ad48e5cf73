"""Tiny-DAG helpers: a fresh git+dvc copy of the project with tiny params, `dvc` in it, the tiny pixel DAG built
once through the Prefect flow (tests/conftest.py shares it per session), and copies of a built project."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.tiny import ROOT, tiny_params

PROJECT_FILES = ["pipeline", "stages", "flows", "dvc.yaml", "pyproject.toml", ".dvcignore"]


def _env(tmp: Path) -> dict:
    return {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
            "PYTHONPATH": str(tmp), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


def make_project(tmp: Path) -> Path:
    """A fresh git+dvc checkout of the project with tiny params."""
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, tmp / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, tmp / name)
    (tmp / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    env = _env(tmp)
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                [sys.executable, "-m", "dvc", "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=tmp, env=env, check=True)
    return tmp


def dvc(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=tmp, env=_env(tmp), capture_output=True,
                          text=True)


def copy_project(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    """A copy of a built project (outputs, dvc.lock, DVC cache, git) without its MLflow store, DVC's scratch
    (.dvc/tmp: locks, state) and the outputs in `drop`; DVC re-hashes what it finds, so the copy is a checkout in
    its own right."""
    def ignore(directory: str, names: list[str]) -> set[str]:
        # not copied rather than removed after: another worker's `dvc` may be writing there meanwhile
        skip = {"mlflow.db", "__pycache__"} | ({"tmp"} if Path(directory) == src / ".dvc" else set())
        return skip & set(names)

    shutil.copytree(src, dst, ignore=ignore, symlinks=True)
    for path in drop:
        shutil.rmtree(dst / path)
    return dst


@dataclass(frozen=True)
class Built:
    """The tiny DAG built by the flow: the project, the first flow run's {stage: result}, the second run's, and
    dvc.lock as the first run left it."""

    path: Path
    first: dict[str, str]
    second: dict[str, str]
    lock: str


def prefect_harness():
    """Prefect's test harness (a temporary API server and database) with room to start on a loaded 2-core machine:
    its own default, 30 s, was measured too short with both test workers and other jobs running."""
    from prefect.testing.utilities import prefect_test_harness

    return prefect_test_harness(server_startup_timeout=180)


def build_tiny_dag(tmp: Path) -> Built:
    """The whole tiny pixel DAG through the Prefect flow (a temporary Prefect API), then the flow once more."""
    from flows.pipeline import debias_pipeline

    project = make_project(tmp)
    env = _env(project)
    old = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "PATH")}
    os.environ.update({k: env[k] for k in old})
    try:
        with prefect_harness():
            first = debias_pipeline(project_dir=str(project))
            lock = (project / "dvc.lock").read_text()
            second = debias_pipeline(project_dir=str(project))
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return Built(project, first, second, lock)
