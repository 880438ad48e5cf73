"""No selection on test data (docs/protocol.md): the test split reaches no fitting function, stages that read it do so
only after fitting, Diffusing DeBias's settings are chosen on the validation split, and `auto` knobs choose on
held-out fitting data."""

import ast
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.config import parse_params
from pipeline.errors import UserError
from pipeline.io import save_npz
from pipeline.methods.diffusing_debias import check_budget, select_and_score, select_by_validation
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


class ValidationOnlyRow(dict):
    """A result row whose test metrics cannot be read: selection must decide without touching them."""

    ALLOWED = frozenset({"bias_ratio", "method", "point", "seed", "val_unbiased_accuracy"})

    def __getitem__(self, key):
        if key not in self.ALLOWED:
            raise AssertionError(f"selection read {key!r}")
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key not in self:
            return default
        return self[key]

    def items(self):
        raise AssertionError("selection iterated over every column")

    values = items


def _grid_rows(test_of, seeds=(0, 1, 2)):
    """Two methods × three points × seeds; point c has the best validation mean, point a the best test."""
    val = {"a": 0.70, "b": 0.60, "c": 0.80}
    return [{"bias_ratio": 0.99, "method": m, "point": p, "seed": s, "val_unbiased_accuracy": val[p] + 0.01 * s,
             "unbiased_accuracy": test_of(m, p, s), "worst_group_accuracy": test_of(m, p, s) / 2}
            for m in ("erm", "recipe2") for p in "abc" for s in seeds]


def test_selection_never_reads_test_metrics():
    """The choice is the validation argmax, unchanged whatever the test metrics are (here: random, then set to
    favour another point), and the selection touches no test column at all."""
    g = np.random.default_rng(0)
    base = _grid_rows(lambda m, p, s: 0.5)
    reported, chosen = select_and_score(base)
    assert chosen == {(0.99, "erm"): "c", (0.99, "recipe2"): "c"}
    assert {(r["method"], r["point"], r["seed"]) for r in reported} == {(m, "c", s) for m in ("erm", "recipe2")
                                                                          for s in (0, 1, 2)}
    for test_of in (lambda m, p, s: float(g.random()), lambda m, p, s: 0.99 if p == "a" else 0.1):
        assert select_and_score(_grid_rows(test_of))[1] == chosen
    guarded = [ValidationOnlyRow(r) for r in base]
    assert select_by_validation(guarded) == chosen
    assert [r["point"] for r in select_and_score(guarded)[0]] == ["c"] * 6
    # the reported test figures are the chosen point's, not the best test point's
    rows = _grid_rows(lambda m, p, s: {"a": 0.9, "b": 0.1, "c": 0.4}[p])
    assert {r["unbiased_accuracy"] for r in select_and_score(rows)[0]} == {0.4}


def test_selection_refuses_a_chosen_point_missing_seeds():
    rows = [r for r in _grid_rows(lambda m, p, s: 0.5) if not (r["point"] == "c" and r["seed"] == 2)]
    with pytest.raises(UserError, match="lacks seeds"):
        select_and_score(rows)


def test_every_method_gets_the_same_selection_budget():
    """The table's default budget gives every row (ERM and LfF included) the same number of points; an unequal
    budget or a repeated point is refused before anything runs."""
    import benchmarks.ddb_table as table

    points = {m: table.grid_points(spec) for m, spec in table.BUDGET.items()}
    assert set(points) == set(table.VARIANTS) and {"erm", "lff"} <= set(points)
    assert check_budget(points) >= 2
    assert len({len(v) for v in points.values()}) == 1
    with pytest.raises(UserError, match="different numbers of points"):
        check_budget({**points, "erm": points["erm"][:1]})
    with pytest.raises(UserError, match="twice"):
        check_budget({m: [{"ddb.lr": 1e-3}, {"ddb.lr": 1e-3}] for m in points})
    with pytest.raises(SystemExit, match="may not vary"):
        table.grid_points({"ddb.guidance_scale": [1.0, 3.0]})  # upstream of the classifiers: not per point


def test_welch_difference_by_hand():
    """The table's comparisons: d ± t_{0.975, ν} · √(s_a²/n_a + s_b²/n_b) with the Welch–Satterthwaite ν, by hand."""
    from scipy.stats import t

    import benchmarks.ddb_table as table

    a, b = np.array([0.80, 0.84, 0.86]), np.array([0.70, 0.71, 0.75, 0.74])
    va, vb = a.var(ddof=1) / 3, b.var(ddof=1) / 4
    nu = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)
    half = t.ppf(0.975, nu) * np.sqrt(va + vb)
    d, lo, hi = table.welch_difference(a, b)
    assert d == pytest.approx(a.mean() - b.mean()) and (lo, hi) == pytest.approx((d - half, d + half))
    assert np.isnan(table.welch_difference(a, b[:1])[1])


def test_comparisons_read_the_chosen_rows_with_the_margin():
    """row − (against + margin) per ρ over the chosen per-seed rows; 'above'/'below' only when the interval excludes
    0; a comparison whose rows are missing is left out."""
    import benchmarks.ddb_table as table

    def rows(method, values, rho=0.99):
        return [{"bias_ratio": rho, "method": method, "seed": s, "unbiased_accuracy": v} for s, v in enumerate(values)]

    got = table.comparisons(rows("erm", [0.60, 0.61, 0.62]) + rows("lff", [0.80, 0.81, 0.79])
                            + rows("recipe2", [0.84, 0.76, 0.83]) + rows("recipe1", [0.70, 0.71, 0.70]))
    read = {(c["row"], c["against"]): c for c in got}
    assert set(read) == {("recipe1", "lff"), ("recipe2", "lff"), ("recipe1", "erm"), ("recipe2", "erm")}
    assert read["recipe1", "erm"]["difference"] == pytest.approx(0.70333 - 0.61 - 0.15, abs=1e-4)
    assert read["recipe1", "erm"]["reading"] == "below" and read["recipe1", "lff"]["reading"] == "below"
    assert read["recipe2", "lff"]["reading"] == "inside the noise"
    assert read["recipe2", "lff"]["ci95_low"] < 0 < read["recipe2", "lff"]["ci95_high"]


def test_merged_tables_take_each_files_chosen_rows_and_a_later_file_wins(tmp_path):
    """--merge: the union of already chosen rows; nothing re-selected; a later file's (ρ, method) replaces."""
    import json

    import benchmarks.ddb_table as table

    def result(path, method, chosen, values):
        rows = [{"bias_ratio": 0.99, "method": method, "seed": s, "point": p, "unbiased_accuracy": v + (p == "b")}
                for p in ("a", "b") for s, v in enumerate(values)]
        path.write_text(json.dumps({"chosen": {f"0.99|{method}": chosen}, "rows": rows}))
        return path

    first = result(tmp_path / "first.json", "recipe2", "a", [0.5, 0.6])
    second = result(tmp_path / "second.json", "recipe2", "b", [0.1, 0.2])
    other = result(tmp_path / "other.json", "lff", "a", [0.7, 0.8])
    rows, chosen, source = table.merge_results([first, other, second])
    assert chosen == {(0.99, "recipe2"): "b", (0.99, "lff"): "a"}
    assert source == {(0.99, "recipe2"): "second.json", (0.99, "lff"): "other.json"}
    assert sorted(r["unbiased_accuracy"] for r in rows if r["method"] == "recipe2") == [1.1, 1.2]
    assert sorted(r["unbiased_accuracy"] for r in rows if r["method"] == "lff") == [0.7, 0.8]
    (tmp_path / "summary.json").write_text(json.dumps({"summary": []}))
    for bad in (tmp_path / "missing.json", tmp_path / "summary.json"):
        with pytest.raises(SystemExit) as exit_:
            table.merge_results([first, bad])
        assert exit_.value.code == 2


def test_auto_adp_needs_a_held_out_share():
    raw = tiny_params()
    raw["distguide"].update(adp="auto", holdout=0.0)
    with pytest.raises(UserError, match="distguide: adp 'auto'"):
        parse_params(raw)
    raw["distguide"]["adp"] = "linear"
    parse_params(raw)


def per_rho_stages_done(data: Path, rho: float = 0.99) -> None:
    """Mark a ρ work directory's per-ρ stages (prepare_data, the judges, the diffusion model) finished under the
    params benchmarks/ddb_table.py will write there (no profile, no overrides)."""
    import json

    import benchmarks.ddb_table as table

    w = data.parent
    table.set_params(w, rho, 0, {})
    for stage in table.PER_RHO:
        table.per_rho_done(w, stage).write_text(json.dumps(table.per_rho_stamp(w, stage)))


def test_the_per_rho_stages_resume_where_they_stopped_and_rerun_for_their_own_params(tmp_path, monkeypatch):
    """benchmarks/ddb_table.py runs prepare_data → train_classifiers → train_diffusion once per ρ: a stage finished
    under the same params is skipped, a killed one (no done file) runs again with every stage after it, and a
    `--set` of a section one of them reads re-runs it and what follows, not what comes before."""
    import benchmarks.ddb_table as table

    w = tmp_path / "rho_0.98"
    (w / "data").mkdir(parents=True)
    ran = []
    monkeypatch.setattr(table, "run", lambda w, args, timings, label, threads=None: ran.append(label))

    def per_rho(**overrides):
        ran.clear()
        table.set_params(w, 0.98, 0, overrides)
        table.run_per_rho(w, {})
        return list(ran)

    assert per_rho() == list(table.PER_RHO)
    assert per_rho() == []
    assert per_rho(**{"ddb.epochs": 3}) == []  # a per-seed section: the per-ρ outputs stand
    table.per_rho_done(w, "train_diffusion").unlink()  # killed while training the diffusion model
    assert per_rho() == ["train_diffusion"]
    assert per_rho(**{"classifiers.epochs": 1}) == ["train_classifiers", "train_diffusion"]
    assert per_rho(**{"classifiers.epochs": 1}) == []
    assert per_rho(**{"data.n_train": 100}) == list(table.PER_RHO)  # ρ itself is data.bias_ratio
    ran.clear()
    table.set_params(w, 0.95, 0, {"data.n_train": 100})  # another ρ in the same directory
    table.run_per_rho(w, {})
    assert ran == list(table.PER_RHO)


def test_table_rows_carry_only_their_own_seeds_amplifier_figures(tmp_path, monkeypatch):
    """benchmarks/ddb_table.py: a row records the amplifier figures of the stages run for its seed, never a metrics
    file an earlier seed (or a copied work directory) left behind."""
    import json
    import sys

    import benchmarks.ddb_table as table

    metrics = tmp_path / "rho_0.99" / "data" / "metrics"
    metrics.mkdir(parents=True)
    per_rho_stages_done(metrics.parent)
    (metrics / "train_bias_amplifier_real.json").write_text(json.dumps({"test_conflicting_accuracy": 0.9}))

    def fake_run(w, args, timings, label, threads=None):  # each stage writes what the real one would, marked values
        timings[label] = {"wall_s": 0.0, "cpu_s": 0.0}
        out = w / "data" / "metrics"
        if args[0] == "stages.sample_bias_aligned":
            (out / "sample_bias_aligned.json").write_text(json.dumps({"aligned_fraction": 0.99}))
        elif args[0] == "stages.train_bias_amplifier":
            name = "train_bias_amplifier" + ("_real" if args[-1] == "real" else "")
            (out / f"{name}.json").write_text(json.dumps({"test_conflicting_accuracy": 0.2}))
        else:
            keys = ("unbiased_accuracy", "worst_group_accuracy", "conflicting_accuracy", "aligned_accuracy")
            (out / f"debias_classifier_{args[-1]}.json").write_text(json.dumps(
                {k: 0.5 for k in (*keys, *(f"val_{k}" for k in keys))}))

    monkeypatch.setattr(table, "run", fake_run)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setattr(sys, "argv", ["ddb_table.py", "--ratios", "0.99", "--seeds", "1", "--methods", "erm",
                                      "recipe1", "--workdir", str(tmp_path), "--out", str(tmp_path / "table")])
    table.main()
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 4  # 2 methods × 2 points
    assert all(r["train_bias_amplifier.test_conflicting_accuracy"] == 0.2 for r in rows)
    assert not any("train_bias_amplifier_real.test_conflicting_accuracy" in r for r in rows)  # not run this seed


def test_a_point_that_sets_an_amplifier_key_gets_its_own_amplifier(tmp_path, monkeypatch):
    """benchmarks/ddb_table.py: a point that sets ddb.amplifier_* retrains the amplifier its row reads with those
    settings before its classifier runs (so validation chooses the amplifier too); rows without them use the
    seed's amplifier at the base settings, retrained if a point changed it."""
    import json
    import sys

    import yaml

    import benchmarks.ddb_table as table

    metrics = tmp_path / "rho_0.99" / "data" / "metrics"
    metrics.mkdir(parents=True)
    per_rho_stages_done(metrics.parent)
    calls = []

    def fake_run(w, args, timings, label, threads=None):
        timings[label] = {"wall_s": 0.0, "cpu_s": 0.0}
        ddb = yaml.safe_load((w / "params.yaml").read_text())["ddb"]
        calls.append((args[0], args[-1], ddb["amplifier_epochs"]))
        out = w / "data" / "metrics"
        if args[0] == "stages.train_bias_amplifier":
            name = "train_bias_amplifier" + ("_real" if args[-1] == "real" else "")
            (out / f"{name}.json").write_text(json.dumps({"test_conflicting_accuracy": ddb["amplifier_epochs"] / 1000}))
        elif args[0] == "stages.debias_classifier":
            keys = ("unbiased_accuracy", "worst_group_accuracy", "conflicting_accuracy", "aligned_accuracy")
            (out / f"debias_classifier_{args[-1]}.json").write_text(json.dumps(
                {k: 0.5 for k in (*keys, *(f"val_{k}" for k in keys))}))

    budget = tmp_path / "budget.yaml"
    budget.write_text(yaml.safe_dump({"recipe1": {"ddb.amplifier_epochs": [5, 50]},
                                      "recipe2": {"ddb.weight_decay": [0.0, 0.003]}}))
    monkeypatch.setattr(table, "run", fake_run)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setattr(sys, "argv", ["ddb_table.py", "--ratios", "0.99", "--seeds", "0", "--methods", "recipe1",
                                      "recipe2", "--budget", str(budget), "--workdir", str(tmp_path),
                                      "--out", str(tmp_path / "table")])
    table.main()
    base = yaml.safe_load((table.ROOT / "params.yaml").read_text())["ddb"]["amplifier_epochs"]
    amp = [(c[1], c[2]) for c in calls if c[0] == "stages.train_bias_amplifier"]
    assert amp == [("synthetic", base), ("synthetic", 5), ("synthetic", 50), ("synthetic", base)]
    runs = [c for c in calls if c[0] != "stages.sample_bias_aligned"]
    # each classifier runs right after the amplifier of its settings
    assert [c[2] for c in runs if c[0] == "stages.debias_classifier"] == [5, 50, base, base]
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["train_bias_amplifier.test_conflicting_accuracy"] for r in rows] == [0.005, 0.05, base / 1000,
                                                                                   base / 1000]


def test_side_by_side_seeds_each_run_in_a_work_directory_of_their_own(tmp_path, monkeypatch):
    """benchmarks/ddb_table.py --jobs 2: each seed's stages run in <workdir>/rho_<ρ>_seed_<s> (its own params.yaml
    and data/, the per-ρ stages' outputs linked) at one thread, and every row carries its own seed's figures."""
    import json
    import sys
    import threading

    import yaml

    import benchmarks.ddb_table as table

    rho_dir = tmp_path / "rho_0.99"
    (rho_dir / "data" / "metrics").mkdir(parents=True)
    per_rho_stages_done(rho_dir / "data")
    for rel in table.SHARED:
        (rho_dir / rel).mkdir(parents=True)
    calls, both_started, lock = [], threading.Barrier(2, timeout=10), threading.Lock()

    def fake_run(w, args, timings, label, threads=None):
        seed = yaml.safe_load((w / "params.yaml").read_text())["ddb"]["seed"]
        if args[0] == "stages.sample_bias_aligned":
            both_started.wait()  # the two seeds really are in flight together
        with lock:
            calls.append((w.name, seed, args[0], threads))
            timings[label] = {"wall_s": 0.0, "cpu_s": 0.0}
        out = w / "data" / "metrics"
        if args[0] == "stages.train_bias_amplifier":
            (out / "train_bias_amplifier.json").write_text(json.dumps({"test_conflicting_accuracy": seed / 10}))
        elif args[0] == "stages.debias_classifier":
            keys = ("unbiased_accuracy", "worst_group_accuracy", "conflicting_accuracy", "aligned_accuracy")
            (out / f"debias_classifier_{args[-1]}.json").write_text(json.dumps(
                {k: 0.5 + seed / 10 for k in (*keys, *(f"val_{k}" for k in keys))}))

    monkeypatch.setattr(table, "run", fake_run)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setattr(sys, "argv", ["ddb_table.py", "--ratios", "0.99", "--seeds", "1", "2", "--methods", "erm",
                                      "recipe1", "--jobs", "2", "--workdir", str(tmp_path),
                                      "--out", str(tmp_path / "table")])
    table.main()
    assert {(name, seed) for name, seed, _, _ in calls} == {("rho_0.99_seed_1", 1), ("rho_0.99_seed_2", 2)}
    assert {threads for *_, threads in calls} == {1}
    for seed in (1, 2):
        for rel in table.SHARED:
            assert (tmp_path / f"rho_0.99_seed_{seed}" / rel).resolve() == (rho_dir / rel).resolve()
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 8  # 2 seeds × 2 methods × 2 points
    for r in rows:
        assert r["unbiased_accuracy"] == 0.5 + r["seed"] / 10
        if r["method"] == "recipe1":
            assert r["train_bias_amplifier.test_conflicting_accuracy"] == r["seed"] / 10
    timings = json.loads((tmp_path / "timings.json").read_text())["0.99"]
    assert sum(label.startswith("debias_classifier") for label in timings) == 8


def test_a_stages_cpu_time_is_its_own_while_another_runs_beside_it(tmp_path):
    """benchmarks/ddb_table.run: the CPU seconds recorded for a stage are its own process's (os.wait4), not those of
    another stage that ended meanwhile (`--jobs`)."""
    import threading

    import benchmarks.ddb_table as table

    timings = {}
    waiter = threading.Thread(target=table.run, args=(  # idles until the busy stage below has ended
        tmp_path, ["timeit", "-n", "1", "-r", "1", "-s", "import os, time",
                   "while not os.path.exists('busy_done'): time.sleep(0.05)"], timings, "waiter"))
    waiter.start()
    table.run(tmp_path, ["timeit", "-n", "1", "-r", "1", "sum(range(3 * 10**7))"], timings, "busy")
    (tmp_path / "busy_done").touch()
    waiter.join(timeout=60)
    assert timings["busy"]["cpu_s"] > 0.3
    assert timings["waiter"]["cpu_s"] < 0.5 * timings["busy"]["cpu_s"]


def test_amplifier_size_diagnostic_trains_the_stages_amplifier_on_each_subset(prepared, monkeypatch):
    """benchmarks/method_diagnostics.py amplifier-size: at the synthetic set's full size its amplifier is the
    stage's (the same validation accuracies as its summary.json); a smaller size trains on the first n of every
    class; a size beyond the set is refused."""
    import stages.train_bias_amplifier as stage
    from benchmarks.method_diagnostics import amplifier_size
    from pipeline.io import load_json

    rng = np.random.default_rng(1)
    (prepared / "data" / "methods" / "ddb_synthetic").mkdir(parents=True)
    save_npz(prepared / "data" / "methods" / "ddb_synthetic" / "images.npz",
             images=rng.integers(0, 255, (60, 8, 8, 3), dtype=np.uint8), classes=np.repeat(np.arange(10), 6),
             guidance_scale=np.float64(1.0), origin=np.array("synthetic"))
    watch(stage, monkeypatch, ("fit_classifier",))
    stage.main(["--source", "synthetic"])
    summary = load_json(prepared / "data" / "methods" / "ddb_amplifier" / "summary.json")
    out = amplifier_size(prepared / "data", prepared / "params.yaml", [2, 6])
    small, whole = out["rows"]
    assert (small["per_class"], whole["per_class"], out["synthetic_per_class"]) == (2, 6, 6)
    assert whole["val_aligned_accuracy"] == summary["val_aligned_accuracy"]
    assert whole["val_conflicting_accuracy"] == summary["val_conflicting_accuracy"]
    for row in out["rows"]:
        assert row["wrong"] == row["wrong_conflicting"] + row["wrong_aligned"] and 0 <= row["precision"] <= 1
    with pytest.raises(SystemExit, match="images per class"):
        amplifier_size(prepared / "data", prepared / "params.yaml", [7])


def test_a_seeds_synthetic_set_is_reused_only_for_the_same_model_and_sampling_params(tmp_path, monkeypatch):
    """benchmarks/ddb_table.py: sample_bias_aligned runs again only when the diffusion model's files or a sampling
    param changed (`sampling_stamp`); a row made under other `--set` overrides is not taken for this run's."""
    import json
    import sys

    import benchmarks.ddb_table as table

    rho_dir = tmp_path / "rho_0.99"
    (rho_dir / "data" / "metrics").mkdir(parents=True)
    per_rho_stages_done(rho_dir / "data")
    weights = rho_dir / "data" / "models" / "diffusion" / "unet" / "w.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"model one")
    calls = []

    def fake_run(w, args, timings, label, threads=None):
        timings[label] = {"wall_s": 0.0, "cpu_s": 0.0}
        calls.append(args[0])
        if args[0] == "stages.sample_bias_aligned":
            (w / table.SYNTHETIC).parent.mkdir(parents=True, exist_ok=True)
            (w / table.SYNTHETIC).write_bytes(b"images")
        elif args[0] == "stages.debias_classifier":
            keys = ("unbiased_accuracy", "worst_group_accuracy", "conflicting_accuracy", "aligned_accuracy")
            (w / "data" / "metrics" / f"debias_classifier_{args[-1]}.json").write_text(json.dumps(
                {k: 0.5 for k in (*keys, *(f"val_{k}" for k in keys))}))

    monkeypatch.setattr(table, "run", fake_run)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")

    def table_run(*extra):
        calls.clear()
        monkeypatch.setattr(sys, "argv", ["ddb_table.py", "--ratios", "0.99", "--seeds", "0", "--methods", "recipe1",
                                          "--workdir", str(tmp_path), "--out", str(tmp_path / "table"), *extra])
        table.main()
        return calls.count("stages.sample_bias_aligned"), calls.count("stages.debias_classifier")

    assert table_run() == (1, 2)
    assert table_run() == (0, 0)  # every row there already
    assert table_run("--set", "ddb.amplifier_shift=2") == (0, 2)  # new rows (other overrides), the same images
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["set"] for r in rows] == ["(params)"] * 2 + ["ddb.amplifier_shift=2"] * 2
    assert "with ddb.amplifier_shift=2 on every row" in (tmp_path / "table.md").read_text()
    assert table_run("--set", "ddb.num_per_class=7") == (1, 2)  # a sampling param changed
    weights.write_bytes(b"model two")
    assert table_run("--set", "ddb.amplifier_epochs=3") == (1, 2)  # the model changed
