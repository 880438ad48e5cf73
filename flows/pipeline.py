"""The Prefect flow: the DVC stage graph run as tasks, in dependency order.

dvc.yaml stays the one definition of the DAG. The flow reads the stage graph through DVC's Python API and
runs each selected stage as a task. DVC decides what is up to date (content hashes, not Prefect's input
cache): a task asks DVC for the stage's status and, if anything changed, runs `dvc repro --single-item`, so
a flow run and `dvc repro` leave the same dvc.lock. What a run does to the checkout: docs/flows.md.

    python -m flows.pipeline                      # run once, locally (Prefect's ephemeral API)
    python -m flows.pipeline --set sample.guidance_scale=2 --methods baseline
    python -m flows.pipeline --max-parallel 2     # independent branches two at a time (flows/concurrent.py)
    python -m flows.serve                         # register a deployment for the UI of `prefect server start`
"""

# No `from __future__ import annotations` here: a served deployment runs the flow in a subprocess, where
# Prefect validates the parameters from the annotations, and string annotations do not resolve there.

import argparse
import ast
import atexit
import fcntl
import gc
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.concurrent import Slots, dvc_repo, run_concurrently, visible_devices
from pipeline.errors import UserError

PROJECT = Path(__file__).resolve().parents[1]
USER_ERROR_EXIT = 2  # stages exit 2 on a user mistake: never worth a retry
LOCK = Path(".dvc/tmp/flow.lock")  # held for a whole flow run (DVC's own lock only covers one repro)
PARAMS_BACKUP = Path(".dvc/tmp/flow-params.yaml")  # the checkout's params.yaml while a run's overrides are in


def dvc_methods(dvc_yaml: Path, strict: bool = True) -> tuple[str, ...]:
    """The method names: the `foreach` keys of dvc.yaml's stages (`sample@baseline` → baseline), a `${methods}`
    foreach read from the params.yaml beside it; strict=False leaves out what an unreadable params.yaml hides."""
    from pipeline.config import foreach_names

    names: set[str] = set()
    for stage, spec in (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {}).items():
        if isinstance(spec, dict) and "foreach" in spec:
            try:
                names |= set(foreach_names(dvc_yaml, stage, dvc_yaml.parent / "params.yaml"))
            except UserError:
                if strict:
                    raise
    return tuple(sorted(names))


METHODS = dvc_methods(PROJECT / "dvc.yaml", strict=False)  # at import: a bad params.yaml is reported by main()
Method = Literal[METHODS]  # the UI form offers these as a choice


def stage_dag(root: Path) -> tuple[dict[str, set[str]], dict[str, str]]:
    """The DVC stage graph as ({name: names it depends on}, {name: its cmd})."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return _graph(repo)


def _graph(repo) -> tuple[dict[str, set[str]], dict[str, str]]:
    graph = repo.index.graph
    deps = {s.name: set() for s in graph.nodes}
    cmds = {s.name: s.cmd if isinstance(s.cmd, str) else " ".join(s.cmd) for s in graph.nodes}
    for stage, upstream in graph.edges:
        deps[stage.name].add(upstream.name)
    return deps, cmds


def stage_graph(root: Path) -> dict[str, set[str]]:
    """The DVC stage graph as {name: set of names it depends on}."""
    return stage_dag(root)[0]


def select_stages(deps: dict[str, set[str]], methods: list[str] | None = None) -> list[str]:
    """Stages in dependency order (ties by name).

    No `methods` (or every method): every stage. Otherwise the chosen methods' `stage@method` nodes and
    everything upstream of them, and not `report`: it would mix this run's rows with older results.
    """
    known = {n.split("@", 1)[1] for n in deps if "@" in n}
    unknown = sorted(set(methods or ()) - known)
    if unknown:
        raise UserError(f"methods {unknown}: not in dvc.yaml (known: {sorted(known)})")
    if not methods or set(methods) == known:
        keep = set(deps)
    else:
        keep, todo = set(), [n for n in deps if "@" in n and n.split("@", 1)[1] in methods]
        while todo:
            name = todo.pop()
            if name not in keep:
                keep.add(name)
                todo.extend(deps[name])
    order, done = [], set()
    while len(order) < len(keep):
        ready = sorted(n for n in keep - done if deps[n] & keep <= done)
        order.append(ready[0])
        done.add(ready[0])
    return order


def uses_device(source: str) -> bool:
    """Whether a stage module puts work on the accelerator: it uses the result of `stages.common.device()`
    or builds an `Accelerator`. A bare `device()` statement only sets the thread count."""
    tree = ast.parse(source)
    bare = {id(s.value) for s in ast.walk(tree) if isinstance(s, ast.Expr)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id == "device" and id(node) not in bare:
                return True
            if node.func.id == "Accelerator":
                return True
    return False


def device_stages(root: Path, cmds: dict[str, str]) -> set[str]:
    """Stages whose `python -m stages.<x>` module uses the device (the one place that decides the `gpu` tag)."""
    found = set()
    for name, cmd in cmds.items():
        match = re.search(r"-m\s+(stages\.\w+)", cmd)
        module = root / (match.group(1).replace(".", "/") + ".py") if match else None
        if module is not None and module.is_file() and uses_device(module.read_text()):
            found.add(name)
    return found


def project_root(project_dir: str | Path) -> Path:
    """The project checkout, checked: a directory holding dvc.yaml and params.yaml."""
    root = Path(project_dir).expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"project_dir {project_dir}: not a directory")
    for name in ("dvc.yaml", "params.yaml"):
        if not (root / name).is_file():
            raise UserError(f"project_dir {root}: no {name} (expected a checkout of this project)")
    return root


def parse_sets(items: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` items as {key: YAML value}."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item[:80]!r}: expected KEY=VALUE")
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise UserError(f"--set {key}: value {value[:80]!r} is not valid YAML "
                            f"({str(exc).splitlines()[0]})") from None
    return overrides


def overridden_params(root: Path, overrides: dict[str, Any]) -> str:
    """params.yaml's text with `overrides` (dotted keys) applied, validated against the typed params."""
    from pipeline.config import apply_overrides

    path = root / "params.yaml"
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    raw = apply_overrides(raw, overrides, f"{path} with overrides")  # one-line UserError before anything is written
    return yaml.safe_dump(raw, sort_keys=False)


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@contextmanager
def hold_project(root: Path, overrides: dict[str, Any], run_id: str) -> Iterator[None]:
    """One flow run at a time per checkout; params.yaml carries this run's overrides only while it runs.

    A second run is refused (UserError) while the lock is held. On exit, even on failure, params.yaml gets its
    own bytes back; a run killed before that is undone by the next run, from the copy in PARAMS_BACKUP.
    """
    params, backup = root / "params.yaml", root / PARAMS_BACKUP
    (root / LOCK).parent.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another flow run"
            raise UserError(f"{root}: {holder} is running in this checkout; wait for it to finish "
                            "(its state is in the Prefect UI) or use another checkout") from None
        fh.truncate(0)
        fh.write(f"flow run {run_id} (pid {os.getpid()})")
        fh.flush()
        if backup.is_file():  # a killed run left its overrides in params.yaml
            os.replace(backup, params)
        original = params.read_bytes()
        if overrides:
            text = overridden_params(root, overrides)
            _write(backup, original)
            _write(params, text.encode())
        try:
            yield
        finally:
            if overrides:
                _write(params, original)
                backup.unlink()
            fh.truncate(0)


def stage_exit_code(stderr: str, returncode: int) -> int:
    """The failed stage's own exit code: dvc exits 255 for any failed stage and says `exited with N`."""
    codes = re.findall(r"exited with (-?\d+)\b", stderr)
    return int(codes[-1]) if codes else returncode


class StageFailed(RuntimeError):
    def __init__(self, stage: str, returncode: int):
        super().__init__(f"stage {stage} failed with exit code {returncode}")
        self.returncode = returncode


def _is_transient(task, task_run, state) -> bool:
    try:
        state.result()
    except StageFailed as exc:
        return exc.returncode != USER_ERROR_EXIT
    except Exception:
        return True
    return False


def changed_stages(repo) -> set[str]:
    """The stages DVC's status reports changed: one call for the whole DAG (a call per stage cost about 0.7 s
    each, most of a cached run)."""
    return {key.rsplit(":", 1)[-1] for key in repo.status()}


def dag_and_changed(root: Path, wait: bool) -> tuple[dict[str, set[str]], dict[str, str], set[str]]:
    """`stage_dag` and `changed_stages` from one DVC Repo: each Repo parses dvc.yaml and dvc.lock into its own
    index (about 1 s), so one is built instead of two. Another DVC command holding the checkout's lock (DVC gives
    up after 3 s unless `wait`) is a UserError."""
    from dvc.lock import LockError

    try:
        with dvc_repo(str(root), wait=wait) as repo:
            return (*_graph(repo), changed_stages(repo))
    except LockError:
        raise UserError(f"{root}: another DVC command is running in this checkout (it holds .dvc/tmp/lock); wait "
                        "for it to finish") from None


# {checkout: (deps, cmds, changed)} that main() read while holding the checkout for the flow run it starts
_HANDED_OVER: dict[Path, tuple[dict[str, set[str]], dict[str, str], set[str]]] = {}


def start_ephemeral_api() -> threading.Thread | None:
    """Boot Prefect's ephemeral API server (a uvicorn subprocess, about 4 s) in a thread, for the caller to join
    before the flow starts; None when an API server is configured (PREFECT_API_URL) or ephemeral mode is off.

    The flow's client then finds it running (SubprocessASGIServer is one instance per port). A failed start is
    left to the flow's own start, which reports it."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer  # here: its import holds the GIL for ~2 s

    def boot() -> None:
        with suppress(Exception):
            SubprocessASGIServer().start()

    thread = threading.Thread(target=boot, name="prefect-ephemeral-api")
    thread.start()
    return thread


def stale_stages(order: list[str], deps: dict[str, set[str]], changed: set[str]) -> set[str]:
    """The stages of `order` a run hands to DVC: the `changed` ones and every stage below one of them (its deps
    are rewritten when the one above runs; DVC then decides whether it changed)."""
    stale: set[str] = set()
    for name in order:  # upstream first
        if name in changed or deps[name] & stale:
            stale.add(name)
    return stale


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_is_transient)
def run_stage(name: str, root: str, run_id: str, slot: dict[str, str] | None = None) -> str:
    """Run one DVC stage that may have changed (flagged by stale_stages); returns 'ran', or 'up to date' when
    `dvc repro` found nothing changed.

    `slot`: set when stages run concurrently (flows/concurrent.py): the stage's environment (thread budget,
    device), and DVC's repository lock is waited for rather than refused."""
    logger = get_run_logger()
    # The stages' MLflow runs nest under one parent run per flow run, named like the flow run (docs/tracking.md).
    env = {**os.environ, "PIPELINE_RUN_ID": run_id, "PIPELINE_RUN_NAME": f"flow {flow_run.get_name() or run_id}",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    env.update(slot or {})
    wait = ["--wait-for-lock"] if slot is not None else []
    proc = subprocess.run([sys.executable, "-m", "dvc", *wait, "repro", "--single-item", name], cwd=root, env=env,
                          capture_output=True, text=True)
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.strip() and "it/s]" not in line:  # drop tqdm redraws
            logger.info(line)
    if proc.returncode != 0:
        raise StageFailed(name, stage_exit_code(proc.stderr, proc.returncode))
    # DVC announces a stage it runs ("Running stage 'name':"); one whose deps came out unchanged it skips
    return "ran" if f"Running stage '{name}'" in proc.stdout else "up to date"


REPORT_COLUMNS = ("bias_score_normalised", "aligned_fraction", "fidelity", "fid_indomain", "precision", "recall")


def report_markdown(rows: list[dict], mlflow_url: str | None) -> str:
    """The report's headline table (data/metrics/report_methods.json) as markdown for a Prefect artifact."""
    lines = ["| method | " + " | ".join(REPORT_COLUMNS) + " |", "|---" * (len(REPORT_COLUMNS) + 1) + "|"]
    for row in rows:
        cells = [f"{row[c]:.4g}" if isinstance(row.get(c), int | float) else "–" for c in REPORT_COLUMNS]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    lines += ["", "Full report with sample grids: `data/report/report.md`."]
    if mlflow_url:
        lines.append(f"MLflow: [this flow run's stage runs]({mlflow_url}) (with `mlflow ui` running).")
    return "\n".join(lines)


def mlflow_runs_url(root: Path, run_id: str) -> str | None:
    """The MLflow UI's list of this flow run's stage runs (tag pipeline_run), or None if there is no experiment."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.config import MlflowParams

    raw = (yaml.safe_load((root / "params.yaml").read_text()) or {}).get("mlflow") or {}
    p = MlflowParams(**raw)
    uri = os.environ.get("MLFLOW_TRACKING_URI", p.tracking_uri)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # relative: the stages ran in root
        uri = f"sqlite:///{root / uri.removeprefix('sqlite:///')}"
    try:
        exp = mlflow.MlflowClient(uri).get_experiment_by_name(os.environ.get("MLFLOW_EXPERIMENT_NAME", p.experiment))
    except MlflowException:
        return None
    if exp is None:
        return None
    ui = os.environ.get("MLFLOW_UI_URL", "http://127.0.0.1:5000")
    return f"{ui}/#/experiments/{exp.experiment_id}/runs?searchFilter=" + quote(f"tags.pipeline_run = '{run_id}'")


def _run_name() -> str:
    """Flow runs are named after what they do: the methods, then the overrides."""
    p = flow_run.parameters
    name = "+".join(p.get("methods") or ["all"])
    sets = ", ".join(f"{k}={v}" for k, v in (p.get("overrides") or {}).items())
    return f"{name} [{sets}]" if sets else name


@flow(name="debias-pipeline", log_prints=True, flow_run_name=_run_name)
def debias_pipeline(methods: list[Method] | None = None, overrides: dict[str, Any] | None = None,
                    project_dir: str = ".", max_parallel: int = 1) -> dict[str, str]:
    """Reproduce the DVC pipeline stage by stage; returns {stage: 'ran' | 'up to date'}.

    Args:
        methods: the methods to run, each with every stage upstream of it; empty: every stage and the report.
        overrides: params.yaml overrides as dotted keys, e.g. {"sample.guidance_scale": 2}; validated, in
            params.yaml for this run only (dvc.lock records them); the checkout's file is restored afterwards.
        project_dir: the project checkout (holds dvc.yaml and params.yaml).
        max_parallel: stages run at the same time (independent branches); 1: one at a time. Each running stage
            gets cpu_count // max_parallel threads and, on a CUDA machine, a device of its own (docs/flows.md).
    """
    if max_parallel < 1:
        raise UserError(f"max_parallel: expected an integer >= 1 (got {max_parallel})")
    logger = get_run_logger()
    root = project_root(project_dir)
    run_id = str(flow_run.get_id() or "local")
    results: dict[str, str] = {}
    handed = _HANDED_OVER.pop(root, None)  # main() holds the checkout and has read DVC's status for this run
    with nullcontext() if handed else hold_project(root, overrides or {}, run_id):
        deps, cmds, changed = handed or dag_and_changed(root, wait=max_parallel > 1)
        order = select_stages(deps, methods)
        gpu = device_stages(root, cmds)
        stale = stale_stages(order, deps, changed)
        # Only stale stages become task runs: a task run costs about 50 ms of API calls, 1.8 s for a cached run
        # of the default DAG (docs/flows.md); the others are listed in the flow run's log.
        todo = [name for name in order if name in stale]
        results = dict.fromkeys((name for name in order if name not in stale), "up to date")
        if results:
            logger.info("up to date (DVC status): %s", ", ".join(results))
        if max_parallel > 1:  # independent branches at the same time: flows/concurrent.py
            futures = run_concurrently(
                todo, deps, gpu, max_parallel, lambda name, upstream, slot: run_stage.with_options(
                    name=name, tags=["gpu"] if name in gpu else []).submit(
                    name, str(root), run_id, slot, wait_for=upstream),
                Slots(max_parallel, visible_devices()))
            results |= {name: future.result() for name, future in futures.items()}  # raises the first failure
        else:
            states = {}
            for name in todo:
                upstream = [states[d] for d in sorted(deps[name]) if d in states]  # draws the DAG's edges in the UI
                states[name] = run_stage.with_options(name=name, tags=["gpu"] if name in gpu else [])(
                    name, str(root), run_id, wait_for=upstream, return_state=True)
                results[name] = states[name].result()  # raises the stage's failure
        results = {name: results[name] for name in order}
    if "report" in order and (root / "data/metrics/report_methods.json").is_file():
        rows = json.loads((root / "data/metrics/report_methods.json").read_text())
        # the link lists this run's stage runs: none when nothing ran (and MLflow's import costs ~2 s)
        url = mlflow_runs_url(root, run_id) if "ran" in results.values() else None
        create_markdown_artifact(report_markdown(rows, url), key="debias-report",
                                 description="The report's table")
    if "report" in deps and "report" not in order:
        logger.info("report not run: it would mix these methods' new rows with older results of the others "
                    "(run every method, or `dvc repro report`)")
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Run the pipeline as a Prefect flow.")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="params override, e.g. sample.guidance_scale=2 (repeatable)")
    ap.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                    help=f"default: every method ({', '.join(METHODS)})")
    ap.add_argument("--project-dir", default=".")
    ap.add_argument("--max-parallel", type=int, default=1, metavar="N",
                    help="stages run at the same time (independent branches); default 1: one at a time")
    args = ap.parse_args(argv)
    # Registered before Prefect starts its ephemeral API server, so it runs after the server's own exit
    # message (atexit is last in, first out): the error is the last line printed.
    atexit.register(_at_exit)
    try:  # every user mistake found before Prefect starts, so its error is the only line printed
        overrides = parse_sets(args.set)
        root = project_root(args.project_dir)
        known = dvc_methods(root / "dvc.yaml")
        unknown = sorted(set(args.methods or ()) - set(known))
        if unknown:
            raise UserError(f"--methods {unknown}: not in dvc.yaml (known: {list(known)})")
        overridden_params(root, overrides)
        if args.max_parallel < 1:
            raise UserError(f"--max-parallel: expected an integer >= 1 (got {args.max_parallel})")
        # The checkout is held from here (the flow finds it held), so DVC's status can be read while Prefect's
        # ephemeral API server boots in another process: about 2.5 s of a cached run's 11 (docs/flows.md).
        with hold_project(root, overrides, "from the command line"):
            server = start_ephemeral_api()
            try:
                _HANDED_OVER[root] = dag_and_changed(root, wait=args.max_parallel > 1)
            finally:
                if server is not None:
                    server.join()
            result = debias_pipeline(methods=args.methods, overrides=overrides, project_dir=str(root),
                                     max_parallel=args.max_parallel)
    except UserError as exc:
        _fail(f"error: {exc}", USER_ERROR_EXIT)
    except StageFailed as exc:
        _fail(f"error: {exc}", exc.returncode if exc.returncode == USER_ERROR_EXIT else 1)
    for name, status in result.items():
        print(f"{name:24s} {status}")


_ERRORS: list[str] = []


def _fail(message: str, code: int) -> None:
    _ERRORS.append(message)
    sys.exit(code)


def _at_exit() -> None:
    """The flow's one-line error, last and alone, after Prefect's log lines; then the garbage collector's objects
    are frozen (gc.freeze): the interpreter's collections at exit then skip what Prefect, DVC and pydantic
    allocated, about 1.2 s of a cached run (docs/flows.md). Only objects kept alive by reference cycles go
    unfinalised (CPython does not promise their finalisation at exit either); by then every atexit handler
    registered after this one (Prefect's server stop, its log and event workers) has run."""
    sys.stdout.flush()
    sys.stderr.flush()
    for message in _ERRORS:
        print(message, file=sys.stderr, flush=True)
    gc.freeze()


if __name__ == "__main__":
    main()
