"""DEBIAS_TRACKING=off: a stage runs as plain Python without MLflow (a bare GPU worker, docs/gpu.md) and writes
the same outputs as with tracking on."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.tiny import ROOT, tiny_params

# Runs a stage the way `python -m` does, with `import mlflow` made to fail (as on a worker without it).
NO_MLFLOW = "import runpy, sys; sys.modules['mlflow'] = None; runpy.run_module(sys.argv[1], run_name='__main__')"


def _run(cwd: Path, tracking: str, *, block_mlflow: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DEBIAS_TRACKING": tracking,
           "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db"}
    cmd = [sys.executable, "-c", NO_MLFLOW, "stages.prepare_data"] if block_mlflow else \
        [sys.executable, "-m", "stages.prepare_data"]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _outputs(cwd: Path) -> dict:
    files = sorted(p for d in ("data/prepared", "data/metrics") for p in (cwd / d).rglob("*") if p.is_file())
    return {str(p.relative_to(cwd)): p.read_bytes() for p in files}


def test_tracking_off_runs_without_mlflow_and_writes_the_same_outputs(tmp_path):
    on, off = tmp_path / "on", tmp_path / "off"
    for d in (on, off):
        d.mkdir()
        (d / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    proc = _run(on, "on", block_mlflow=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (on / "mlflow.db").is_file()
    proc = _run(off, "off", block_mlflow=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (off / "mlflow.db").exists()
    assert _outputs(off) and _outputs(off) == _outputs(on)


def test_tracking_on_without_mlflow_or_a_bad_switch_is_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    proc = _run(tmp_path, "on", block_mlflow=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: mlflow is not installed: install it, or set DEBIAS_TRACKING=off to run untracked"], proc.stderr
    proc = _run(tmp_path, "maybe", block_mlflow=True)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: DEBIAS_TRACKING: expected on or off, got 'maybe'"


# Three stages of side-by-side jobs (`ddb_table.py --jobs`, the flow's branches) open a store nobody has made yet,
# together: each waits for the others to be ready before it opens it.
OPEN_TOGETHER = """\
import sys, time
from pathlib import Path
import mlflow  # noqa: F401  (imported before the barrier: the three reach the store at once)
from stages.common import load_params, mlflow_run
Path(f"ready{sys.argv[1]}").touch()
while len(list(Path(".").glob("ready*"))) < 3:
    time.sleep(0.005)
with mlflow_run("probe", load_params(), ("ddb",), run_name=f"probe{sys.argv[1]}") as run:
    run.metrics({"x": 1.0})
"""


def test_stages_opening_a_new_store_together_all_run(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DEBIAS_TRACKING": "on",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_TOGETHER, str(i)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert all(rc == 0 for rc, _ in results), [err[-500:] for _, err in results]
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=[tiny_params()["mlflow"]["experiment"]])
    assert sorted(runs["tags.mlflow.runName"]) == ["probe0", "probe1", "probe2"]
    assert set(runs["status"]) == {"FINISHED"}
