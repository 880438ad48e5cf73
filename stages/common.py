"""What every stage shares: params loading, one-line errors, MLflow runs, device choice.

Not a stage itself (stages never import each other): a small toolbox for `python -m stages.<name>`.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from contextlib import contextmanager

import torch

from pipeline.config import Params, load_params
from pipeline.errors import UserError

__all__ = ["Params", "UserError", "device", "load_params", "mlflow_run", "stage_main"]


def stage_main(fn):
    """Run a stage's main(); a UserError becomes one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def device() -> torch.device:
    # OMP_NUM_THREADS, when set, wins: two stages sharing a small box each at full width spin against each other.
    threads = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0 else max(1, os.cpu_count() or 1))
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


class _Run:
    def __init__(self, mlflow):
        self._mlflow = mlflow

    def metrics(self, values: dict, step: int | None = None) -> None:
        clean = {k: float(v) for k, v in _flatten(values).items() if isinstance(v, (int, float, bool))}
        self._mlflow.log_metrics(clean, step=step)

    def artifact(self, path) -> None:
        self._mlflow.log_artifact(str(path))


class _NoRun:
    """Tracking off: metrics and artifacts are dropped; the stage writes its outputs as usual."""

    def metrics(self, values: dict, step: int | None = None) -> None:
        pass

    def artifact(self, path) -> None:
        pass


def tracking_enabled() -> bool:
    """$DEBIAS_TRACKING: on (default) | off. Off lets a bare worker run a stage without MLflow (docs/gpu.md)."""
    value = os.environ.get("DEBIAS_TRACKING", "on").strip().lower()
    if value in ("on", "1", "true", ""):
        return True
    if value in ("off", "0", "false"):
        return False
    raise UserError(f"DEBIAS_TRACKING: expected on or off, got {value!r}")


@contextmanager
def mlflow_run(stage: str, params: Params, sections: tuple[str, ...], run_name: str | None = None,
               extra_tags: dict | None = None):
    """One MLflow run per stage execution, with the stage's params and the pipeline-run/git tags.

    Tracking URI: $MLFLOW_TRACKING_URI if set, else params.mlflow.tracking_uri (SQLite in the project).
    With DEBIAS_TRACKING=off nothing is logged and MLflow is never imported.
    """
    if not tracking_enabled():
        yield _NoRun()
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        import mlflow
    except ImportError:
        raise UserError("mlflow is not installed: install it, or set DEBIAS_TRACKING=off to run untracked") from None

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", params.mlflow.tracking_uri))
    mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", params.mlflow.experiment))
    tags = {"stage": stage, "pipeline_run": os.environ.get("PIPELINE_RUN_ID", "manual"),
            "git_revision": _git_revision(), **(extra_tags or {})}
    dumped = params.model_dump(mode="json")
    logged = {"seed": params.seed, **{s: dumped[s] for s in sections if s != "seed"}}
    with mlflow.start_run(run_name=run_name or stage, tags=tags):
        mlflow.log_params({k: str(v)[:500] for k, v in _flatten(logged).items()})
        yield _Run(mlflow)
