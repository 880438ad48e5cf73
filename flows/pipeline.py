"""The Prefect flow: the DVC stage graph run as tasks, in dependency order.

dvc.yaml stays the one definition of the DAG. The flow reads the stage graph through DVC's Python API and
runs each selected stage as a task. DVC decides what is up to date (content hashes, not Prefect's input
cache): a task asks DVC for the stage's status and, if anything changed, runs `dvc repro --single-item`, so
a flow run and `dvc repro` leave the same dvc.lock.

    python -m flows.pipeline                      # run once, locally (Prefect's ephemeral API)
    python -m flows.pipeline --set sample.guidance_scale=2 --methods baseline
    python -m flows.serve                         # register a deployment for the UI of `prefect server start`
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

# Stages that want the accelerator: tag them so a tag concurrency limit (`prefect concurrency-limit create
# gpu 1`) serialises them on a shared GPU worker.
GPU_STAGES = ("train_diffusion", "sample", "score", "fid_reference")
USER_ERROR_EXIT = 2  # stages exit 2 on a user mistake: never worth a retry


class PipelineConfig(BaseModel):
    """What the Prefect UI shows as the run form."""

    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="params.yaml overrides as dotted keys, e.g. {\"diffusion.train_steps\": 500}; validated, "
                    "then written to params.yaml (like `dvc exp run -S`) so dvc.lock records them",
    )
    methods: list[str] | None = Field(None, description="methods to run (foreach keys of dvc.yaml, e.g. "
                                      "baseline, latentdir, invdiff); empty = all")
    project_dir: str = Field(".", description="the project checkout (holds dvc.yaml and params.yaml)")


class StageFailed(RuntimeError):
    def __init__(self, stage: str, returncode: int):
        super().__init__(f"stage {stage} failed with exit code {returncode}")
        self.returncode = returncode


def stage_graph(root: Path):
    """The DVC stage graph as {name: set of names it depends on}."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph
        deps = {s.name: set() for s in graph.nodes}
        for stage, upstream in graph.edges:
            deps[stage.name].add(upstream.name)
    return deps


def select_stages(deps: dict[str, set[str]], methods: list[str] | None = None) -> list[str]:
    """Stages in dependency order (ties by name), keeping only the chosen methods' `stage@method` nodes
    (all when `methods` is empty)."""
    known = {n.split("@", 1)[1] for n in deps if "@" in n}
    methods = methods or sorted(known)
    unknown = sorted(set(methods) - known)
    if unknown:
        raise ValueError(f"methods {unknown}: not in dvc.yaml (known: {sorted(known)})")
    keep = {n for n in deps if "@" not in n or n.split("@", 1)[1] in methods}
    order, done = [], set()
    while len(order) < len(keep):
        ready = sorted(n for n in keep - done if deps[n] & keep <= done)
        order.append(ready[0])
        done.add(ready[0])
    return order


def apply_overrides(root: Path, overrides: dict[str, Any]) -> None:
    """Validate `overrides` against the typed params, then write params.yaml (temp file + rename)."""
    from pipeline.config import parse_params, set_override
    from pipeline.io import atomic_path

    if not overrides:
        return
    path = root / "params.yaml"
    raw = yaml.safe_load(path.read_text()) or {}
    for key, value in overrides.items():
        raw = set_override(raw, key, value)
    parse_params(raw, f"{path} with overrides")  # raises UserError (one line) before anything is written
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(raw, sort_keys=False))


def _is_transient(task, task_run, state) -> bool:
    try:
        state.result()
    except StageFailed as exc:
        return exc.returncode != USER_ERROR_EXIT
    except Exception:
        return True
    return False


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_is_transient)
def run_stage(name: str, root: str, run_id: str) -> str:
    """Run one DVC stage if DVC says it changed; returns 'ran' or 'up to date'."""
    from dvc.repo import Repo

    logger = get_run_logger()
    # A target resolves against the working directory, so name the stage by its full dvc.yaml path.
    with Repo(root) as repo:
        changed = bool(repo.status(targets=[f"{Path(root) / 'dvc.yaml'}:{name}"]))
    if not changed:
        logger.info("%s: up to date", name)
        return "up to date"
    env = {**os.environ, "PIPELINE_RUN_ID": run_id,
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", name], cwd=root, env=env,
                          capture_output=True, text=True)
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.strip() and "it/s]" not in line:  # drop tqdm redraws
            logger.info(line)
    if proc.returncode != 0:
        # dvc exits 255 for any failed stage; the stage's own exit code is in its message.
        rc = USER_ERROR_EXIT if f"exited with {USER_ERROR_EXIT}" in proc.stderr else proc.returncode
        raise StageFailed(name, rc)
    return "ran"


@flow(name="debias-pipeline", log_prints=True)
def debias_pipeline(config: PipelineConfig = PipelineConfig()) -> dict[str, str]:
    """Reproduce the DVC pipeline stage by stage; returns {stage: 'ran' | 'up to date'}."""
    root = Path(config.project_dir).resolve()
    apply_overrides(root, config.overrides)
    order = select_stages(stage_graph(root), config.methods)
    run_id = str(flow_run.get_id() or "local")
    results = {}
    for name in order:
        tags = ["gpu"] if name.split("@")[0] in GPU_STAGES else []
        results[name] = run_stage.with_options(name=name, tags=tags)(name, str(root), run_id)
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Run the pipeline as a Prefect flow.")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="params override, e.g. sample.guidance_scale=2 (repeatable)")
    ap.add_argument("--methods", nargs="+", default=None, help="default: every method in dvc.yaml")
    ap.add_argument("--project-dir", default=".")
    args = ap.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    from pipeline.errors import UserError

    try:
        result = debias_pipeline(PipelineConfig(overrides=overrides, methods=args.methods,
                                                project_dir=args.project_dir))
    except (UserError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except StageFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.returncode if exc.returncode == USER_ERROR_EXIT else 1)
    for name, status in result.items():
        print(f"{name:24s} {status}")


if __name__ == "__main__":
    main()
