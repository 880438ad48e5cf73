"""A served deployment, as the Prefect UI uses it: a real `prefect server start` on 127.0.0.1, `python -m
flows.serve`, a run triggered through the API with parameters, completed on a copy of the session's tiny DAG
(tests/conftest.py): the run re-does only what its override changes."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from tests.dag import _env, copy_project

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """End a process started in its own session, with everything it started."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with contextlib.suppress(ProcessLookupError):  # children that outlived their parent (a flow-run subprocess)
        os.killpg(proc.pid, signal.SIGKILL)


def _wait(what: str, check, timeout: float, procs: list[subprocess.Popen], poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, f"{p.args} exited with {p.returncode} while waiting for {what}"
        try:
            value = check()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_served_deployment_runs_a_triggered_flow_run(tiny_dag, tmp_path):
    project = copy_project(tiny_dag.path, tmp_path / "project")
    params_before = (project / "params.yaml").read_bytes()
    untouched = ["data/samples/latentdir/images.npz", "data/report/report.md", "data/models/diffusion/unet/"
                 "diffusion_pytorch_model.safetensors", "data/scores/invdiff/metrics.json"]
    kept = {p: (project / p).read_bytes() for p in untouched}
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**_env(project), "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    logs = {n: open(tmp_path / f"{n}.log", "w") for n in ("server", "serve")}  # noqa: SIM115
    procs: list[subprocess.Popen] = []
    started = time.monotonic()
    try:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path, env=env, stdout=logs["server"], stderr=subprocess.STDOUT, start_new_session=True))
        client = httpx.Client(base_url=api, timeout=30)
        _wait("the Prefect server", lambda: client.get("/health").status_code == 200, 180, procs)
        procs.append(subprocess.Popen([sys.executable, "-m", "flows.serve", "--project-dir", str(project)],
                                      cwd=project, env=env, stdout=logs["serve"], stderr=subprocess.STDOUT,
                                      start_new_session=True))

        def deployment():
            r = client.get("/deployments/name/debias-pipeline/default")
            return r.json() if r.status_code == 200 else None

        dep = _wait("the deployment", deployment, 180, procs)
        assert dep["parameters"]["project_dir"] == str(project)
        schema = dep["parameter_openapi_schema"]["properties"]
        assert "baseline" in schema["methods"]["anyOf"][0]["items"]["enum"]  # a choice, not free text
        assert schema["project_dir"]["enum"] == [str(project)]  # frozen: no run elsewhere
        elsewhere = client.post(f"/deployments/{dep['id']}/create_flow_run",
                                json={"parameters": {"project_dir": str(tmp_path)}})
        assert elsewhere.status_code >= 400, elsewhere.text
        assert "description" in schema["methods"] and "dotted keys" in schema["overrides"]["description"]
        # The old nested form fails, instead of running everything with project_dir reset to ".".
        nested = client.post(f"/deployments/{dep['id']}/create_flow_run",
                             json={"parameters": {"config": {"methods": ["baseline"]}}}).json()["id"]
        # Two runs triggered at once with different overrides: one runs, the other is refused, not mixed in.
        scales = {}
        for scale in (2.5, 3.0):
            created = client.post(f"/deployments/{dep['id']}/create_flow_run",
                                  json={"parameters": {"methods": ["baseline"],
                                                       "overrides": {"sample.guidance_scale": scale}}})
            assert created.status_code == 201, created.text
            scales[created.json()["id"]] = scale

        def finished():
            states = {i: client.get(f"/flow_runs/{i}").json()["state"] for i in [*scales, nested]}
            return states if all(s["type"] in TERMINAL for s in states.values()) else None

        states = _wait("the flow runs", finished, 1200, procs, poll=2.0)
        elapsed = time.monotonic() - started
        print(f"nested config run: {states[nested]['type']}: {states[nested]['message']}")
        assert states[nested]["type"] in ("FAILED", "CRASHED"), states[nested]
        assert not client.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [nested]}}}).json()
        states.pop(nested)
        done = [i for i, s in states.items() if s["type"] == "COMPLETED"]
        assert len(done) == 1, f"{states}\n" + (tmp_path / "serve.log").read_text()[-4000:]
        run_id, (refused,) = done[0], [s for i, s in states.items() if i != done[0]]
        assert refused["type"] == "FAILED" and "is running in this checkout; wait" in refused["message"], refused
        run = client.get(f"/flow_runs/{run_id}").json()
        tasks = client.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [run_id]}}}).json()
        logs_text = "\n".join(r["message"] for r in client.post(
            "/logs/filter", json={"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200}).json())
    finally:
        for p in reversed(procs):
            _stop(p)
        for f in logs.values():
            f.close()
    print(f"served deployment: server start to completed runs {elapsed:.0f} s")

    assert run["name"] == f"baseline [sample.guidance_scale={scales[run_id]}]"
    # The run handed DVC the stages the override made stale, as task runs, and listed the baseline's other
    # upstream stages as up to date in its log; nothing of the other methods, and no report.
    by_name = {t["name"].rsplit("-", 1)[0]: t for t in tasks}
    assert set(by_name) == {"sample@baseline", "score@baseline"}, set(by_name)
    (listed,) = [line for line in logs_text.splitlines() if line.startswith("up to date (DVC status): ")]
    up_to_date = set(listed.split(": ", 1)[1].split(", "))
    assert {"prepare_data", "train_diffusion", "fid_reference", "train_classifiers"} <= up_to_date, listed
    assert not any(n.startswith(("report", "fit_", "sweep", "sample@latentdir")) for n in up_to_date), listed
    # Each task run names its upstream task runs, so the UI draws the DAG's edges.
    upstream = {i["id"] for i in by_name["score@baseline"]["task_inputs"]["wait_for"]}
    assert by_name["sample@baseline"]["id"] in upstream
    assert (project / "data/scores/baseline/metrics.json").read_bytes() != (
        tiny_dag.path / "data/scores/baseline/metrics.json").read_bytes()  # re-scored at the new guidance scale
    assert {p: (project / p).read_bytes() for p in untouched} == kept  # the other methods and the report untouched
    # The overrides were used for this run (dvc.lock records them) and the checkout's params.yaml is untouched.
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["sample@baseline"]["params"]["params.yaml"]["sample"]["guidance_scale"] == scales[run_id]
    assert (project / "params.yaml").read_bytes() == params_before
    # Stage runs in MLflow carry the flow run's id; only the stages the override changed ran (the copy has no
    # MLflow store of its own, so every run here is this flow run's).
    import mlflow

    ml = mlflow.MlflowClient(f"sqlite:///{Path(project) / 'mlflow.db'}")
    exp = ml.get_experiment_by_name("debias-diffusion")
    runs = ml.search_runs([exp.experiment_id])
    tags = {r.data.tags["stage"]: r.data.tags["pipeline_run"] for r in runs}
    assert set(tags) == {"pipeline", "sample", "score"} and set(tags.values()) == {run_id}, tags
    parent = next(r.info.run_id for r in runs if r.data.tags["stage"] == "pipeline")  # the flow run's parent run
    assert all(r.data.tags["mlflow.parentRunId"] == parent for r in runs if r.data.tags["stage"] != "pipeline")
