"""The shipped params: params.yaml (the CPU profile, every knob) and each params_<name>.yaml, which holds only the
keys it changes (docs/profiles.md). Every profile, merged onto params.yaml by pipeline/config.py's override path,
validates, spells out every knob, and holds every params key dvc.yaml declares (DVC stops a stage with "missing
parameters" otherwise, typed defaults or not); `python -m pipeline.config apply` writes exactly that merge."""

from functools import cache

import pytest
import yaml

from pipeline.config import (
    Params,
    UserError,
    apply_profile,
    main,
    merge_profile,
    override_keys,
    parse_params,
    read_params,
)
from tests.tiny import ROOT

PROFILES = sorted(p.name for p in ROOT.glob("params_*.yaml"))
ALL = ["params.yaml", *PROFILES]


def merged(name: str) -> dict:
    """The params a profile runs with: params.yaml itself, or the profile applied to it."""
    return read_params(ROOT / name) if name == "params.yaml" else merge_profile(ROOT / name, ROOT / "params.yaml")


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
    assert {"params_gpu.yaml", "params_celeba.yaml", "params_fairface.yaml", "params_waterbirds.yaml"} <= set(PROFILES)
    assert "invdiff.steps" in declared_params()  # dotted keys are read too


@pytest.mark.parametrize("profile", ALL)
def test_profile_validates(profile):
    parse_params(merged(profile), profile)


@pytest.mark.parametrize("profile", ALL)
def test_profile_holds_every_dvc_param(profile):
    raw = merged(profile)
    missing = {key: sorted(stages) for key, stages in declared_params().items() if not has_key(raw, key)}
    assert not missing, f"{profile} lacks params that dvc.yaml declares (key: stages): {missing}"


@pytest.mark.parametrize("profile", ALL)
def test_profile_spells_out_every_knob(profile):
    """A knob left to pipeline/config.py's default is a knob the user cannot see in params.yaml."""
    missing = spelled_out(merged(profile))
    assert not missing, f"{profile} does not write down: {missing}"


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_holds_only_what_it_changes(profile):
    """Each key of a profile exists in params.yaml and has another value there (a copy of a base value would go
    stale when the base changes: how params_gpu.yaml once lost its invdiff section)."""
    base = override_keys(read_params(ROOT / "params.yaml"))
    keys = override_keys(read_params(ROOT / profile))
    assert keys, f"{profile} changes nothing"
    unknown = sorted(set(keys) - set(base))
    assert not unknown, f"{profile}: keys params.yaml does not have: {unknown}"
    same = sorted(k for k, v in keys.items() if base[k] == v)
    assert not same, f"{profile}: keys with params.yaml's own value: {same}"


@pytest.mark.parametrize("profile", PROFILES)
def test_apply_writes_the_merge_and_refuses_a_second_profile(profile, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    (tmp_path / profile).write_text((ROOT / profile).read_text())
    main(["apply", str(tmp_path / profile), "--params", str(params)])
    assert yaml.safe_load(params.read_text()) == merged(profile)
    text = params.read_text()
    assert text.startswith(f"# profile: {profile} ") and "# every knob" not in text.lower().split("\n")[0]
    assert text.count("#") > 100  # params.yaml's comments are kept
    with pytest.raises(SystemExit) as exc:
        main(["apply", str(tmp_path / profile), "--params", str(params)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"profile {profile} is applied already" in err


def test_bad_profile_key_is_one_line_naming_the_profile_and_key(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    before = params.read_bytes()
    for text, needle in (("data:\n  resolutoin: 32\n", "data.resolutoin: unknown key"),
                         ("sample:\n  num_per_class: -1\n", "sample.num_per_class"),
                         ("seed:\n  x: 1\n", "override seed.x: seed is not a section")):
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(UserError, match="bad.yaml") as exc:
            apply_profile(tmp_path / "bad.yaml", params)
        assert needle in str(exc.value) and "\n" not in str(exc.value)
        assert params.read_bytes() == before  # nothing half-written
