"""What every stage shares: params loading, one-line errors, MLflow runs, device choice.

Not a stage itself (stages never import each other): a small toolbox for `python -m stages.<name>`.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch

from pipeline import config
from pipeline.config import Params
from pipeline.errors import UserError

__all__ = ["Params", "UserError", "check_name", "device", "load_params", "mlflow_run", "stage_main"]

DVC_YAML = Path(__file__).resolve().parents[1] / "dvc.yaml"


def load_params(path="params.yaml") -> Params:
    """pipeline.config.load_params, then the MLflow settings checked before the stage writes anything (a run opened
    only at the end must not find a bad tracking URI after the previous outputs were replaced)."""
    params = config.load_params(path)
    if tracking_enabled():  # untracked (DEBIAS_TRACKING=off): MLflow is neither needed nor imported
        check_tracking(params)
    return params


def check_tracking(params: Params) -> None:
    """One-line UserError for a tracking URI MLflow has no store for, or a local store whose directory is missing;
    names $MLFLOW_TRACKING_URI / $MLFLOW_EXPERIMENT_NAME when those override params.yaml."""
    uri, key = _tracking(params)
    try:
        # MLflow's own table of URI schemes (a private name: if it moves, the run's opening still reports a bad URI)
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry
    except ImportError:
        _tracking_store_registry = None
    try:
        if _tracking_store_registry is not None:
            _tracking_store_registry.get_store_builder(uri)
    except Exception:
        raise UserError(f"{key}: {config._clip(uri)!r} is not a tracking URI MLflow knows (expected e.g. "
                        "sqlite:///mlflow.db, a directory, or http(s)://host:port)") from None
    parsed = urlparse(uri)
    local = {"sqlite": parsed.path[1:] if parsed.path.startswith("/") else parsed.path,
             "file": parsed.path, "": uri}.get(parsed.scheme if len(parsed.scheme) > 1 else "")
    if local:
        # MLflow creates missing directories; what it cannot get past is a file in the way or no write permission
        where = Path(local).absolute() if parsed.scheme != "sqlite" else Path(local).absolute().parent
        existing = next(p for p in (where, *where.parents) if p.exists())
        if not existing.is_dir():
            raise UserError(f"{key}: {existing} is a file, so MLflow cannot keep its store under {local}")
        if not os.access(existing, os.W_OK):
            raise UserError(f"{key}: {existing} is not writable, so MLflow cannot keep its store under {local}")
    if "MLFLOW_EXPERIMENT_NAME" in os.environ and not os.environ["MLFLOW_EXPERIMENT_NAME"].strip():
        raise UserError("$MLFLOW_EXPERIMENT_NAME: must not be empty (unset it to use mlflow.experiment)")


def _tracking(params: Params) -> tuple[str, str]:
    """(the tracking URI in effect, where it came from)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], "$MLFLOW_TRACKING_URI"
    return params.mlflow.tracking_uri, "mlflow.tracking_uri"


def check_name(stage: str, option: str, name: str) -> str:
    """A CLI name that becomes a path (data/scores/<name>) must be one dvc.yaml declares for the stage's foreach
    (for `foreach: ${methods}`: a key of params.yaml's methods), so `--method ../samples/baseline` can never write
    outside the stage's own outputs."""
    import yaml

    try:
        known = config.foreach_names(DVC_YAML, stage)
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        known = []
    if name not in known:
        raise UserError(f"{option} {config._clip(name)!r}: not a {stage} name in dvc.yaml (expected one of: "
                        f"{', '.join(map(str, known)) or '(dvc.yaml unreadable)'})")
    return name


def stage_main(fn):
    """Run a stage's main(); a UserError becomes one line on stderr and exit code 2.

    First the leftovers of killed writers under data/ are tidied (pipeline.io.clean_leftovers); SIGTERM is turned
    into SystemExit(143), so the stage's temporaries are removed and its MLflow run ends FAILED on the way out."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pipeline.io import clean_leftovers

        previous = _on_sigterm()
        try:
            clean_leftovers("data")
            return fn(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def _on_sigterm():
    """Install the SIGTERM → SystemExit(143) handler; returns the previous handler (None off the main thread)."""

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    try:
        return signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread: signals cannot be handled here
        return None


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


def _end_killed_runs(mlflow, experiment_id: str, stage: str, host: str) -> None:
    """Mark KILLED this stage's runs still RUNNING whose process (tags host, pid) is gone: a SIGKILL leaves no
    chance to end a run, so the next start does it."""
    from pipeline.io import pid_alive

    client = mlflow.MlflowClient()
    for run in client.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' and "
                                  f"tags.stage = '{stage}' and tags.host = '{host}'", max_results=1000):
        pid = run.data.tags.get("pid", "")
        if pid.isdigit() and not pid_alive(int(pid)):
            client.set_terminated(run.info.run_id, "KILLED")


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
    import logging

    try:
        import mlflow
    except ImportError:
        raise UserError("mlflow is not installed: install it, or set DEBIAS_TRACKING=off to run untracked") from None

    # MLflow's INFO lines (database creation, new experiment) would bury a stage's one-line error on stderr
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)

    uri, key = _tracking(params)
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", params.mlflow.experiment)
    try:
        mlflow.set_tracking_uri(uri)
        exp = mlflow.set_experiment(experiment)
    except Exception as exc:
        why = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise UserError(f"{key}: cannot open experiment {config._clip(experiment)!r} at {config._clip(uri)!r} "
                        f"({type(exc).__name__}: {config._clip(why, 200)})") from None
    tags = {"stage": stage, "pipeline_run": os.environ.get("PIPELINE_RUN_ID", "manual"),
            "git_revision": _git_revision(), "host": socket.gethostname(), "pid": str(os.getpid()),
            **(extra_tags or {})}
    _end_killed_runs(mlflow, exp.experiment_id, stage, tags["host"])
    dumped = params.model_dump(mode="json")
    logged = {"seed": params.seed, **{s: dumped[s] for s in sections if s != "seed"}}
    with mlflow.start_run(run_name=run_name or stage, tags=tags):
        mlflow.log_params({k: str(v)[:500] for k, v in _flatten(logged).items()})
        yield _Run(mlflow)
