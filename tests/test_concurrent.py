"""Independent branches at the same time (the flow's `max_parallel`, flows/concurrent.py): the scheduler, the
thread budget and device pinning, and the proof that concurrent stages record what serial ones do: on a small
DVC project of sleeping stages (fast), and on the tiny pixel DAG against the session's serial flow run (slow)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.concurrent import Slots, descendants, thread_budget, visible_devices
from flows.pipeline import debias_pipeline, device_stages, stage_dag
from pipeline.errors import UserError
from tests.dag import prefect_harness
from tests.tiny import ROOT

# A stage module: sleeps, writes a deterministic output from its inputs, and logs (outside DVC's outputs) when it
# ran and the environment it got. `device()` used: the flow tags the stage `gpu` (flows.pipeline.uses_device).
# With BARRIER it waits for another branch to start, so stages that run at the same time overlap for sure (DVC's
# locked phases, a few seconds on a loaded machine, would otherwise cover a short command's whole run).
WORK = """\
import json, os, sys, time
from pathlib import Path


def device():
    return os.environ.get("CUDA_VISIBLE_DEVICES")


dev = device()
name, inputs = sys.argv[1], sys.argv[2:]
start = time.time()
if Path("fail.txt").is_file() and Path("fail.txt").read_text().strip() == name:
    sys.exit(2)
if name in os.environ.get("BARRIER", "").split(","):  # wait (at most 60 s) until another of these has started
    Path("log").mkdir(exist_ok=True)
    Path(f"log/{name}.started").touch()
    deadline = time.time() + 60
    while time.time() < deadline and not [p for p in Path("log").glob("*.started") if p.stem != name]:
        time.sleep(0.1)
time.sleep(float(os.environ.get("SLEEP", "1")))
Path("out").mkdir(exist_ok=True)
text = name + ":" + "".join(Path(p).read_text() for p in inputs)
Path(f"out/{name}.txt").write_text(text + str(len(text)) + "\\n")
Path("log").mkdir(exist_ok=True)
Path(f"log/{name}.json").write_text(json.dumps({"start": start, "end": time.time(), "device": dev,
    "threads": [os.environ.get("OMP_NUM_THREADS"), os.environ.get("MKL_NUM_THREADS")]}))
"""

DVC_YAML = """\
stages:
  root:
    cmd: python -m stages.cpu root
    deps: [stages/cpu.py]
    outs: [out/root.txt]
  gpu_a:
    cmd: python -m stages.gpu gpu_a out/root.txt
    deps: [stages/gpu.py, out/root.txt]
    params: [scale]
    outs: [out/gpu_a.txt]
  gpu_b:
    cmd: python -m stages.gpu gpu_b out/root.txt
    deps: [stages/gpu.py, out/root.txt]
    outs: [out/gpu_b.txt]
  cpu_c:
    cmd: python -m stages.cpu cpu_c out/root.txt
    deps: [stages/cpu.py, out/root.txt]
    outs:
      - out/cpu_c.txt:
          persist: true
  join:
    cmd: python -m stages.cpu join out/gpu_a.txt out/gpu_b.txt out/cpu_c.txt
    deps: [stages/cpu.py, out/gpu_a.txt, out/gpu_b.txt, out/cpu_c.txt]
    outs: [out/join.txt]
"""
BRANCHES = ("gpu_a", "gpu_b", "cpu_c")


def _env(path: Path) -> dict:
    return {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}


def _sleepy_project(path: Path) -> Path:
    (path / "stages").mkdir(parents=True)
    (path / "stages/__init__.py").write_text("")  # a regular package: found before the one on PYTHONPATH
    (path / "stages/gpu.py").write_text(WORK)
    (path / "stages/cpu.py").write_text(WORK.replace("dev = device()", "dev = os.environ.get('CUDA_VISIBLE_DEVICES')"))
    (path / "dvc.yaml").write_text(DVC_YAML)
    (path / "params.yaml").write_text("scale: 3\n")
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                [sys.executable, "-m", "dvc", "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=path, env=_env(path), check=True)
    return path


def _logs(path: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (path / "log").glob("*.json")}  # {stage: when, env}


def _overlap(a: dict, b: dict) -> bool:
    return max(a["start"], b["start"]) < min(a["end"], b["end"])


def _lock(path: Path) -> dict:
    return yaml.safe_load((path / "dvc.lock").read_text())


def _lock_entries(text: str) -> dict[str, str]:
    """dvc.lock's text split into its stages' entries ({name: the entry's lines}): the raw text but for the order of
    the entries, which is the order they were first written (a concurrent run: the order the stages finished)."""
    entries, name = {}, None
    for line in text.splitlines(keepends=True):
        if line.startswith("  ") and not line.startswith("   ") and line.rstrip().endswith(":"):
            name = line.strip()[:-1]
            entries[name] = ""
        if name is not None:
            entries[name] += line
    return entries


def _files(path: Path) -> dict[str, bytes | list[str]]:
    """Every file's bytes; a .gitignore's lines sorted (DVC appends an output's line when the stage finishes)."""
    return {str(p.relative_to(path)): sorted(p.read_text().splitlines()) if p.name == ".gitignore" else p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _dvc(path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=path, env=_env(path), capture_output=True,
                          text=True)


# ------------------------------------------------------------------------------------------------ the parts


def test_thread_budget_splits_the_cpus_between_running_stages():
    assert thread_budget(1, cpus=16) == 16
    assert thread_budget(2, cpus=16) == 8
    assert thread_budget(3, cpus=16) == 5
    assert thread_budget(2, cpus=2) == 1
    assert thread_budget(4, cpus=2) == 1  # never 0
    assert thread_budget(1) == len(os.sched_getaffinity(0))


def test_visible_devices_reads_cuda_visible_devices_as_cuda_does():
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "0,1,2"}) == ["0", "1", "2"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "3, 5"}) == ["3", "5"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "2,-1,3"}) == ["2"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "GPU-8a1b,GPU-77c0"}) == ["GPU-8a1b", "GPU-77c0"]
    import torch

    assert visible_devices({}) == [str(i) for i in range(torch.cuda.device_count())]  # [] on this CPU machine


def test_slots_give_each_gpu_stage_its_own_device_in_turn_and_cpu_stages_the_thread_budget():
    slots = Slots(3, ["3", "5"], cpus=12)
    a = slots.take(gpu=True)
    b = slots.take(gpu=True)
    assert (a["CUDA_VISIBLE_DEVICES"], b["CUDA_VISIBLE_DEVICES"]) == ("3", "5")
    assert a["OMP_NUM_THREADS"] == a["MKL_NUM_THREADS"] == "4"
    assert not slots.can_start(gpu=True) and slots.can_start(gpu=False)  # a third GPU stage waits for a device
    c = slots.take(gpu=False)
    assert c == {"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}
    slots.give_back(a)
    slots.give_back(c)
    assert slots.take(gpu=True)["CUDA_VISIBLE_DEVICES"] == "3"
    cpu_only = Slots(2, [], cpus=2)  # no devices: a GPU stage runs as a CPU stage, nothing pinned
    assert cpu_only.can_start(gpu=True) and cpu_only.take(gpu=True) == {"OMP_NUM_THREADS": "1",
                                                                         "MKL_NUM_THREADS": "1"}


def test_descendants_counts_every_stage_below():
    deps = {"a": set(), "b": {"a"}, "c": {"a"}, "d": {"b", "c"}, "e": set()}
    assert descendants(deps) == {"a": 3, "b": 1, "c": 1, "d": 0, "e": 0}


def test_max_parallel_is_a_flow_parameter_and_a_cli_flag_checked_before_anything_runs(tmp_path):
    props = debias_pipeline.parameters.model_dump()["properties"]
    assert props["max_parallel"]["default"] == 1 and props["max_parallel"]["type"] == "integer"
    proc = subprocess.run([sys.executable, "-m", "flows.pipeline", "--max-parallel", "0"], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["error: --max-parallel: expected an integer >= 1 (got 0)"]
    with pytest.raises(UserError, match="max_parallel"):
        debias_pipeline.fn(project_dir=str(ROOT), max_parallel=0)


# ------------------------------------------------------------------------------------------------ whole runs


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_harness():
        yield


@pytest.fixture(scope="module")
def sleepy_runs(tmp_path_factory, prefect_api):
    """The sleepy project run serially and with max_parallel=2 (two devices visible), each from scratch."""
    serial = _sleepy_project(tmp_path_factory.mktemp("serial"))
    parallel = _sleepy_project(tmp_path_factory.mktemp("parallel"))
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = "3,5"  # the stages never touch CUDA: only what they are handed is checked
    try:
        first = debias_pipeline(project_dir=str(serial))
        os.environ["BARRIER"] = ",".join(BRANCHES)
        second = debias_pipeline(project_dir=str(parallel), max_parallel=2)
    finally:
        os.environ.pop("BARRIER", None)
        os.environ.pop("CUDA_VISIBLE_DEVICES") if before is None else os.environ.__setitem__("CUDA_VISIBLE_DEVICES",
                                                                                              before)
    return serial, parallel, first, second


def test_the_sleepy_project_tags_its_gpu_stages(tmp_path):
    path = _sleepy_project(tmp_path)
    assert device_stages(path, stage_dag(path)[1]) == {"gpu_a", "gpu_b"}


def test_independent_branches_overlap_each_gpu_stage_on_its_own_device(sleepy_runs):
    serial, parallel, first, second = sleepy_runs
    assert first == second == dict.fromkeys(["root", "cpu_c", "gpu_a", "gpu_b", "join"], "ran")
    slow, fast = _logs(serial), _logs(parallel)
    assert not any(_overlap(slow[a], slow[b]) for a in slow for b in slow if a < b)  # max_parallel=1: one at a time
    pairs = [(a, b) for a in BRANCHES for b in BRANCHES if a < b and _overlap(fast[a], fast[b])]
    assert pairs, fast  # two branches ran at the same time
    assert all(not _overlap(fast[n], fast["root"]) and not _overlap(fast[n], fast["join"]) for n in BRANCHES)
    assert max(fast[n]["start"] for n in BRANCHES) > min(fast[n]["end"] for n in BRANCHES)  # never 3 at once
    if _overlap(fast["gpu_a"], fast["gpu_b"]):
        assert {fast["gpu_a"]["device"], fast["gpu_b"]["device"]} == {"3", "5"}
    assert fast["gpu_a"]["device"] in ("3", "5") and fast["gpu_b"]["device"] in ("3", "5")
    assert all(fast[n]["threads"] == [str(thread_budget(2))] * 2 for n in fast)
    assert slow["gpu_a"]["device"] == "3,5"  # the serial run leaves the environment as it is


def test_concurrent_stages_record_what_serial_ones_do(sleepy_runs):
    serial, parallel, _, _ = sleepy_runs
    assert _lock(parallel) == _lock(serial)
    assert _lock_entries((parallel / "dvc.lock").read_text()) == _lock_entries((serial / "dvc.lock").read_text())
    assert _lock(parallel)["stages"]["gpu_a"]["params"] == {"params.yaml": {"scale": 3}}
    assert _files(parallel / "out") == _files(serial / "out")
    assert _files(parallel / ".dvc/cache") == _files(serial / ".dvc/cache")  # outputs and run-cache entries
    for path in (serial, parallel):
        proc = _dvc(path, "repro")
        assert proc.returncode == 0 and "Running stage" not in proc.stdout, proc.stdout + proc.stderr
        assert "up to date" in proc.stdout.lower()


def test_a_failure_stops_new_stages_and_fails_the_run_with_the_stages_code(tmp_path, prefect_api, monkeypatch):
    from flows.pipeline import run_stage

    path = _sleepy_project(tmp_path)
    (path / "fail.txt").write_text("gpu_b\n")
    monkeypatch.setattr(run_stage, "retry_delay_seconds", 0)
    monkeypatch.setenv("SLEEP", "0")
    state = debias_pipeline(project_dir=str(path), max_parallel=2, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="stage gpu_b failed with exit code 2$"):
        state.result()
    assert not (path / "out/join.txt").exists()
    assert "join" not in _lock(path)["stages"] and "root" in _lock(path)["stages"]


def _task_run_names(state) -> set[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
            any_=[state.state_details.flow_run_id])))
    return {r.name.rsplit("-", 1)[0] for r in runs}


@pytest.mark.parametrize("max_parallel", [1, 2])
def test_only_stale_stages_become_task_runs(tmp_path, prefect_api, monkeypatch, max_parallel):
    """A changed param: its stage and the one below it are task runs (DVC then finds join's inputs unchanged: the
    param does not reach gpu_a's output), the rest are reported up to date without one; a fully cached run makes no
    task run at all (each costs API calls: docs/flows.md)."""
    path = _sleepy_project(tmp_path)
    monkeypatch.setenv("SLEEP", "0")
    assert debias_pipeline(project_dir=str(path), max_parallel=max_parallel) == dict.fromkeys(
        ["root", "cpu_c", "gpu_a", "gpu_b", "join"], "ran")
    (path / "params.yaml").write_text("scale: 4\n")
    state = debias_pipeline(project_dir=str(path), max_parallel=max_parallel, return_state=True)
    assert state.result() == {"root": "up to date", "cpu_c": "up to date", "gpu_a": "ran", "gpu_b": "up to date",
                              "join": "up to date"}
    assert list(state.result()) == ["root", "cpu_c", "gpu_a", "gpu_b", "join"]  # dependency order
    assert _task_run_names(state) == {"gpu_a", "join"}
    cached = debias_pipeline(project_dir=str(path), max_parallel=max_parallel, return_state=True)
    assert set(cached.result().values()) == {"up to date"} and len(cached.result()) == 5
    assert _task_run_names(cached) == set()


# ------------------------------------------------------------------------------------------------ the tiny DAG


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_the_tiny_dag_with_two_parallel_stages_records_what_the_serial_flow_did(tiny_dag, tmp_path):
    """The session's serial flow run (`tiny_dag`), copied without its outputs, DVC cache (so no run-cache entry
    can stand in for running a stage) and dvc.lock, then the flow with max_parallel=2."""
    from tests.dag import _env

    project = tmp_path / "parallel"
    shutil.copytree(tiny_dag.path, project, symlinks=True,
                    ignore=shutil.ignore_patterns("mlflow.db", "__pycache__", "data", "cache", "tmp", "dvc.lock"))
    env = _env(project)
    old = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "PATH")}
    os.environ.update({k: env[k] for k in old})
    try:
        with prefect_harness():
            result = debias_pipeline(project_dir=str(project), max_parallel=2)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert set(result.values()) == {"ran"} and set(result) == set(tiny_dag.first)
    text = (project / "dvc.lock").read_text()
    assert yaml.safe_load(text) == yaml.safe_load(tiny_dag.lock)
    assert _lock_entries(text) == _lock_entries(tiny_dag.lock)
    assert _files(project / "data") == _files(tiny_dag.path / "data")
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "Running stage" not in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (project / "dvc.lock").read_text() == text
