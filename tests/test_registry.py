"""The method registry (pipeline/methods/registry.py) and its DAG half (params.yaml `methods`/`sweeps`, which
dvc.yaml's sample/score/sweep `foreach` read): the copies of a method's name agree, bad `methods` entries are
refused in one line, and a method added through the registry alone runs through sample, score and report."""

import shutil
from functools import cache

import numpy as np
import pytest
import torch
import yaml

from pipeline.config import UserError, parse_params, read_params
from pipeline.methods.registry import REGISTRY, Method, get_method, register
from pipeline.sampling import SamplerHooks
from tests.tiny import ROOT, tiny_params


@cache
def dag() -> dict[str, object]:
    """{stage addressing: DVC's stage}, dvc.yaml expanded by DVC itself (foreach from params.yaml)."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        return {s.name: s for s in repo.index.stages}


def deps(stage) -> set[str]:
    return {d.def_path for d in stage.deps}


def params_of(stage) -> set[str]:
    from dvc.dependency.param import ParamsDependency

    return {k for d in stage.deps if isinstance(d, ParamsDependency) for k in d.params}


def test_every_dag_method_is_registered_and_every_entry_runs():
    raw = read_params(ROOT / "params.yaml")
    assert list(raw["methods"]) == list(REGISTRY)  # no method without code, no entry the DAG never runs
    for name, section in raw["sweeps"].items():
        method = REGISTRY[name]
        assert method.sweep is not None and method.knob, name
        assert method.section == section, f"sweeps.{name} reads {section}, its entry {method.section}"
    assert {n for n, m in REGISTRY.items() if m.sweep is not None} == set(raw["sweeps"])


def test_dvc_expands_the_methods_maps():
    """sample@/score@ per `methods` entry, sweep@ per `sweeps` entry, with the entry's fitted folder and knobs."""
    raw = read_params(ROOT / "params.yaml")
    stages = dag()
    for kind, names in (("sample", raw["methods"]), ("score", raw["methods"]), ("sweep", raw["sweeps"])):
        assert {a.split("@")[1] for a in stages if a.startswith(kind + "@")} == set(names), kind
    for name, entry in raw["methods"].items():
        assert entry["fitted"] in deps(stages[f"sample@{name}"])
        assert entry["knobs"] in params_of(stages[f"sample@{name}"])
        assert f"data/samples/{name}" in deps(stages[f"score@{name}"])
    for name, section in raw["sweeps"].items():
        assert raw["methods"][name]["fitted"] in deps(stages[f"sweep@{name}"])  # what its sweep builder reads
        assert section in params_of(stages[f"sweep@{name}"])


def test_invdiff_variants_are_the_fit_stages_variants():
    """finetune_guidance@<variant> writes data/methods/<variant>: the variants are the registry's invdiff entries."""
    raw = read_params(ROOT / "params.yaml")
    fits = {a.split("@")[1] for a in dag() if a.startswith("finetune_guidance@")}
    assert fits == {n for n, m in REGISTRY.items() if m.section == "invdiff"}
    for variant in fits:
        assert raw["methods"][variant]["fitted"] == f"data/methods/{variant}"
        assert f"data/methods/{variant}" in {o.def_path for o in dag()[f"finetune_guidance@{variant}"].outs}


def test_classifier_methods_agree():
    """Diffusing DeBias's classifier methods: its tuple, dvc.yaml's debias_classifier foreach, the report's labels."""
    from pipeline.methods.diffusing_debias import CLASSIFIER_METHODS
    from stages.report import DDB_LABELS

    fits = [a.split("@")[1] for a in dag() if a.startswith("debias_classifier@")]
    assert sorted(fits) == sorted(CLASSIFIER_METHODS) == sorted(DDB_LABELS)


def test_the_flow_offers_the_params_methods():
    from flows.pipeline import METHODS

    raw = read_params(ROOT / "params.yaml")
    assert set(raw["methods"]) <= set(METHODS) and set(raw["sweeps"]) <= set(METHODS)


@pytest.mark.parametrize("change,needle", [
    ({"methods": {"Bad-Name": {"fitted": "data/x", "knobs": "sample"}}}, "methods.Bad-Name: a method name"),
    ({"methods": {"../x": {"fitted": "data/x", "knobs": "sample"}}}, "methods.../x: a method name"),
    ({"methods": {"toy": {"fitted": "data/x", "knobs": "sample.nope"}}}, "methods.toy.knobs: 'sample.nope'"),
    ({"methods": {"toy": {"fitted": "/etc", "knobs": "sample"}}}, "methods.toy.fitted: '/etc' must be a folder"),
    ({"methods": {"toy": {"fitted": "data/../..", "knobs": "sample"}}}, "methods.toy.fitted"),
    ({"methods": {"toy": {"knobs": "sample"}}}, "methods.toy.fitted: Field required"),
    ({"methods": {}}, "methods"),
    ({"sweeps": {"nosuch": "invdiff"}}, "sweeps.nosuch: not a method"),
    ({"sweeps": {"baseline": "sample"}}, "sweeps.baseline: 'sample' is not a params section with sweep_per_class"),
])
def test_bad_methods_entries_are_one_line(change, needle):
    raw = {**tiny_params(), **change}
    with pytest.raises(UserError) as exc:
        parse_params(raw)
    assert needle in str(exc.value) and "\n" not in str(exc.value), str(exc.value)


def test_a_dag_method_without_an_entry_is_one_line(tmp_path, monkeypatch, capsys):
    """A name params.yaml runs but the registry lacks: sample refuses it in one line, exit 2, nothing written."""
    from stages.sample import main

    raw = tiny_params()
    raw["methods"]["unregistered"] = {"fitted": "data/models/diffusion", "knobs": "sample"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DEBIAS_TRACKING", "off")
    with pytest.raises(SystemExit) as exc:
        main(["--method", "unregistered"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.count("\n") == 0 and "no such method in pipeline/methods/registry.py" in err
    assert not (tmp_path / "data").exists()
    with pytest.raises(UserError, match="sweeps|no sweep defined"):
        get_method("baseline").sweep_grid(parse_params(raw), np.zeros(2, int))


class Shift(SamplerHooks):
    """The toy method: z_T ← z_T + c."""

    def __init__(self, c: float):
        self.c = c

    def initial_noise(self, z: torch.Tensor, ctx) -> torch.Tensor:
        return z + self.c


@pytest.fixture
def toy_method():
    """`toyshift` in the registry for one test (a test's method: no product file names it)."""
    method = register(Method("toyshift", None, lambda params, fitted, conditions, device: (Shift(0.5), {"shift": 0.5}),
                             label="toy: z_T + 0.5",
                             note=lambda params, fitted, out: [f"Toy note: a constant shift, from {fitted}.", ""]))
    yield method
    del REGISTRY["toyshift"]


@pytest.mark.usefixtures("one_thread")
def test_a_method_added_through_the_registry_runs_through_sample_score_and_report(tiny_dag, tmp_path, monkeypatch,
                                                                                   toy_method):
    """The toy method registered here and named in a copy's params.yaml `methods` (no dvc.yaml or product edit):
    DVC expands its sample@/score@ stages, and sample, score and report (in-process) take it like the others."""
    from dvc.repo import Repo

    import stages.report
    import stages.sample
    import stages.score
    from tests.dag import copy_project

    project = copy_project(tiny_dag.path, tmp_path / "project")
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["methods"]["toyshift"] = {"fitted": "data/models/diffusion", "knobs": "sample"}
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    with Repo(str(project)) as repo:
        stages_ = {s.name: s for s in repo.index.stages}
    assert {"sample@toyshift", "score@toyshift"} <= set(stages_) and "sweep@toyshift" not in stages_
    assert "data/models/diffusion" in deps(stages_["sample@toyshift"])

    monkeypatch.chdir(project)
    monkeypatch.setenv("DEBIAS_TRACKING", "off")
    stages.sample.main(["--method", "toyshift"])
    stages.score.main(["--method", "toyshift"])
    stages.report.main()

    base = np.load("data/samples/baseline/images.npz")["images"]
    toy = np.load("data/samples/toyshift/images.npz")["images"]
    assert toy.shape == base.shape and not np.array_equal(toy, base)  # the hook ran
    import pandas as pd

    table, base_table = pd.read_parquet("data/samples/toyshift/samples.parquet"), pd.read_parquet(
        "data/samples/baseline/samples.parquet")
    assert (table["shift"] == 0.5).all() and (table["method"] == "toyshift").all()
    assert (table["seed"].to_numpy() == base_table["seed"].to_numpy()).all()  # paired with the other methods
    metrics = yaml.safe_load((project / "data/scores/toyshift/metrics.json").read_text())
    assert metrics["num_samples"] == len(toy)
    report = (project / "data/report/report.md").read_text()
    assert "| toyshift (toy: z_T + 0.5) |" in report and "| baseline |" in report
    assert "Toy note: a constant shift, from data/models/diffusion." in report
    assert "![toyshift samples](samples_toyshift.png)" in report
    assert (project / "data/report/samples_toyshift.png").is_file()
    rows = yaml.safe_load((project / "data/metrics/report_methods.json").read_text())
    assert [r["method"] for r in rows if r["method"] == "toyshift"] == ["toyshift"]
    shutil.rmtree(project)
