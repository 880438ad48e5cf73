"""Every shipped params profile (params*.yaml) validates with pipeline/config.py, spells out every knob, and holds
every params key dvc.yaml declares (DVC stops a stage with "missing parameters" otherwise, typed defaults or not)."""

from functools import cache

import pytest
import yaml

from pipeline.config import Params, load_params
from tests.tiny import ROOT

PROFILES = sorted(p.name for p in ROOT.glob("params*.yaml"))


@cache
def declared_params() -> dict[str, set[str]]:
    """{dotted params key: the dvc.yaml stages declaring it}, foreach items expanded by DVC itself."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    declared: dict[str, set[str]] = {}
    with Repo(str(ROOT)) as repo:
        for stage in repo.index.stages:
            for dep in stage.deps:
                if isinstance(dep, ParamsDependency):
                    for key in dep.params:
                        declared.setdefault(key, set()).add(stage.addressing)
    return declared


def has_key(raw: dict, dotted: str) -> bool:
    node = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def spelled_out(raw: dict, model=Params, prefix: str = "") -> list[str]:
    """The typed config's keys (sections recursed) that `raw` does not write down."""
    missing = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        if name not in raw:
            missing.append(key)
        elif isinstance(field.annotation, type) and issubclass(field.annotation, Params.__base__):
            missing += spelled_out(raw[name] or {}, field.annotation, key + ".")
    return missing


def test_every_profile_is_found():
    assert {"params.yaml", "params_gpu.yaml"} <= set(PROFILES)
    assert "invdiff.steps" in declared_params()  # dotted keys are read too


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_validates(profile):
    load_params(ROOT / profile)


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_holds_every_dvc_param(profile):
    raw = yaml.safe_load((ROOT / profile).read_text())
    missing = {key: sorted(stages) for key, stages in declared_params().items() if not has_key(raw, key)}
    assert not missing, f"{profile} lacks params that dvc.yaml declares (key: stages): {missing}"


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_spells_out_every_knob(profile):
    """A profile that leaves a knob to pipeline/config.py's default silently takes the CPU profile's value."""
    missing = spelled_out(yaml.safe_load((ROOT / profile).read_text()))
    assert not missing, f"{profile} does not write down: {missing}"
