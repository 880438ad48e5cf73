"""MLflow as a user compares runs (docs/tracking.md): one parent run per pipeline run with the stage runs nested
under it (a flow run, a `dvc repro`, a DVC experiment), a relative store resolved to the project root, the
experiment kind, a dirty tree in git_revision, each method's own knobs in the report's runs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.tiny import ROOT, tiny_params

pytest.importorskip("mlflow")


def _client(path: Path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("debias-diffusion")
    return client, exp, client.search_runs([exp.experiment_id])


def _params(tmp: Path):
    from stages.common import load_params

    (tmp / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    return load_params(tmp / "params.yaml")


def test_relative_store_resolves_against_dvc_root(monkeypatch, tmp_path):
    from stages.common import resolve_uri

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # what DVC sets; for `exp run --temp`: the original checkout
    monkeypatch.chdir(ROOT)
    assert resolve_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    assert resolve_uri("runs") == str(tmp_path / "runs")
    for fixed in ("sqlite:////abs/mlflow.db", "http://127.0.0.1:5000", str(tmp_path / "store")):
        assert resolve_uri(fixed) == fixed
    monkeypatch.delenv("DVC_ROOT")
    assert resolve_uri("sqlite:///mlflow.db") == f"sqlite:///{ROOT}/mlflow.db"


def test_stage_runs_nest_under_one_parent_per_pipeline_run(monkeypatch, tmp_path):
    from stages.common import mlflow_run

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    params = _params(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run(["git", "add", "params.yaml"], check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"], check=True)
    (tmp_path / "params.yaml").write_text((tmp_path / "params.yaml").read_text() + "\n")  # a dirty tree
    for run_id in ("flow-a", "flow-b"):
        monkeypatch.setenv("PIPELINE_RUN_ID", run_id)
        monkeypatch.setenv("PIPELINE_RUN_NAME", f"flow {run_id}")
        for stage in ("prepare_data", "train_diffusion"):
            with mlflow_run(stage, params, ("data",)) as run:
                run.metrics({"x": 1.0})
    with pytest.raises(RuntimeError), mlflow_run("score", params, ("score",)):
        raise RuntimeError("a failed stage")
    _, exp, runs = _client(tmp_path)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on the runs list
    parents = {r.data.tags["pipeline_run"]: r for r in runs if r.data.tags["stage"] == "pipeline"}
    assert set(parents) == {"flow-a", "flow-b"} and parents["flow-a"].info.run_name == "flow flow-a"
    assert parents["flow-a"].info.status == "FINISHED" and parents["flow-b"].info.status == "FAILED"
    for r in runs:
        if r.data.tags["stage"] != "pipeline":
            assert r.data.tags["mlflow.parentRunId"] == parents[r.data.tags["pipeline_run"]].info.run_id
        assert r.data.tags["git_revision"].endswith("-dirty") and r.data.tags["git_dirty"] == "params.yaml"
    assert len(runs) == 2 + 5


def _stage(tmp: Path, name: str) -> dict:
    code = ("from stages.common import load_params, mlflow_run\n"
            f"with mlflow_run('{name}', load_params(), ('data',)):\n"
            f"    open('{name}.txt', 'w').write('x')\n")
    (tmp / f"{name}.py").write_text(code)
    return {"cmd": f"{sys.executable} {name}.py", "deps": [f"{name}.py"], "outs": [f"{name}.txt"]}


def test_dvc_repro_gets_one_parent_run_per_invocation(tmp_path):
    """A bare `dvc repro`: the stages share the parent of the dvc process they run under; a second repro gets its
    own."""
    _params(tmp_path)
    stages = {"one": _stage(tmp_path, "one"), "two": _stage(tmp_path, "two")}
    stages["two"]["deps"].append("one.txt")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    env = {k: v for k, v in os.environ.items() if k not in ("PIPELINE_RUN_ID", "MLFLOW_TRACKING_URI", "DVC_ROOT")}
    env["PYTHONPATH"] = str(ROOT)
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                [sys.executable, "-m", "dvc", "repro", "-q"], [sys.executable, "-m", "dvc", "repro", "-q", "-f"]):
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    _, _, runs = _client(tmp_path)
    parents = [r for r in runs if r.data.tags["stage"] == "pipeline"]
    assert len(parents) == 2 and all(p.info.run_name.startswith("dvc repro ") for p in parents)
    for parent in parents:
        children = [r.data.tags["stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(children) == ["one", "two"]
        assert parent.info.status == "FINISHED"


def test_report_runs_log_each_methods_own_knobs(monkeypatch, tmp_path):
    from stages import report

    dumped = _params(tmp_path).model_dump(mode="json")
    monkeypatch.setattr(report, "METHODS", tmp_path)
    (tmp_path / "invdiff_lambda0").mkdir()
    (tmp_path / "invdiff_lambda0" / "summary.json").write_text('{"lam": 0.0, "groups": 2}')
    assert report.method_knobs("baseline", dumped) == {}
    assert report.method_knobs("latentdir", dumped) == {"latentdir": dumped["latentdir"]}
    assert report.method_knobs("distguide", dumped)["distguide"]["scale"] == dumped["distguide"]["scale"]
    lam0 = report.method_knobs("invdiff_lambda0", dumped)["invdiff"]
    assert lam0["lam"] == 0.0 != dumped["invdiff"]["lam"] and lam0["strength"] == dumped["invdiff"]["strength"]
    assert lam0["group_source"] == "data/methods/invdiff_groups"


def test_fitted_models_are_mlflow_models_without_pickle(monkeypatch, tmp_path, unet):
    """The U-Net as train_diffusion writes it, logged as an MLflow model: no pickle in the store, loaded back by
    mlflow.pyfunc it gives the U-Net's own output, and it can be registered."""
    import mlflow
    import numpy as np
    import torch

    from pipeline.diffusion import make_noise_scheduler
    from stages.common import mlflow_run

    model_dir = tmp_path / "model"
    unet.save_pretrained(model_dir / "unet", safe_serialization=True)
    make_noise_scheduler(100, "linear", "epsilon").save_config(model_dir / "scheduler")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("PIPELINE_RUN_ID", raising=False)
    with mlflow_run("train_diffusion", _params(tmp_path), ("diffusion",)) as run:
        run.model(model_dir, "diffusion", "diffusion")
    _, exp, _ = _client(tmp_path)
    (logged,) = mlflow.search_logged_models(experiment_ids=[exp.experiment_id], output_format="list")
    stored = [p for p in (tmp_path / "mlruns").rglob("*") if p.is_file()]
    assert stored and not [p for p in stored if p.suffix in (".pkl", ".pickle", ".bin", ".pt")], stored
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype("float32")
    got = mlflow.pyfunc.load_model(logged.model_uri).predict({"x_t": x, "timestep": [3, 50], "class_label": [0, 7]})
    with torch.no_grad():
        want = unet(torch.from_numpy(x), torch.tensor([3, 50]), class_labels=torch.tensor([0, 7])).sample.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert str(mlflow.register_model(logged.model_uri, "debias-unet").version) == "1"
