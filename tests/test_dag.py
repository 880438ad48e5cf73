"""The whole DAG on tiny params: through `dvc repro` and through the Prefect flow, in temporary git+dvc copies."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.tiny import ROOT, tiny_params

INVDIFF = ("invdiff", "invdiff_lambda0", "invdiff_oracle")
DDB = ("erm", "lff", "recipe1", "recipe2", "recipe1_real", "recipe2_real")

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


@pytest.fixture(scope="module")
def repro_project(tmp_path_factory):
    tmp = make_project(tmp_path_factory.mktemp("dvc"))
    proc = dvc(tmp, "repro")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp


def test_dvc_repro_builds_every_output(repro_project):
    tmp = repro_project
    for path in ["data/prepared/train.npz", "data/prepared/labels.parquet", "data/judges/colour.safetensors",
                 "data/judges/digit.safetensors", "data/models/diffusion/unet/diffusion_pytorch_model.safetensors",
                 "data/samples/baseline/images.npz", "data/samples/baseline/samples.parquet",
                 "data/reference/indomain.npz", "data/scores/baseline/per_class.parquet", "data/report/report.md",
                 "data/report/samples_baseline.png", "data/report/bias_vs_fid.png",
                 "data/methods/latentdir/directions.npz", "data/samples/latentdir/images.npz",
                 "data/scores/latentdir/metrics.json", "data/sweeps/latentdir.json",
                 "data/report/samples_latentdir.png", "data/methods/invdiff_groups/groups.npz",
                 "data/methods/invdiff_groups/discovery.png", "data/metrics/fit_grouper.json",
                 *(f"data/methods/{v}/delta/diffusion_pytorch_model.safetensors" for v in INVDIFF),
                 *(f"data/scores/{v}/metrics.json" for v in INVDIFF), *(f"data/sweeps/{v}.json" for v in INVDIFF),
                 "data/report/invdiff_discovery.png", "data/methods/distguide/adp.safetensors",
                 "data/scores/distguide/metrics.json", "data/sweeps/distguide.json",
                 "data/report/samples_distguide.png", "data/report/distguide_adp_accuracy.png",
                 "data/methods/ddb_synthetic/images.npz", "data/methods/ddb_amplifier/model.safetensors",
                 "data/methods/ddb_amplifier_real/model.safetensors", "data/report/ddb_synthetic.png",
                 *(f"data/methods/ddb_{m}/model.safetensors" for m in DDB),
                 *(f"data/metrics/debias_classifier_{m}.json" for m in DDB)]:
        assert (tmp / path).is_file(), path
    metrics = json.loads((tmp / "data/scores/baseline/metrics.json").read_text())
    for key in ["bias_score", "bias_score_normalised", "fd", "aligned_fraction", "fidelity", "fid_indomain",
                "precision", "recall"]:
        assert isinstance(metrics[key], float), key
    assert metrics["num_samples"] == 20
    report = (tmp / "data/report/report.md").read_text()
    assert "| baseline |" in report and "samples_baseline.png" in report and "mlflow ui" in report
    assert "| latentdir |" in report and "### Sweeps" in report
    assert "| invdiff |" in report and "| invdiff_oracle (ablation: true groups, uses bias labels) |" in report
    assert "Bias discovery" in report
    assert "| distguide |" in report and "distguide_adp_accuracy.png" in report
    assert "## Diffusing DeBias" in report and "| recipe1_real (ablation: amplifier trained on real data) |" in report
    ddb_metrics = json.loads((tmp / "data/metrics/debias_classifier_recipe2.json").read_text())
    assert 0.0 <= ddb_metrics["worst_group_accuracy"] <= ddb_metrics["unbiased_accuracy"] <= 1.0
    shown = dvc(tmp, "metrics", "show", "--json")
    assert shown.returncode == 0 and "bias_score" in shown.stdout


def test_second_repro_runs_nothing(repro_project):
    lock = (repro_project / "dvc.lock").read_text()
    proc = dvc(repro_project, "repro")
    assert proc.returncode == 0
    assert "Running stage" not in proc.stdout
    assert "up to date" in proc.stdout.lower()
    assert (repro_project / "dvc.lock").read_text() == lock


def test_stages_logged_to_mlflow(repro_project):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repro_project}/mlflow.db")
    exp = client.get_experiment_by_name("debias-diffusion")
    runs = client.search_runs([exp.experiment_id])
    stages = {r.data.tags["stage"] for r in runs}
    assert {"prepare_data", "train_classifiers", "train_diffusion", "fid_reference", "sample", "score",
            "fit_directions", "sweep", "report", "fit_grouper", "finetune_guidance", "fit_adp", "sample_bias_aligned",
            "train_bias_amplifier", "train_bias_amplifier_real", "debias_classifier"} <= stages
    ddb_runs = {r.info.run_name for r in runs if r.data.tags["stage"] == "debias_classifier"}
    assert ddb_runs == {f"debias_classifier@{m}" for m in DDB}
    assert all(r.data.tags.get("git_revision") for r in runs)
    report_runs = [r for r in runs if r.data.tags["stage"] == "report"]
    assert sorted(r.info.run_name for r in report_runs) == sorted(["baseline", "latentdir", *INVDIFF, "distguide"])
    assert "fid_indomain" in report_runs[0].data.metrics


def test_prefect_flow_matches_dvc_repro(repro_project, tmp_path_factory):
    """The flow on a fresh copy leaves the same dvc.lock as `dvc repro`; a second flow run skips every stage."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import debias_pipeline

    tmp = make_project(tmp_path_factory.mktemp("flow"))
    env = _env(tmp)
    old = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "PATH")}
    os.environ.update({k: env[k] for k in old})
    try:
        with prefect_test_harness():
            first = debias_pipeline(project_dir=str(tmp))
            second = debias_pipeline(project_dir=str(tmp))
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert set(first.values()) == {"ran"}
    assert set(second.values()) == {"up to date"}
    assert next(iter(first)) == "prepare_data" and list(first)[-1] == "report"
    ours = yaml.safe_load((tmp / "dvc.lock").read_text())
    theirs = yaml.safe_load((repro_project / "dvc.lock").read_text())
    differing = {stage: [o["path"] for o, t in zip(ours["stages"][stage].get("outs", []),
                                                   theirs["stages"][stage].get("outs", []), strict=True) if o != t]
                 for stage in ours["stages"] if ours["stages"][stage] != theirs["stages"][stage]}
    assert not differing, f"the flow and dvc repro produced different outputs: {differing}"
    # Same seed, same CPU: the metrics of the two independent runs are identical, byte for byte.
    for metrics in ["data/scores/baseline/metrics.json", "data/scores/latentdir/metrics.json",
                    "data/scores/invdiff/metrics.json", "data/metrics/fit_grouper.json",
                    "data/metrics/debias_classifier_recipe1.json", "data/metrics/sample_bias_aligned.json",
                    "data/metrics/train_classifiers.json", "data/metrics/train_diffusion.json"]:
        assert (tmp / metrics).read_bytes() == (repro_project / metrics).read_bytes(), metrics


def test_push_and_pull_through_a_local_directory_remote(repro_project, tmp_path):
    """Artifacts travel through a DVC remote (here a local directory, as a GPU worker would use S3 or SSH)."""
    tmp = repro_project
    assert dvc(tmp, "remote", "add", "-d", "store", str(tmp_path / "store")).returncode == 0
    try:
        pushed = dvc(tmp, "push")
        assert pushed.returncode == 0, pushed.stderr[-2000:]
        before = (tmp / "data/models/diffusion/unet/diffusion_pytorch_model.safetensors").read_bytes()
        for path in ("data/models", "data/prepared", "data/report", ".dvc/cache"):
            shutil.rmtree(tmp / path)
        assert "deleted" in dvc(tmp, "status").stdout
        pulled = dvc(tmp, "pull")
        assert pulled.returncode == 0, pulled.stderr[-2000:]
        assert (tmp / "data/models/diffusion/unet/diffusion_pytorch_model.safetensors").read_bytes() == before
        status = dvc(tmp, "status")
        assert "changed" not in status.stdout and "deleted" not in status.stdout, status.stdout
    finally:
        dvc(tmp, "remote", "remove", "store")
