"""The Prefect flow's own logic: stage order from the DVC graph, method selection, the `gpu` tag, the flow's
parameters, one run per checkout with its own params, retries through real stage failures, the CLI's errors."""

import os
import subprocess
import sys
import textwrap

import prefect.exceptions
import pytest
import yaml

from flows.pipeline import (
    LOCK,
    METHODS,
    PARAMS_BACKUP,
    REPORT_COLUMNS,
    changed_stages,
    dag_and_changed,
    debias_pipeline,
    device_stages,
    hold_project,
    mlflow_runs_url,
    report_markdown,
    run_stage,
    select_stages,
    stage_dag,
    stage_exit_code,
    stage_graph,
    stale_stages,
    uses_device,
)
from pipeline.errors import UserError
from tests.dag import prefect_harness
from tests.tiny import ROOT, tiny_params

DEPS = {
    "prepare_data": set(), "train_classifiers": {"prepare_data"}, "train_diffusion": {"prepare_data"},
    "fid_reference": {"prepare_data", "train_classifiers"}, "sample@baseline": {"train_diffusion"},
    "fit_other": {"train_diffusion"}, "sample@other": {"fit_other"},
    "score@baseline": {"sample@baseline", "fid_reference"},
    "score@other": {"sample@other", "fid_reference"}, "report": {"score@baseline", "score@other"},
}


def test_select_stages_runs_the_methods_upstream_closure_and_no_report():
    order = select_stages(DEPS, ["baseline"])
    assert set(order) == {"prepare_data", "train_classifiers", "train_diffusion", "fid_reference",
                          "sample@baseline", "score@baseline"}
    for stage in order:
        assert all(order.index(d) < order.index(stage) for d in DEPS[stage] if d in order)
    assert set(select_stages(DEPS, ["other"])) == {"prepare_data", "train_classifiers", "train_diffusion",
                                                   "fid_reference", "fit_other", "sample@other", "score@other"}
    for every in (None, [], ["baseline", "other"]):  # every method: the whole DAG, the report last
        order = select_stages(DEPS, every)
        assert set(order) == set(DEPS) and order[0] == "prepare_data" and order[-1] == "report"


def test_stale_stages_are_the_changed_ones_and_everything_below_them():
    """One DVC status call for the whole DAG decides which stages the flow hands to `dvc repro`."""

    class Repo:
        def status(self, targets=None):
            assert targets is None  # one call, every stage
            return {"fit_other": [{"changed deps": {"stages/fit_other.py": "modified"}}],
                    "sub/dvc.yaml:fid_reference": [{"changed outs": {"x": "deleted"}}]}

    changed = changed_stages(Repo())
    assert changed == {"fit_other", "fid_reference"}
    order = select_stages(DEPS)
    assert stale_stages(order, DEPS, changed) == {
        "fit_other", "sample@other", "score@other", "fid_reference", "score@baseline", "report"}
    assert stale_stages([n for n in order if n != "report"], DEPS, changed) == {
        "fit_other", "sample@other", "score@other", "fid_reference", "score@baseline"}


def test_the_graph_and_the_status_come_from_one_dvc_index(monkeypatch):
    """dag_and_changed: the real dvc.yaml's graph, and the status asked of the same Repo (one index built)."""
    from contextlib import contextmanager

    from dvc.repo import Repo

    import flows.pipeline as pipeline_flow

    repos = []

    @contextmanager
    def one_repo(root, wait):
        with Repo(root) as repo:
            repo.status = lambda targets=None: {"report": [{"changed deps": {"x": "modified"}}]}
            repos.append(repo)
            yield repo

    monkeypatch.setattr(pipeline_flow, "dvc_repo", one_repo)
    deps, cmds, changed = dag_and_changed(ROOT, wait=False)
    assert len(repos) == 1 and changed == {"report"}
    assert (deps, cmds) == stage_dag(ROOT)


def test_select_stages_rejects_unknown_method():
    with pytest.raises(UserError, match="nosuch"):
        select_stages(DEPS, ["nosuch"])


def test_stage_graph_reads_the_real_dvc_yaml():
    deps = stage_graph(ROOT)
    assert deps["train_diffusion"] == {"prepare_data"}
    assert {"sample@baseline", "fid_reference", "train_classifiers"} <= deps["score@baseline"]
    baseline = set(select_stages(deps, ["baseline"]))
    assert {"prepare_data", "train_diffusion", "sample@baseline", "score@baseline"} <= baseline
    assert not baseline & {"fit_directions", "fit_adp", "fit_grouper", "sample_bias_aligned", "report",
                           "train_bias_amplifier", "sample@latentdir"}
    assert {"fit_grouper", "finetune_guidance@invdiff"} <= set(select_stages(deps, ["invdiff"]))
    assert set(METHODS) == {n.split("@")[1] for n in deps if "@" in n}


def test_uses_device_reads_what_a_module_does_with_the_device():
    assert uses_device("from stages.common import device\ndev = device()\nrun(device=dev)\n")
    assert uses_device("scorer = Scorer(device=device())\n")
    assert uses_device("from accelerate import Accelerator\naccelerator = Accelerator()\n")
    assert not uses_device("from stages.common import device\ndevice()  # thread count\n")
    assert not uses_device("import torch\nx = torch.zeros(3)\n")


def test_gpu_tag_covers_every_stage_that_uses_the_device():
    deps, cmds = stage_dag(ROOT)
    tagged = device_stages(ROOT, cmds)
    gpu = {n.split("@")[0] for n in tagged}
    assert {"train_classifiers", "train_diffusion", "fid_reference", "sample", "score", "sweep", "fit_grouper",
            "finetune_guidance", "fit_adp", "fit_directions", "sample_bias_aligned"} <= gpu
    assert not gpu & {"prepare_data", "report"}
    for name in deps:  # every foreach member of a tagged stage is tagged
        assert (name in tagged) == (name.split("@")[0] in gpu)


def test_flow_parameters_are_flat_with_methods_as_a_choice():
    """The deployment's parameter schema (the UI's run form, `prefect deployment run --param`)."""
    props = debias_pipeline.parameters.model_dump()["properties"]
    assert set(props) == {"methods", "overrides", "project_dir", "max_parallel"}
    assert props["methods"]["anyOf"][0]["items"]["enum"] == list(METHODS)
    assert "baseline" in METHODS and "invdiff" in METHODS
    with pytest.raises(prefect.exceptions.ParameterTypeError, match=r"methods\.0"):
        debias_pipeline.validate_parameters({"methods": ["nosuch"]})
    # The old nested form is refused, not run with project_dir silently reset to ".".
    with pytest.raises(prefect.exceptions.SignatureMismatchError, match="config"):
        debias_pipeline.validate_parameters({"config": {"methods": ["baseline"]}})
    assert debias_pipeline.validate_parameters({"methods": ["baseline"]})["methods"] == ["baseline"]


@pytest.fixture
def params_project(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    return tmp_path


def test_a_run_gets_its_own_params_and_the_checkouts_file_is_left_as_it_was(params_project):
    path = params_project / "params.yaml"
    before = path.read_bytes()
    with hold_project(params_project, {"sample.guidance_scale": 2.5}, "run-a"):
        assert yaml.safe_load(path.read_text())["sample"]["guidance_scale"] == 2.5
    assert path.read_bytes() == before
    with pytest.raises(RuntimeError, match="stage broke"), \
            hold_project(params_project, {"sample.guidance_scale": 3.0}, "run-b"):
        raise RuntimeError("stage broke")
    assert path.read_bytes() == before
    for bad, key in (({"data.bias_ratio": 1.5}, r"data\.bias_ratio"), ({"data.no_such_key": 1}, "no_such_key")):
        with pytest.raises(UserError, match=key), hold_project(params_project, bad, "run-c"):
            pass
        assert path.read_bytes() == before


def test_a_second_concurrent_run_is_refused_with_a_clear_message(params_project):
    before = (params_project / "params.yaml").read_bytes()
    with hold_project(params_project, {"sample.guidance_scale": 2.5}, "run-a"):
        with pytest.raises(UserError, match="flow run run-a .* is running in this checkout; wait"), \
                hold_project(params_project, {"sample.guidance_scale": 4.0}, "run-b"):
            pass
        assert yaml.safe_load((params_project / "params.yaml").read_text())["sample"]["guidance_scale"] == 2.5
    assert (params_project / "params.yaml").read_bytes() == before
    with hold_project(params_project, {}, "run-c"):  # free again
        pass


def test_overrides_left_by_a_killed_run_are_undone_by_the_next(params_project):
    """A run killed inside hold_project (no `finally`) leaves the override and the backup; the next run restores."""
    code = ("import sys, os, pathlib; from flows.pipeline import hold_project\n"
            "with hold_project(pathlib.Path(sys.argv[1]), {'sample.guidance_scale': 9.0}, 'killed'):\n"
            "    os._exit(9)\n")
    before = (params_project / "params.yaml").read_bytes()
    proc = subprocess.run([sys.executable, "-c", code, str(params_project)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 9 and (params_project / PARAMS_BACKUP).is_file()
    assert (params_project / "params.yaml").read_bytes() != before
    with hold_project(params_project, {}, "next"):
        assert (params_project / "params.yaml").read_bytes() == before
    assert not (params_project / PARAMS_BACKUP).exists() and (params_project / LOCK).is_file()


def test_stage_exit_code_is_read_exactly():
    msg = "ERROR: failed to reproduce 'x': failed to run: python -m stages.x, exited with {}"
    assert stage_exit_code(msg.format(2), 255) == 2
    assert stage_exit_code(msg.format(20), 255) == 20
    assert stage_exit_code(msg.format(255), 255) == 255
    assert stage_exit_code(msg.format(1), 255) == 1
    assert stage_exit_code("ERROR: lock held", 255) == 255


FLAKY = """\
import os, sys
with open("attempts.txt", "a") as f:
    f.write(os.environ.get("PIPELINE_RUN_ID", "none") + "\\n")
sys.exit(int(open("code.txt").read()))
"""


@pytest.fixture
def flaky_project(tmp_path):
    """A DVC project whose one stage exits with the code in code.txt and records each attempt."""
    (tmp_path / "fail.py").write_text(FLAKY)
    (tmp_path / "params.yaml").write_text("{}\n")
    (tmp_path / "dvc.yaml").write_text(textwrap.dedent("""\
        stages:
          flaky:
            cmd: python fail.py
            deps: [fail.py, code.txt]
            outs: [out.txt]
    """))
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                [sys.executable, "-m", "dvc", "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True)
    return tmp_path


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_harness():
        yield


@pytest.mark.parametrize(("code", "attempts"), [(2, 1), (1, 3), (20, 3)])
def test_a_real_stage_failure_is_retried_unless_it_is_a_user_error(flaky_project, prefect_api, monkeypatch,
                                                                   code, attempts):
    (flaky_project / "code.txt").write_text(str(code))
    assert run_stage.retries == 2
    monkeypatch.setattr(run_stage, "retry_delay_seconds", 0)  # the count, not the wait, is under test
    state = debias_pipeline(project_dir=str(flaky_project), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match=f"stage flaky failed with exit code {code}$"):
        state.result()
    tried = (flaky_project / "attempts.txt").read_text().split()
    assert len(tried) == attempts
    assert set(tried) == {str(state.state_details.flow_run_id)}  # the stage's pipeline_run tag


def test_the_cli_holds_the_checkout_through_the_flow_and_reads_dvc_status_once(flaky_project, prefect_api,
                                                                               monkeypatch, capsys):
    """main() takes the checkout and reads DVC's status before the flow starts (overlapping the ephemeral API
    server's boot); the flow uses that status and does not take the checkout again."""
    import flows.pipeline as fp

    (flaky_project / "dvc.yaml").write_text(textwrap.dedent("""\
        stages:
          holder:
            cmd: python -c "import shutil; shutil.copy('.dvc/tmp/flow.lock', 'holder.txt')"
            deps: [code.txt]
            outs: [holder.txt]
    """))
    (flaky_project / "code.txt").write_text("0")
    calls = []
    monkeypatch.setattr(fp, "dag_and_changed", lambda *a, **k: calls.append(a) or dag_and_changed(*a, **k))
    assert fp.start_ephemeral_api() is None  # the harness's API server is configured: nothing to boot
    fp.main(["--project-dir", str(flaky_project)])
    assert capsys.readouterr().out.split() == ["holder", "ran"]
    assert len(calls) == 1 and not fp._HANDED_OVER
    # the stage ran while the checkout was held, by the command line's run, not the flow's
    assert (flaky_project / "holder.txt").read_text() == f"flow run from the command line (pid {os.getpid()})"
    fp.main(["--project-dir", str(flaky_project)])  # held again and released: a second run is not refused
    assert capsys.readouterr().out.split() == ["holder", "up", "to", "date"]


def test_a_dvc_command_running_in_the_checkout_is_a_one_line_refusal(flaky_project):
    from dvc.repo import Repo

    with Repo(str(flaky_project)) as repo, repo.lock:  # as a running `dvc repro` holds it
        with pytest.raises(UserError, match="another DVC command is running in this checkout"):
            dag_and_changed(flaky_project, wait=False)
    assert dag_and_changed(flaky_project, wait=False)[0] == {"flaky": set()}  # free again


@pytest.mark.parametrize(("args", "key"), [
    (["--set", "seed=[1"], "seed"), (["--set", "data.bias_ratio=1.5"], "data.bias_ratio"),
    (["--project-dir", "/no/such/dir"], "/no/such/dir"), (["--methods", "nosuch"], "nosuch"),
    (["--set", "novalue"], "novalue"),
])
def test_cli_mistakes_are_one_line(args, key):
    proc = subprocess.run([sys.executable, "-m", "flows.pipeline", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and key in lines[0], proc.stderr
    assert proc.stdout == ""


def test_cli_prints_a_stage_failure_last_and_alone(flaky_project):
    (flaky_project / "code.txt").write_text("2")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_HOME": str(flaky_project / ".prefect")}
    proc = subprocess.run([sys.executable, "-m", "flows.pipeline", "--project-dir", str(flaky_project)], cwd=ROOT,
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.rstrip().splitlines()[-1] == "error: stage flaky failed with exit code 2", proc.stderr


def test_report_artifact_shows_the_reports_numbers_and_links_this_runs_mlflow_runs(params_project, monkeypatch):
    import mlflow

    rows = [{"method": "baseline", "bias_score_normalised": 0.98, "aligned_fraction": 0.935, "fidelity": 0.945,
             "fid_indomain": 12.5, "precision": 0.5, "recall": 0.25},
            {"method": "latentdir", "bias_score_normalised": 0.5, "aligned_fraction": 0.61}]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert mlflow_runs_url(params_project, "abc") is None  # no experiment yet
    exp = mlflow.MlflowClient(f"sqlite:///{params_project / 'mlflow.db'}").create_experiment("debias-diffusion")
    url = mlflow_runs_url(params_project, "abc")
    assert url.startswith(f"http://127.0.0.1:5000/#/experiments/{exp}/runs?searchFilter=")
    assert "tags.pipeline_run%20%3D%20%27abc%27" in url
    md = report_markdown(rows, url).splitlines()
    assert md[0] == "| method | " + " | ".join(REPORT_COLUMNS) + " |"
    assert md[2] == "| baseline | 0.98 | 0.935 | 0.945 | 12.5 | 0.5 | 0.25 |"
    assert md[3] == "| latentdir | 0.5 | 0.61 | – | – | – | – |"
    assert f"]({url})" in md[-1]
