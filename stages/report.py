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
LABELS = {"invdiff_lambda0": "ablation: λ = 0", "invdiff_oracle": "ablation: true groups, uses bias labels"}
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
    """The params section `sample@<method>` reads (dvc.yaml's `knobs`: latentdir, invdiff, distguide; none for the
    baseline), whole, so fit and sampling knobs sit side by side; an InvDiff variant with the λ it trained with and
    where its groups came from (dvc.yaml's finetune_guidance `groups`)."""
    stages = yaml.safe_load(DVC_YAML.read_text())["stages"]
    section = str(stages["sample"]["foreach"].get(method, {}).get("knobs", "sample")).split(".")[0]
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
        extras = {}
        accuracy_png = METHODS / "latentdir" / "svm_accuracy.png"
        if "latentdir" in methods and accuracy_png.is_file():
            shutil.copy(accuracy_png, tmp / "latentdir_svm_accuracy.png")
            p = params.latentdir
            extras["latentdir"] = [
                f"Latent Directions: z_T + w·d with w = {p.weight:g}, directions fitted on x_t at step "
                f"{p.source_step} (SVM on {p.pool}×{p.pool}-pooled latents). Held-out SVM accuracy per step:", "",
                "![SVM accuracy per step](latentdir_svm_accuracy.png)", ""]
        adp_png = METHODS / "distguide" / "adp_accuracy.png"
        if "distguide" in methods and adp_png.is_file():
            shutil.copy(adp_png, tmp / "distguide_adp_accuracy.png")
            p, fitted = params.distguide, load_json(METHODS / "distguide" / "summary.json")
            extras["distguide"] = [
                f"Distribution Guidance: h ← h − s·∇_h L at steps [{p.steps[0]}, {p.steps[1]}) with s = {p.scale:g}, "
                f"τ = {p.tau:g}, L = Σ_k (p̂_k − p*_k)² / p*_k over each class's samples in guidance batches of "
                f"{p.batch_size}; p* {'uniform' if p.target is None else list(p.target)}. ADP: {fitted['chosen']} "
                f"(mean held-out accuracy {fitted[fitted['chosen'] + '_mean_accuracy']:.3f}), fitted on "
                "colour-judge pseudo-labels. Held-out accuracy per step:", "",
                "![ADP accuracy per step](distguide_adp_accuracy.png)", ""]
        grouper = Path("data/metrics/fit_grouper.json")
        if "invdiff" in methods and grouper.is_file():
            shutil.copy(METHODS / "invdiff_groups" / "discovery.png", tmp / "invdiff_discovery.png")
            q, p = load_json(grouper), params.invdiff
            shares = ", ".join(f"{v:.3f}" for k, v in q.items() if k.startswith("share_group"))
            extras["invdiff"] = [
                f"InvDiff: f_θ + r·δ with r = {p.strength:g}; δ trained {p.steps} steps on mean_k L_k + λ·var_k L_k "
                f"(λ = {p.lam:g}) over {p.num_groups} groups inferred without bias labels. The ablations: "
                "`invdiff_lambda0` (λ = 0) and `invdiff_oracle` (the true aligned/conflicting split in place of the "
                "inferred groups — uses the labels, an upper reference).", "",
                f"Bias discovery (scored afterwards against the hidden labels): the highest-loss group holds "
                f"{q['share_group' + str(p.num_groups - 1)]:.1%} of the training set; precision "
                f"{q['precision_top_group']:.3f} and recall {q['recall_top_group']:.3f} for the bias-conflicting "
                f"images (base rate {q['conflicting_rate']:.3f}); NMI {q['nmi_conflicting']:.3f}; AUROC of the "
                f"normalised loss {q.get('auroc_scores', float('nan')):.3f}; group shares {shares}. "
                "Rows below: training images most firmly in each group (lowest loss first).", "",
                "![InvDiff bias discovery](invdiff_discovery.png)", ""]
        context = {**params.data.model_dump(), **params.sample.model_dump(),
                   "bias_floor": uniform_bias_floor(params.sample.num_per_class, load_meta(REFERENCE).num_attributes,
                                                 seed=params.seed),
                   "fid_real_splits": frechet_distance(biased["mu"], biased["sigma"], balanced["mu"],
                                                       balanced["sigma"])}
        md = render_markdown(rows, data_bias=load_json("data/reference/summary.json")["train_data_bias"],
                             judges=load_json("data/metrics/train_classifiers.json"), context=context,
                             grids=grids, scatter="bias_vs_fid.png", sweeps=sweeps, extras=extras, labels=LABELS,
                             sections=diffusing_debias_lines(tmp))
        (tmp / "report.md").write_text(md)
    save_json("data/metrics/report_methods.json", rows)
    log_runs(rows, params)
    print(f"report: {OUT / 'report.md'} ({len(rows)} methods)")


if __name__ == "__main__":
    main()
