"""The whole DAG on tiny params, built once per session through the Prefect flow (tests/conftest.py `tiny_dag`):
`dvc repro` then has nothing to do, a forced `dvc repro` of the core chain rebuilds the same bytes, and the
report's, sweeps' and trainers' numbers are checked against values computed here."""

import json
import math
import re
import shutil

import numpy as np
import pytest
import yaml

from tests.dag import _env, copy_project, dvc, make_project  # noqa: F401  (other test modules import these here)

INVDIFF = ("invdiff", "invdiff_lambda0", "invdiff_oracle")
DDB = ("erm", "lff", "recipe1", "recipe2", "recipe1_real", "recipe2_real")
CORE = ("prepare_data", "train_classifiers", "train_diffusion", "fid_reference", "sample@baseline", "score@baseline")


def _lock(text: str) -> dict:
    return yaml.safe_load(text)["stages"]


def test_the_flow_runs_every_stage_and_dvc_repro_then_has_nothing_to_do(tiny_dag):
    first, second = tiny_dag.first, tiny_dag.second
    assert set(first.values()) == {"ran"}
    assert set(second.values()) == {"up to date"}  # a second flow run skips every stage
    assert next(iter(first)) == "prepare_data" and list(first)[-1] == "report"
    assert set(first) == set(_lock(tiny_dag.lock))  # every stage of dvc.yaml, recorded as `dvc repro` would
    proc = dvc(tiny_dag.path, "repro")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Running stage" not in proc.stdout
    assert "up to date" in proc.stdout.lower()
    assert (tiny_dag.path / "dvc.lock").read_text() == tiny_dag.lock


def test_every_output_is_built(tiny_dag):
    tmp = tiny_dag.path
    for path in ["data/prepared/train.npz", "data/prepared/labels.parquet", "data/judges/colour.safetensors",
                 "data/judges/digit.safetensors", "data/models/diffusion/unet/diffusion_pytorch_model.safetensors",
                 "data/samples/baseline/images.npz", "data/samples/baseline/samples.parquet",
                 "data/reference/indomain.npz", "data/scores/baseline/per_class.parquet", "data/report/report.md",
                 "data/report/samples_baseline.png", "data/report/bias_vs_fid.png",
                 "data/methods/latentdir/directions.npz", "data/samples/latentdir/images.npz",
                 "data/scores/latentdir/metrics.json", "data/sweeps/latentdir.json",
                 "data/report/samples_latentdir.png", "data/methods/invdiff_groups/groups.npz",
                 "data/methods/invdiff_groups/discovery.png", "data/metrics/fit_grouper.json",
                 *(f"data/methods/{v}/delta/diffusion_pytorch_model.safetensors" for v in INVDIFF),
                 *(f"data/scores/{v}/metrics.json" for v in INVDIFF), *(f"data/sweeps/{v}.json" for v in INVDIFF),
                 "data/report/invdiff_discovery.png", "data/methods/distguide/adp.safetensors",
                 "data/scores/distguide/metrics.json", "data/sweeps/distguide.json",
                 "data/report/samples_distguide.png", "data/report/distguide_adp_accuracy.png",
                 "data/methods/ddb_synthetic/images.npz", "data/methods/ddb_amplifier/model.safetensors",
                 "data/methods/ddb_amplifier_real/model.safetensors", "data/report/ddb_synthetic.png",
                 *(f"data/methods/ddb_{m}/model.safetensors" for m in DDB),
                 *(f"data/metrics/debias_classifier_{m}.json" for m in DDB)]:
        assert (tmp / path).is_file(), path
    metrics = json.loads((tmp / "data/scores/baseline/metrics.json").read_text())
    for key in ["bias_score", "bias_score_normalised", "fd", "aligned_fraction", "fidelity", "fid_indomain",
                "precision", "recall"]:
        assert isinstance(metrics[key], float), key
    assert metrics["num_samples"] == 20
    report = (tmp / "data/report/report.md").read_text()
    assert "| baseline |" in report and "samples_baseline.png" in report and "mlflow ui" in report
    assert "| latentdir |" in report and "### Sweeps" in report
    assert "| invdiff |" in report and "| invdiff_oracle (ablation: true groups, uses bias labels) |" in report
    assert "Bias discovery" in report
    assert "| distguide |" in report and "distguide_adp_accuracy.png" in report
    assert "## Diffusing DeBias" in report and "| recipe1_real (ablation: amplifier trained on real data) |" in report
    shown = dvc(tmp, "metrics", "show", "--json")
    assert shown.returncode == 0 and "bias_score" in shown.stdout


# ------------------------------------------------------------------------------------------------ values

NUMBER = r"(-?\d+(?:\.\d+)?|nan|-?inf)"
CELL = re.compile(rf"^{NUMBER}(?: \[{NUMBER}, {NUMBER}\])?(?: ≈)?$")


def _tables(md: str, first_heading: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table of the page whose second column is headed `first_heading`: (headings, rows)."""
    lines, found = md.splitlines(), []
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| method |") and cells[1] == first_heading:
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip().strip("|").split("|")])
            found.append((cells, rows))
    return found


def _close(shown: str, value) -> bool:
    """A number as the report prints it (3 decimals) against the stored one."""
    x = float(shown)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.isnan(x)
    return abs(x - value) <= 5e-4 + 1e-9


def _check_row(cells: list[str], headings: list[str], metrics: dict, where: str) -> int:
    """Each cell 'value [lo, hi]' equals metrics[key] and metrics[key_ci95]; returns how many cells matched."""
    from pipeline.report import COLUMNS

    key_of = {h: k for k, h in COLUMNS}
    checked = 0
    for heading, text in zip(headings, cells, strict=True):
        key = key_of.get(heading)
        if key is None or key not in metrics:
            continue
        m = CELL.match(text)
        assert m, f"{where} {key}: cell {text!r}"
        assert _close(m[1], metrics[key]), f"{where} {key}: report {m[1]}, metrics.json {metrics[key]}"
        if f"{key}_ci95" in metrics:
            lo, hi = metrics[f"{key}_ci95"]
            assert m[2] is not None, f"{where} {key}: no interval in {text!r}"
            assert _close(m[2], lo) and _close(m[3], hi), f"{where} {key}_ci95: {text!r} vs [{lo}, {hi}]"
        checked += 1
    return checked


def test_the_reports_numbers_are_the_stored_metrics(tiny_dag):
    """Every number of the methods table equals data/scores/<method>/metrics.json (value and 95% interval), every
    sweep row its data/sweeps/<method>.json row, every Diffusing DeBias row its debias_classifier metrics."""
    tmp = tiny_dag.path
    md = (tmp / "data/report/report.md").read_text()
    (methods_headings, methods_rows), = _tables(md, "normalised bias ↓")
    seen = []
    for cells in methods_rows:
        method = cells[0].split(" (")[0]
        if method.startswith("*"):  # the training data's own row (checked by the reference stage's tests)
            continue
        metrics = json.loads((tmp / f"data/scores/{method}/metrics.json").read_text())
        assert _check_row(cells[1:], methods_headings[1:], metrics, method) >= 10, method
        seen.append(method)
    assert seen == ["baseline", "distguide", "invdiff", "invdiff_lambda0", "invdiff_oracle", "latentdir"]

    (sweep_headings, sweep_rows), = _tables(md, "knobs")
    stored = [r for f in sorted((tmp / "data/sweeps").glob("*.json")) for r in json.loads(f.read_text())]
    assert len(sweep_rows) == len(stored) > 0
    for cells, row in zip(sweep_rows, stored, strict=True):
        assert cells[0] == row["method"]
        assert _check_row(cells[2:], sweep_headings[2:], row, f"sweep {row['method']}") >= 10

    (ddb_headings, ddb_rows), = _tables(md, "unbiased acc. ↑")
    keys = {"unbiased acc. ↑": "unbiased_accuracy", "worst-group acc. ↑": "worst_group_accuracy",
            "bias-conflicting acc. ↑": "conflicting_accuracy", "bias-aligned acc. ↑": "aligned_accuracy"}
    assert [c[0].split(" (")[0] for c in ddb_rows] == list(DDB)
    for cells in ddb_rows:
        method = cells[0].split(" (")[0]
        metrics = json.loads((tmp / f"data/metrics/debias_classifier_{method}.json").read_text())
        for heading, text in zip(ddb_headings[1:], cells[1:], strict=True):
            assert _close(text, metrics[keys[heading]]), (method, heading, text, metrics[keys[heading]])


def test_each_sweeps_zero_row_is_the_baseline_sampler_on_validation_seeds(tiny_dag):
    """A swept knob at 0 (w = 0, r = 0, s = 0) is the baseline sampler on the validation seed stream
    (`knob_validation`): the row's numbers are those of the plain sampler on those seeds, scored here, exactly, and
    differ from score@baseline's, whose samples use the scored seeds (the sweeps never see the scored samples)."""
    from pipeline.config import load_params
    from pipeline.data import to_uint8
    from pipeline.pretrained import load_model
    from pipeline.sampling import SamplerSettings, sample, sample_seeds
    from pipeline.scoring import Scorer
    from pipeline.seeds import stream

    tmp = tiny_dag.path
    params = load_params(tmp / "params.yaml")
    n = params.sample.num_per_class
    assert params.latentdir.sweep_per_class == params.invdiff.sweep_per_class == params.distguide.sweep_per_class == n
    model = load_model(tmp / "data/models/diffusion")
    cond = np.repeat(np.arange(model.num_classes), n)
    images = sample(model, cond, sample_seeds(stream(params.seed, "knob_validation"), len(cond)),
                    SamplerSettings.from_params(params.sample), progress=False)
    ps = params.score
    plain, _ = Scorer(tmp / "data/judges", tmp / "data/reference", device="cpu", k=ps.pr_k, seed=params.seed,
                      batch_size=ps.batch_size, bootstrap=ps.bootstrap,
                      bootstrap_fid=ps.bootstrap_fid)(to_uint8(images), cond)
    plain = json.loads(json.dumps(plain))  # as the sweep's JSON holds it
    baseline = json.loads((tmp / "data/scores/baseline/metrics.json").read_text())
    for method in ("latentdir", *INVDIFF, "distguide"):
        rows = json.loads((tmp / f"data/sweeps/{method}.json").read_text())
        zero = [r for r in rows if r[r["swept"]] == 0]
        assert len(zero) == 1, method
        shared = set(plain) & set(zero[0])
        assert len(shared) >= 20, shared
        differing = {k: (zero[0][k], plain[k]) for k in shared if zero[0][k] != plain[k]}
        assert not differing, f"{method}: zero-strength row differs from the plain sampler: {differing}"
        assert zero[0]["fid_balanced"] != baseline["fid_balanced"], method  # not the scored samples
        others = [r for r in rows if r[r["swept"]] != 0]
        assert others and all(r["num_samples"] == baseline["num_samples"] for r in rows), method


def test_debiased_classifier_metrics_are_the_saved_models_accuracies(tiny_dag):
    """The saved classifier, run on the test split here, gives the stored cell accuracies (a brute-force loop)."""
    from pipeline.data import load_split
    from pipeline.methods.diffusing_debias import flatten_images, load_classifier, predict

    tmp = tiny_dag.path
    test = load_split(tmp / "data/prepared", "test", with_bias=True)
    for method in ("erm", "recipe2"):
        model = load_classifier(tmp / f"data/methods/ddb_{method}/model.safetensors")
        pred, _ = predict(model, flatten_images(test.images))
        cells, conflicting, aligned_hits = {}, [], []
        for i in range(len(pred)):
            hit = int(pred[i] == test.classes[i])
            cells.setdefault((int(test.classes[i]), int(test.bias[i])), []).append(hit)
            (aligned_hits if test.aligned[i] else conflicting).append(hit)  # the split's own flags
        acc = [sum(v) / len(v) for v in cells.values()]
        stored = json.loads((tmp / f"data/metrics/debias_classifier_{method}.json").read_text())
        assert stored["unbiased_accuracy"] == pytest.approx(sum(acc) / len(acc), abs=1e-12), method
        assert stored["worst_group_accuracy"] == pytest.approx(min(acc), abs=1e-12), method
        assert stored["conflicting_accuracy"] == pytest.approx(sum(conflicting) / len(conflicting), abs=1e-12)
        assert stored["aligned_accuracy"] == pytest.approx(sum(aligned_hits) / len(aligned_hits), abs=1e-12)


@pytest.mark.usefixtures("one_thread")
def test_sample_batch_size_leaves_images_byte_identical(tiny_dag, tmp_path, monkeypatch):
    """sample@baseline, in-process on a copy of the trained model, with other sample.batch_size values: the same
    images.npz, byte for byte (per-sample seeds; batches change nothing)."""
    from stages.sample import main

    shutil.copytree(tiny_dag.path / "data/models/diffusion", tmp_path / "data/models/diffusion")
    raw = yaml.safe_load((tiny_dag.path / "params.yaml").read_text())
    built = (tiny_dag.path / "data/samples/baseline/images.npz").read_bytes()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    assert raw["sample"]["batch_size"] == 8
    for batch_size in (3, 20):
        raw["sample"]["batch_size"] = batch_size
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        main(["--method", "baseline"])
        ours = (tmp_path / "data/samples/baseline/images.npz").read_bytes()
        assert ours == built, f"sample.batch_size {batch_size} changed images.npz"
    # The check can fail: another seed gives other bytes.
    raw["seed"] += 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    main(["--method", "baseline"])
    images = np.load(tmp_path / "data/samples/baseline/images.npz")["images"]
    assert (tmp_path / "data/samples/baseline/images.npz").read_bytes() != built and images.shape == (20, 16, 16, 3)


def test_stages_logged_to_mlflow(tiny_dag):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tiny_dag.path}/mlflow.db")
    exp = client.get_experiment_by_name("debias-diffusion")
    runs = client.search_runs([exp.experiment_id])
    stages = {r.data.tags["stage"] for r in runs}
    assert {"prepare_data", "train_classifiers", "train_diffusion", "fid_reference", "sample", "score",
            "fit_directions", "sweep", "report", "fit_grouper", "finetune_guidance", "fit_adp", "sample_bias_aligned",
            "train_bias_amplifier", "train_bias_amplifier_real", "debias_classifier"} <= stages
    ddb_runs = {r.info.run_name for r in runs if r.data.tags["stage"] == "debias_classifier"}
    assert ddb_runs == {f"debias_classifier@{m}" for m in DDB}
    assert all(r.data.tags.get("git_revision") for r in runs)
    report_runs = [r for r in runs if r.data.tags["stage"] == "report"]
    assert sorted(r.info.run_name for r in report_runs) == sorted(["baseline", "latentdir", *INVDIFF, "distguide"])
    for run in report_runs:  # the logged numbers are the stored ones
        stored = json.loads((tiny_dag.path / f"data/scores/{run.info.run_name}/metrics.json").read_text())
        for key in ("bias_score_normalised", "aligned_fraction", "fid_indomain", "fidelity"):
            assert run.data.metrics[key] == pytest.approx(stored[key], rel=1e-12), (run.info.run_name, key)


# These two rewrite a project: each works on its own copy (the shared one stays read-only; tests/conftest.py).

def test_a_forced_dvc_repro_of_the_core_chain_rebuilds_the_flows_bytes(tiny_dag, tmp_path):
    """`dvc repro -f` of prepare_data → train_classifiers/train_diffusion → fid_reference → sample@baseline →
    score@baseline, from scratch (checkpoints removed, no run cache), leaves the outputs the flow built, byte for byte
    (dvc.lock's hashes), and so nothing downstream to do."""
    tmp = copy_project(tiny_dag.path, tmp_path / "project")
    before = _lock(tiny_dag.lock)
    for name in ("classifiers", "diffusion"):  # else training resumes from the flow's last checkpoint
        shutil.rmtree(tmp / "data/checkpoints" / name)
    proc = dvc(tmp, "repro", "-f", "--no-run-cache", "score@baseline")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ran = set(re.findall(r"Running stage '([^']+)'", proc.stdout))
    assert ran == set(CORE), ran
    after = _lock((tmp / "dvc.lock").read_text())
    differing = {s: [o["path"] for o, t in zip(after[s]["outs"], before[s]["outs"], strict=True) if o != t]
                 for s in CORE if after[s] != before[s]}
    assert not differing, f"the forced dvc repro and the flow produced different outputs: {differing}"
    status = dvc(tmp, "status")
    assert status.returncode == 0 and "up to date" in status.stdout.lower(), status.stdout


def test_push_and_pull_through_a_local_directory_remote(tiny_dag, tmp_path):
    """Artifacts travel through a DVC remote (here a local directory, as a GPU worker would use S3 or SSH)."""
    tmp = copy_project(tiny_dag.path, tmp_path / "project")
    assert dvc(tmp, "remote", "add", "-d", "store", str(tmp_path / "store")).returncode == 0
    try:
        pushed = dvc(tmp, "push")
        assert pushed.returncode == 0, pushed.stderr[-2000:]
        before = (tmp / "data/models/diffusion/unet/diffusion_pytorch_model.safetensors").read_bytes()
        for path in ("data/models", "data/prepared", "data/report", ".dvc/cache"):
            shutil.rmtree(tmp / path)
        assert "deleted" in dvc(tmp, "status").stdout
        pulled = dvc(tmp, "pull")
        assert pulled.returncode == 0, pulled.stderr[-2000:]
        assert (tmp / "data/models/diffusion/unet/diffusion_pytorch_model.safetensors").read_bytes() == before
        status = dvc(tmp, "status")
        assert "changed" not in status.stdout and "deleted" not in status.stdout, status.stdout
    finally:
        dvc(tmp, "remote", "remove", "store")
