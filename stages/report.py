"""report: one table row per scored method, sample grids (rows = classes), a bias-vs-FID scatter.

Writes data/report/{report.md, *.png} and data/metrics/report_methods.json; logs one MLflow run per
method so MLflow's compare view lines the methods up: each with the method's own knobs as params and its sample grid
under the same artifact name (docs/tracking.md).
"""

import shutil
import tempfile
from pathlib import Path

import yaml

from pipeline.data import load_meta
from pipeline.io import atomic_path, load_json, load_npz, load_parquet, save_json
from pipeline.methods.diffusing_debias import CLASSIFIER_METHODS
from pipeline.methods.registry import REGISTRY
from pipeline.metrics import frechet_distance, uniform_bias_floor
from pipeline.report import (
    add_bias_removed,
    bias_fid_scatter,
    ddb_section,
    loss_curves,
    per_class_counts,
    render_markdown,
    sample_grid,
    save_png,
)
from stages.common import DVC_YAML, UserError, load_params, mlflow_run, stage_main

SCORES, SAMPLES, OUT = Path("data/scores"), Path("data/samples"), Path("data/report")
SWEEPS, METHODS, REFERENCE = Path("data/sweeps"), Path("data/methods"), Path("data/reference")
CURVES = Path("data/metrics")  # <stage>_loss.json: [{step, train_loss, …}]
DDB_LABELS = {"erm": "baseline", "lff": "baseline: LfF, GCE bias model on real data",
              "recipe1": "GroupDRO on the synthetic amplifier's pseudo-groups",
              "recipe2": "LfF-style weights from the synthetic amplifier",
              "recipe1_real": "ablation: amplifier trained on real data",
              "recipe2_real": "ablation: amplifier trained on real data"}


def diffusing_debias_lines(out: Path) -> list[str]:
    """The Diffusing DeBias section when its classifiers have run (copies the synthetic grid into `out`)."""
    rows = [load_json(METHODS / f"ddb_{m}" / "metrics.json") for m in CLASSIFIER_METHODS
            if (METHODS / f"ddb_{m}" / "metrics.json").is_file()]
    if not rows:
        return []
    synthetic, grid = None, None
    if Path("data/metrics/sample_bias_aligned.json").is_file():
        synthetic = load_json("data/metrics/sample_bias_aligned.json")
    if (METHODS / "ddb_synthetic" / "grid.png").is_file():
        shutil.copy(METHODS / "ddb_synthetic" / "grid.png", out / "ddb_synthetic.png")
        grid = "ddb_synthetic.png"
    amplifiers = {name: load_json(METHODS / d / "summary.json") for name, d in
                  (("synthetic", "ddb_amplifier"), ("real-data ablation", "ddb_amplifier_real"))
                  if (METHODS / d / "summary.json").is_file()}
    return ddb_section(rows, synthetic=synthetic, amplifiers=amplifiers, labels=DDB_LABELS, grid=grid)


def method_knobs(method: str, dumped: dict) -> dict:
    """The params section `sample@<method>` reads (params.yaml's `methods.<name>.knobs`: latentdir, invdiff,
    distguide; none for the baseline), whole, so fit and sampling knobs sit side by side; an InvDiff variant with the
    λ it trained with and where its groups came from (dvc.yaml's finetune_guidance `groups`)."""
    stages = yaml.safe_load(DVC_YAML.read_text())["stages"]
    section = str(dumped.get("methods", {}).get(method, {}).get("knobs", "sample")).split(".")[0]
    if section == "sample" or section not in dumped:
        return {}
    knobs = dict(dumped[section])
    summary = METHODS / method / "summary.json"
    if section == "invdiff" and summary.is_file():
        fitted = load_json(summary)
        knobs.update(lam=fitted["lam"], groups=fitted["groups"],
                     group_source=stages["finetune_guidance"]["foreach"].get(method, {}).get("groups", ""))
    return {section: knobs}


def log_runs(rows: list[dict], params) -> None:
    """One MLflow run per method: its metrics, its knobs, its grid as `sample_grid.png` (the same name in every
    run, so the compare view shows the grids side by side) and as an image keyed `sample_grid`."""
    from PIL import Image

    dumped = params.model_dump(mode="json")
    for row in rows:
        m = row["method"]
        with mlflow_run("report", params, ("sample", "score"), run_name=m, extra_tags={"method": m},
                        extra_params={"method": m, **method_knobs(m, dumped)}) as run, \
                tempfile.TemporaryDirectory() as tmp:
            run.metrics({k: v for k, v in row.items() if k != "method"})
            shutil.copy(OUT / f"samples_{m}.png", Path(tmp) / "sample_grid.png")
            run.artifact(Path(tmp) / "sample_grid.png")
            with Image.open(OUT / f"samples_{m}.png") as grid:
                run.image(grid.convert("RGB"), "sample_grid")


@stage_main
def main() -> None:
    params = load_params()
    methods = sorted(p.name for p in SCORES.glob("*") if (p / "metrics.json").is_file())
    if not methods:
        raise UserError(f"{SCORES}: no scored methods found (run `dvc repro score`)")
    # The baseline first, then the methods alphabetically.
    methods.sort(key=lambda m: (m != "baseline", m))
    rows = [{"method": m, **load_json(SCORES / m / "metrics.json")} for m in methods]
    add_bias_removed(rows, {m: per_class_counts(load_parquet(SCORES / m / "per_class.parquet")) for m in methods},
                     seed=params.seed)
    biased, balanced = (load_npz(REFERENCE / f"{s}.npz", "mu", "sigma") for s in ("indomain", "balanced"))
    with atomic_path(OUT) as tmp:
        tmp.mkdir(parents=True)
        grids = {}
        for m in methods:
            images = load_npz(SAMPLES / m / "images.npz", "images")["images"]
            cond = load_parquet(SAMPLES / m / "samples.parquet", ["condition"])["condition"].to_numpy()
            save_png(sample_grid(images, cond, params.report.grid_per_class), tmp / f"samples_{m}.png")
            grids[m] = f"samples_{m}.png"
        sweeps = [r for f in sorted(SWEEPS.glob("*.json")) for r in load_json(f)]
        bias_fid_scatter(rows, tmp / "bias_vs_fid.png", sweeps=sweeps)
        # Static images for `dvc plots show` (dvc.yaml's top-level plots): its vega page needs JS from a CDN.
        loss_curves({f.name.removesuffix("_loss.json"): load_json(f) for f in sorted(CURVES.glob("*_loss.json"))},
                    tmp / "training_loss.png")
        # each method's label and the note under its grid: its entry in pipeline/methods/registry.py
        known = [REGISTRY[m] for m in methods if m in REGISTRY]
        labels = {m.name: m.label for m in known if m.label}
        extras = {m.name: lines for m in known if (lines := m.report_note(params, tmp))}
        context = {**params.data.model_dump(), **params.sample.model_dump(),
                   "bias_floor": uniform_bias_floor(params.sample.num_per_class, load_meta(REFERENCE).num_attributes,
                                                 seed=params.seed),
                   "fid_real_splits": frechet_distance(biased["mu"], biased["sigma"], balanced["mu"],
                                                       balanced["sigma"])}
        md = render_markdown(rows, data_bias=load_json("data/reference/summary.json")["train_data_bias"],
                             judges=load_json("data/metrics/train_classifiers.json"), context=context,
                             grids=grids, scatter="bias_vs_fid.png", sweeps=sweeps, extras=extras, labels=labels,
                             sections=diffusing_debias_lines(tmp))
        (tmp / "report.md").write_text(md)
    save_json("data/metrics/report_methods.json", rows)
    log_runs(rows, params)
    print(f"report: {OUT / 'report.md'} ({len(rows)} methods)")


if __name__ == "__main__":
    main()
