"""House rules checked on the source: no pickle in product code, torch.load only with weights_only=True,
pipeline/ free of orchestration imports (flows → stages → pipeline), no DVC output tracked by git."""

import re

from tests.tiny import ROOT

PRODUCT = [p for d in ("pipeline", "stages", "flows", "benchmarks") for p in (ROOT / d).rglob("*.py")]


def test_no_pickle_in_product_code():
    for path in PRODUCT:
        text = path.read_text()
        assert not re.search(r"\bimport pickle\b|\bpickle\.|allow_pickle=True|\bcloudpickle\b", text), path


def test_torch_load_only_with_weights_only():
    for path in PRODUCT:
        for call in re.findall(r"torch\.load\([^)]*\)", path.read_text()):
            assert "weights_only=True" in call, f"{path}: {call}"


def test_pipeline_imports_no_orchestration():
    for path in (ROOT / "pipeline").rglob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+(prefect|mlflow|dvc)\b", path.read_text(), re.M), path


def test_stages_never_import_each_other():
    for path in (ROOT / "stages").glob("*.py"):
        for mod in re.findall(r"^\s*from\s+stages\.(\w+)\s+import", path.read_text(), re.M):
            assert mod == "common", f"{path} imports stages.{mod}"


def test_no_dvc_output_is_tracked_by_git():
    """A stage output committed to git makes a fresh clone's `dvc repro` stop at that stage ("already tracked by
    SCM"); only the .gitignore files DVC writes may live under the outputs' folders."""
    import subprocess

    import pytest
    from dvc.repo import Repo

    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "data"], cwd=ROOT, capture_output=True, text=True, check=True)
    tracked = [line for line in tracked.stdout.splitlines() if not line.endswith(".gitignore")]
    with Repo(str(ROOT)) as repo:
        outs = [out.def_path for stage in repo.index.stages for out in stage.outs]
    clash = [f for f in tracked for out in outs if f == out or f.startswith(out.rstrip("/") + "/")]
    assert not clash, f"DVC outputs tracked by git: {clash}"
