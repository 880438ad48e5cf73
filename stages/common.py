"""What every stage shares: params loading, one-line errors, MLflow runs, device choice.

Not a stage itself (stages never import each other): a small toolbox for `python -m stages.<name>`.
"""

from __future__ import annotations

import fcntl
import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, suppress
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
    """(the tracking URI in effect, where it came from); a relative local store resolved against project_root()."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return resolve_uri(os.environ["MLFLOW_TRACKING_URI"]), "$MLFLOW_TRACKING_URI"
    return resolve_uri(params.mlflow.tracking_uri), "mlflow.tracking_uri"


def project_root() -> Path:
    """The checkout the pipeline runs for: $DVC_ROOT, which DVC sets for every stage command and, for `dvc exp run
    --temp` and queued experiments, points at the original repository rather than the temporary copy under
    .dvc/tmp/exps (so their MLflow runs land in the project's store, not in a directory DVC deletes); else the
    working directory (`python -m stages.<name>`)."""
    root = os.environ.get("DVC_ROOT", "").strip()
    return Path(root) if root else Path.cwd()


def resolve_uri(uri: str) -> str:
    """A relative SQLite path or local directory made absolute under project_root(); other URIs unchanged."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite" and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{project_root() / uri.removeprefix('sqlite:///')}"
    if len(parsed.scheme) <= 1 and not Path(uri).is_absolute():  # a plain path ("C:" is a drive, not a scheme)
        return str(project_root() / uri)
    return uri


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


# What DVC itself rewrites while a pipeline runs: a change there does not make the code or params differ from HEAD.
DVC_WRITTEN = ("dvc.lock", ".gitignore")


def _git_revision() -> tuple[str, list[str]]:
    """(HEAD's commit, with `-dirty` appended when tracked files differ from it; those files). Files DVC rewrites
    during a run (DVC_WRITTEN) do not count: every stage after the first would otherwise read dirty."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown", []
    sha = head.stdout.strip()
    if head.returncode != 0 or not sha:
        return "unknown", []
    changed = [line[3:].split(" -> ")[-1] for line in status.stdout.splitlines() if len(line) > 3]
    changed = [f for f in changed if Path(f).name not in DVC_WRITTEN]
    return (f"{sha}-dirty" if changed else sha), changed


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

    def image(self, image, key: str) -> None:
        self._mlflow.log_image(image, key=key, step=0)

    def model(self, files, name: str, kind: str) -> None:
        """Log `files` (a directory of safetensors and JSON, or one file) as an MLflow model `name`, loaded by
        stages.mlflow_models (no pickle; docs/tracking.md); `mlflow.register_model` takes it as it is."""
        import shutil
        from importlib.metadata import PackageNotFoundError, version

        files = Path(files)
        reqs = []
        for pkg in ("torch", "diffusers", "safetensors", "numpy"):
            with suppress(PackageNotFoundError):
                reqs.append(f"{pkg}=={version(pkg)}")
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data"
            if files.is_dir():
                shutil.copytree(files, data)
            else:
                data.mkdir()
                shutil.copy(files, data)
            (data / "debias_model.json").write_text(f'{{"kind": "{kind}"}}')
            self._mlflow.pyfunc.log_model(name=name, loader_module="stages.mlflow_models", data_path=str(data),
                                          pip_requirements=reqs)


class _NoRun:
    """Tracking off: metrics and artifacts are dropped; the stage writes its outputs as usual."""

    def metrics(self, values: dict, step: int | None = None) -> None:
        pass

    def artifact(self, path) -> None:
        pass

    def image(self, image, key: str) -> None:
        pass

    def model(self, files, name: str, kind: str) -> None:
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


def pipeline_run() -> tuple[str, str] | None:
    """(key, display name) of the pipeline run this stage execution belongs to, or None for a stage run alone.

    $PIPELINE_RUN_ID (the Prefect flow sets its flow-run id; any wrapper may set its own), else a DVC experiment
    ($DVC_EXP_NAME, named per baseline commit), else the `dvc` process this stage runs under (`dvc repro`: its pid
    and start time, so every stage of one `dvc repro` shares it and no other invocation does). docs/tracking.md."""
    if os.environ.get("PIPELINE_RUN_ID", "").strip():
        key = os.environ["PIPELINE_RUN_ID"].strip()
        return key, os.environ.get("PIPELINE_RUN_NAME", "").strip() or f"pipeline {key}"
    if os.environ.get("DVC_EXP_NAME", "").strip():
        name, base = os.environ["DVC_EXP_NAME"].strip(), os.environ.get("DVC_EXP_BASELINE_REV", "")[:7]
        return f"dvc-exp-{name}-{base}", f"dvc exp {name}"
    proc = _dvc_ancestor()
    if proc is None:
        return None
    # named when the first stage creates the parent: the pipeline's start
    return (f"dvc-{socket.gethostname()}-{proc.pid}-{proc.create_time():.2f}",
            f"dvc repro {time.strftime('%Y-%m-%d %H:%M:%S')}")


def _dvc_ancestor():
    """The nearest ancestor process running dvc (`dvc …` or `python -m dvc …`), or None."""
    try:
        import psutil  # installed with dvc and accelerate
    except ImportError:
        return None

    try:
        for proc in psutil.Process().parents():
            cmd = proc.cmdline()
            if any(Path(a).name == "dvc" for a in cmd[:3]):
                return proc
    except psutil.Error:
        return None
    return None


PARENT_STAGE = "pipeline"  # the `stage` tag of a pipeline run's parent run


@contextmanager
def _tracking_lock():
    """One stage at a time on this machine (a file lock): what two stages starting together must not both do."""
    with open(Path(tempfile.gettempdir()) / f"debias-mlflow-{os.getuid()}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _parent_run(client, experiment_id: str, key: str, name: str, tags: dict) -> str:
    """The id of the pipeline run's parent run, created by the first stage that asks (under `_tracking_lock`, so
    two stages starting together make one), set RUNNING again by each later stage."""
    with _tracking_lock():
        safe = key.replace("\\", "").replace("'", "")
        found = client.search_runs([experiment_id], filter_string=f"tags.stage = '{PARENT_STAGE}' and "
                                   f"tags.pipeline_run = '{safe}'", max_results=1)
        if found:
            if found[0].info.status != "RUNNING":
                client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
        run = client.create_run(experiment_id, run_name=name, tags={**tags, "stage": PARENT_STAGE,
                                                                     "pipeline_run": safe})
        return run.info.run_id


def _experiment(mlflow, name: str) -> object:
    """The experiment, created with its artifacts beside a local store (not under a temporary working directory),
    and tagged as a model-development experiment so MLflow's UI opens it on its runs list, not the GenAI overview."""
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is None:
        uri = mlflow.get_tracking_uri()
        local = uri.startswith("sqlite:///") or "://" not in uri
        location = (project_root() / "mlruns").resolve().as_uri() if local else None
        with suppress(Exception):  # created meanwhile by another stage
            client.create_experiment(name, artifact_location=location)
    exp = mlflow.set_experiment(name)
    if exp.tags.get(EXPERIMENT_KIND) is None:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, "custom_model_development")
    return exp


EXPERIMENT_KIND = "mlflow.experimentKind"  # read by MLflow 3's UI: genai_development | custom_model_development


@contextmanager
def mlflow_run(stage: str, params: Params, sections: tuple[str, ...], run_name: str | None = None,
               extra_tags: dict | None = None, extra_params: dict | None = None):
    """One MLflow run per stage execution, with the stage's params and the pipeline-run/git tags, nested under
    its pipeline run's parent run (pipeline_run()), which ends FINISHED or FAILED with each stage.

    Tracking URI: $MLFLOW_TRACKING_URI if set, else params.mlflow.tracking_uri (SQLite in the project); a
    relative path is resolved against project_root(). With DEBIAS_TRACKING=off nothing is logged and MLflow is
    never imported. `extra_params` are logged beside the sections' (a method's own knobs, in the report).
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
        with _tracking_lock():  # a new SQLite store's schema is made by the first client: two at once collide
            exp = _experiment(mlflow, experiment)
    except Exception as exc:
        why = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise UserError(f"{key}: cannot open experiment {config._clip(experiment)!r} at {config._clip(uri)!r} "
                        f"({type(exc).__name__}: {config._clip(why, 200)})") from None
    revision, dirty = _git_revision()
    common = {"git_revision": revision, **({"git_dirty": ", ".join(dirty)[:4000]} if dirty else {}),
              "host": socket.gethostname()}
    belongs = pipeline_run()
    tags = {"stage": stage, "pipeline_run": belongs[0] if belongs else "manual", **common, "pid": str(os.getpid()),
            **(extra_tags or {})}
    _end_killed_runs(mlflow, exp.experiment_id, stage, tags["host"])
    client = mlflow.MlflowClient()
    parent = _parent_run(client, exp.experiment_id, *belongs, common) if belongs else None
    dumped = params.model_dump(mode="json")
    logged = {"seed": params.seed, **{s: dumped[s] for s in sections if s != "seed"}, **(extra_params or {})}
    status = "FAILED"
    try:
        with mlflow.start_run(run_name=run_name or stage, tags=tags, parent_run_id=parent):
            mlflow.log_params({k: str(v)[:500] for k, v in _flatten(logged).items()})
            yield _Run(mlflow)
        status = "FINISHED"
    finally:
        if parent is not None:
            client.set_terminated(parent, status)
