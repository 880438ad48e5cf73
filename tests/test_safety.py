"""House rules checked on the source: no pickle in product code (pipeline, stages, flows, benchmarks, scripts),
torch.load only with weights_only=True, pipeline/ free of orchestration imports (flows → stages → pipeline), no
DVC output tracked by git."""

import re
import subprocess

import pytest

from tests.tiny import ROOT

PRODUCT_DIRS = ("pipeline", "stages", "flows", "benchmarks", "scripts")
PRODUCT = [p for d in PRODUCT_DIRS for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".sh") and p.is_file()]

# Every way in to a pickle reader/writer: the modules (pickle and its wrappers joblib, dill, cloudpickle, shelve)
# imported in any form or called, pandas' read_pickle/to_pickle, numpy's allow_pickle, torch.save (a pickle).
_PICKLERS = r"(?:c?[Pp]ickle|_pickle|cloudpickle|dill|joblib|shelve)"
PICKLE = re.compile("|".join([
    rf"\b(?:import|from)\s+{_PICKLERS}\b",            # import pickle / from pickle import loads / python -c "…"
    rf"^\s*import\s+[\w\s,.]*\b{_PICKLERS}\b",         # import os, pickle
    rf"\b{_PICKLERS}\.\w+",                              # pickle.load(…), joblib.dump(…)
    r"\b(?:read|to)_pickle\s*\(",                        # pandas
    r"allow_pickle\s*=\s*True",
    r"\btorch\.save\s*\(",
]), re.M)


@pytest.mark.parametrize("line", [
    "import pickle", "from pickle import loads", "import os, pickle", "import cPickle as pickle",
    "obj = pickle.loads(blob)", "df = pandas.read_pickle(path)", "pd.read_pickle('x.pkl')", "frame.to_pickle(p)",
    "import joblib", "from joblib import load", "joblib.load(path)", "import dill", "dill.loads(b)",
    "from cloudpickle import dumps", "np.load(p, allow_pickle=True)", "torch.save(state, 'state.pt')",
    'python -c "import pickle; pickle.load(open(f, \'rb\'))"',
])
def test_pickle_scan_catches(line):
    assert PICKLE.search(line), line


@pytest.mark.parametrize("line", ["np.load(path, allow_pickle=False)", "arrays in npz (never pickled objects)",
                                  "save_file(tensors, path)", "torch.load(p, weights_only=True)"])
def test_pickle_scan_lets_safe_code_through(line):
    assert not PICKLE.search(line), line


def test_scan_covers_every_product_directory():
    scanned = {p.relative_to(ROOT).parts[0] for p in PRODUCT}
    assert scanned == set(PRODUCT_DIRS), scanned
    assert ROOT / "scripts" / "setup.sh" in PRODUCT


def test_no_pickle_in_product_code():
    hits = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in PRODUCT for m in PICKLE.finditer(p.read_text())]
    assert not hits, hits


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
    from dvc.repo import Repo

    # no silent skip: outside a git checkout the check has nothing to read, which is a failure, not a pass
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=ROOT, capture_output=True, text=True)
    assert top.returncode == 0 and top.stdout.strip() == str(ROOT), \
        f"{ROOT} is not a git checkout (git says: {top.stderr.strip() or top.stdout.strip()}); run the tests from one"
    tracked = subprocess.run(["git", "ls-files", "data"], cwd=ROOT, capture_output=True, text=True, check=True)
    tracked = [line for line in tracked.stdout.splitlines() if not line.endswith(".gitignore")]
    with Repo(str(ROOT)) as repo:
        outs = [out.def_path for stage in repo.index.stages for out in stage.outs]
    clash = [f for f in tracked for out in outs if f == out or f.startswith(out.rstrip("/") + "/")]
    assert not clash, f"DVC outputs tracked by git: {clash}"
