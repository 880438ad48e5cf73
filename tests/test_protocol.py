"""No selection on test data (docs/protocol.md): the test split reaches no fitting function, stages that read it do so
only after fitting, Diffusing DeBias's settings are chosen on the validation split, and `auto` knobs choose on
held-out fitting data."""

import ast
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.config import parse_params
from pipeline.errors import UserError
from pipeline.io import save_npz
from pipeline.methods.diffusing_debias import select_by_validation
from tests.tiny import ROOT, tiny_params

# Stages that may open the test split, each only to score what is already fitted (docs/protocol.md).
TEST_READERS = {"fid_reference", "train_classifiers", "train_bias_amplifier", "debias_classifier"}
MARK = {"train": 0, "judge": 100, "test": 255}  # pixel (0, 0, 0) of every image tells its split


def split_reads(path) -> set[str]:
    """The splits a module passes to load_split: the constant, or '?' for an expression (could be any)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "load_split":
            arg = node.args[1] if len(node.args) > 1 else next(k.value for k in node.keywords if k.arg == "split")
            out.add(arg.value if isinstance(arg, ast.Constant) else "?")
    return out


def test_only_scoring_stages_open_the_test_split():
    readers = {p.stem for p in (ROOT / "stages").glob("*.py") if split_reads(p) & {"test", "?"}}
    assert readers <= TEST_READERS, f"stages that may read the test split: {sorted(readers - TEST_READERS)}"
    for path in (ROOT / "pipeline").rglob("*.py"):  # the library takes arrays; stages decide what it sees
        assert "test" not in split_reads(path), path
    text = "\n".join(p.read_text() for d in ("pipeline", "stages") for p in (ROOT / d).rglob("*.py"))
    assert "test.npz" not in text  # nothing opens the file behind load_split's back


@pytest.fixture()
def prepared(tmp_path, monkeypatch):
    """A tiny prepared Coloured-MNIST-shaped dataset whose images carry their split in pixel (0, 0, 0)."""
    rng = np.random.default_rng(0)
    rows = []
    (tmp_path / "data" / "prepared").mkdir(parents=True)
    for split, n in (("train", 300), ("judge", 200), ("test", 200)):
        images = rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8)
        images[:, 0, 0, 0] = MARK[split]
        classes = rng.integers(0, 10, n)
        bias = np.where(rng.random(n) < (0.9 if split == "train" else 0.1), classes, rng.integers(0, 10, n))
        save_npz(tmp_path / "data" / "prepared" / f"{split}.npz", images=images)
        rows.append(pd.DataFrame({"split": split, "index": np.arange(n), "class": classes, "bias": bias,
                                  "aligned": bias == classes}))
    pd.concat(rows).to_parquet(tmp_path / "data" / "prepared" / "labels.parquet", index=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def watch(module, monkeypatch, fitting: tuple[str, ...]) -> list[tuple[str, str]]:
    """Record, in order, every split the stage loads ("load", split) and every fitting call ("fit", name), and fail a
    fitting call that receives a test image."""
    from pipeline.data import load_split

    events = []

    def loader(data_dir, split, **kw):
        events.append(("load", split))
        return load_split(data_dir, split, **kw)

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            for a in [*args, *kwargs.values()]:
                x = getattr(a, "images", a)  # a SyntheticImages set, or the flattened image tensor
                if hasattr(x, "shape") and len(x.shape) >= 2:
                    first = np.asarray(x.reshape(len(x), -1)[:, 0], dtype=float)
                    assert not np.any(np.isclose(first, MARK["test"]) | np.isclose(first, MARK["test"] / 255.0)), \
                        f"{name} received test images"
            events.append(("fit", name))
            return fn(*args, **kwargs)
        return wrapped

    @contextmanager
    def no_mlflow(*args, **kwargs):
        class Run:
            def metrics(self, *a, **k):
                pass

            def artifact(self, *a, **k):
                pass

        yield Run()

    monkeypatch.setattr(module, "load_split", loader)
    monkeypatch.setattr(module, "mlflow_run", no_mlflow)
    for name in fitting:
        monkeypatch.setattr(module, name, spy(name, getattr(module, name)))
    return events


def assert_scored_after_fitting(events):
    fits = [i for i, (kind, _) in enumerate(events) if kind == "fit"]
    late = [i for i, e in enumerate(events) if e in (("load", "test"), ("load", "judge"))]
    assert fits and late, events
    assert max(fits) < min(late), f"validation/test split read before fitting finished: {events}"


@pytest.mark.parametrize("method", ["erm", "lff", "recipe1", "recipe2"])
def test_debias_classifier_fits_without_test_and_reports_validation(prepared, monkeypatch, method):
    import stages.debias_classifier as stage
    from pipeline.io import load_json
    from pipeline.methods.diffusing_debias import MLP, save_classifier

    if method.startswith("recipe"):
        (prepared / "data" / "methods" / "ddb_amplifier").mkdir(parents=True)
        save_classifier(MLP(8 * 8 * 3, 10, hidden=8), prepared / "data/methods/ddb_amplifier/model.safetensors")
    events = watch(stage, monkeypatch, ("fit_classifier", "fit_groupdro", "fit_reweighted", "predict"))
    stage.main(["--method", method])
    assert_scored_after_fitting(events)
    metrics = load_json(prepared / "data" / "metrics" / f"debias_classifier_{method}.json")
    for key in ("unbiased_accuracy", "worst_group_accuracy"):
        assert 0 <= metrics[f"val_{key}"] <= 1 and 0 <= metrics[key] <= 1


def test_bias_amplifier_fits_without_test(prepared, monkeypatch):
    import stages.train_bias_amplifier as stage
    from pipeline.io import load_json

    events = watch(stage, monkeypatch, ("fit_classifier",))
    stage.main(["--source", "real"])
    assert_scored_after_fitting(events)
    summary = load_json(prepared / "data" / "methods" / "ddb_amplifier_real" / "summary.json")
    assert "val_conflicting_accuracy" in summary


def test_selection_reads_validation_only():
    """The chosen point maximises the mean validation metric even where the test metric disagrees."""
    rows = [{"bias_ratio": 0.99, "method": "recipe1", "point": p, "seed": s, "val_unbiased_accuracy": v,
             "unbiased_accuracy": t}
            for p, s, v, t in [("a", 0, 0.70, 0.90), ("a", 1, 0.72, 0.90), ("b", 0, 0.80, 0.50), ("b", 1, 0.60, 0.50),
                               ("c", 0, 0.75, 0.99), ("c", 1, 0.75, 0.99)]]
    assert select_by_validation(rows) == {(0.99, "recipe1"): "c"}
    with pytest.raises(ValueError, match="not a validation metric"):
        select_by_validation(rows, "unbiased_accuracy")


def test_auto_adp_needs_a_held_out_share():
    raw = tiny_params()
    raw["distguide"].update(adp="auto", holdout=0.0)
    with pytest.raises(UserError, match="distguide: adp 'auto'"):
        parse_params(raw)
    raw["distguide"]["adp"] = "linear"
    parse_params(raw)
