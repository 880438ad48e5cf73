"""The Prefect flow's own logic: stage order from the DVC graph, method selection, param overrides, retries."""

import pytest
import yaml

from flows.pipeline import (
    GPU_STAGES,
    PipelineConfig,
    StageFailed,
    _is_transient,
    apply_overrides,
    debias_pipeline,
    select_stages,
    stage_graph,
)
from pipeline.errors import UserError
from tests.tiny import ROOT, tiny_params

DEPS = {
    "prepare_data": set(), "train_classifiers": {"prepare_data"}, "train_diffusion": {"prepare_data"},
    "fid_reference": {"prepare_data", "train_classifiers"}, "sample@baseline": {"train_diffusion"},
    "sample@other": {"train_diffusion"}, "score@baseline": {"sample@baseline", "fid_reference"},
    "score@other": {"sample@other", "fid_reference"}, "report": {"score@baseline", "score@other"},
}


def test_select_stages_orders_by_dependency_and_filters_methods():
    order = select_stages(DEPS, ["baseline"])
    assert "sample@other" not in order and "score@other" not in order
    for stage in order:
        assert all(order.index(d) < order.index(stage) for d in DEPS[stage] if d in order)
    assert order[0] == "prepare_data" and order[-1] == "report"
    assert set(select_stages(DEPS, ["baseline", "other"])) == set(DEPS)


def test_select_stages_rejects_unknown_method():
    with pytest.raises(ValueError, match="nosuch"):
        select_stages(DEPS, ["nosuch"])


def test_stage_graph_reads_the_real_dvc_yaml():
    deps = stage_graph(ROOT)
    assert deps["train_diffusion"] == {"prepare_data"}
    assert {"sample@baseline", "fid_reference", "train_classifiers"} <= deps["score@baseline"]
    assert "prepare_data" in select_stages(deps, ["baseline"])


def test_gpu_stage_names_exist_in_dvc_yaml():
    names = {n.split("@")[0] for n in stage_graph(ROOT)}
    assert set(GPU_STAGES) <= names


def test_overrides_are_validated_before_params_yaml_is_written(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    before = (tmp_path / "params.yaml").read_text()
    with pytest.raises(UserError, match=r"data\.bias_ratio"):
        apply_overrides(tmp_path, {"data.bias_ratio": 1.5})
    with pytest.raises(UserError, match=r"data\.no_such_key"):
        apply_overrides(tmp_path, {"data.no_such_key": 1})
    assert (tmp_path / "params.yaml").read_text() == before
    apply_overrides(tmp_path, {"sample.guidance_scale": 2.5})
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["sample"]["guidance_scale"] == 2.5


class _State:
    def __init__(self, exc):
        self.exc = exc

    def result(self):
        raise self.exc


def test_user_errors_are_not_retried_but_crashes_are():
    assert _is_transient(None, None, _State(StageFailed("x", 2))) is False
    assert _is_transient(None, None, _State(StageFailed("x", 255))) is True
    assert _is_transient(None, None, _State(OSError("disk hiccup"))) is True


def test_flow_parameters_form_is_typed():
    """The deployment's parameter schema (the UI's run form) exposes overrides and methods."""
    schema = debias_pipeline.parameters.model_dump()
    props = schema["definitions"]["PipelineConfig"]["properties"]
    assert {"overrides", "methods", "project_dir"} <= set(props)
    assert PipelineConfig().methods is None
    assert set(select_stages(DEPS)) == set(DEPS)
