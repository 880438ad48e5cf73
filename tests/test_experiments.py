"""DVC experiments and plots as a user runs them (docs/tracking.md): `dvc exp run --temp` reuses the trained
models and logs into the project's MLflow store, `scripts/exp.py dry` answers what would run, `scripts/exp.py show`
is one readable table, `dvc plots show` needs nothing from the internet."""

import subprocess
import sys

import yaml

from tests.dag import _env, copy_project, dvc
from tests.tiny import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import exp


def test_checkpoints_are_cached_and_plots_are_images():
    """A `cache: false` output is absent from a temporary experiment's copy, so its stage re-runs (the diffusion
    model and δ re-trained); a vega plot loads its JavaScript from a CDN."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for name, stage in spec["stages"].items():
        body = stage.get("do", stage)
        for out in body.get("outs", []):
            assert not (isinstance(out, dict) and next(iter(out.values())).get("cache") is False), (name, out)
        assert "plots" not in body, name
    assert spec["plots"] and all(str(p).endswith(".png") for p in spec["plots"])


def test_exp_show_table_keeps_headline_metrics_and_changed_params():
    def entry(name, grid, bias):
        return {"rev": "a" * 40, "name": name, "data": {
            "params": {"params.yaml": {"data": {"report": {"grid_per_class": grid}, "seed": 0}}},
            "metrics": {"data/scores/baseline/metrics.json": {"data": {"bias_score_normalised": bias,
                                                                        "fid_balanced": 1.5, "fd": 9}},
                        "data/metrics/train_diffusion.json": {"data": {"final_loss": 0.1}}}}}
    base = entry("main", 10, 0.5)
    base["experiments"] = [{"revs": [entry("picky-phon", 3, 0.25)]}]
    lines = exp.table(exp.experiments([{**entry(None, 10, 0.5), "rev": "workspace"}, base])).splitlines()
    assert lines[0].split() == ["experiment", "method", *exp.HEADLINE, "report.grid_per_class"]
    assert [line.split() for line in lines[1:]] == [["workspace", "baseline", "0.5", "1.5", "-", "10"],
                                                    ["main", "baseline", "0.5", "1.5", "-", "10"],
                                                    ["picky-phon", "baseline", "0.25", "1.5", "-", "3"]]


def _git(path, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=path, check=True,
                   capture_output=True)


def test_exp_run_temp_reuses_models_and_keeps_mlflow_runs(tiny_dag, tmp_path):
    import mlflow

    project = copy_project(tiny_dag.path, tmp_path / "p")
    (project / ".gitignore").write_text("/data/checkpoints/\nmlflow.db\nmlruns/\n__pycache__/\n")
    _git(project, "add", "-A")
    _git(project, "commit", "-qm", "built")
    assert dvc(project, "status").stdout.strip().endswith("up to date.")
    dry = subprocess.run([sys.executable, str(ROOT / "scripts/exp.py"), "dry", "-S", "report.grid_per_class=3"],
                         cwd=project, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert [line for line in dry.stdout.splitlines() if line.startswith("Running stage")] == [
        "Running stage 'report':"], dry.stdout
    # The default relative store (sqlite:///mlflow.db), as a user has it: not the tests' absolute one.
    env = {k: v for k, v in _env(project).items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", "grid3", "-S",
                           "report.grid_per_class=3"], cwd=project, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ran = [line for line in proc.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == ["Running stage 'report':"], proc.stdout  # nothing re-trained
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")  # the project's store, not the temp copy's
    runs = client.search_runs([client.get_experiment_by_name("debias-diffusion").experiment_id])
    parent = [r for r in runs if r.data.tags["stage"] == "pipeline"]
    assert [p.info.run_name for p in parent] == ["dvc exp grid3"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert {r.data.tags["stage"] for r in children} == {"report"} and len(children) == 6
    shown = subprocess.run([sys.executable, str(ROOT / "scripts/exp.py"), "show"], cwd=project, capture_output=True,
                           text=True)
    assert shown.returncode == 0 and any(line.startswith("grid3 ") for line in shown.stdout.splitlines())
    page = dvc(project, "plots", "show", "-o", str(tmp_path / "plots"))
    assert page.returncode == 0, page.stderr
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "http" not in html and html.count("<img") == 4
