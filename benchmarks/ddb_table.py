"""The Diffusing DeBias table: every method × bias ratio ρ × seed, then means ± std per (ρ, method).

    python benchmarks/ddb_table.py --ratios 0.99 --seeds 0 1 2            # what README's table measured
    python benchmarks/ddb_table.py --ratios 0.95 0.98 0.99 0.995 --seeds 0 1 2
    python benchmarks/ddb_table.py --ratios 0.99 --seeds 0 1 2 --grid ddb.dro_weight_decay=0.001,0.003,0.01

Hyperparameters are chosen on validation data only (docs/protocol.md): with --grid, every point runs for every
seed, and per (ρ, method) the point with the best mean `--select-by` metric (a `val_…` metric: the validation split,
never the test split) is the one the table reports, on the test split.

Each ρ gets a work directory (<workdir>/rho_<ρ>: a copy of pipeline/, stages/ and params.yaml with
data.bias_ratio = ρ) where the stages run as plain `python -m stages.<name>`, in the DAG's order:
prepare_data → train_classifiers → train_diffusion (once per ρ: each ρ needs its own biased model), then per seed
(ddb.seed = s: synthetic samples, both amplifiers and every classifier are re-drawn; the diffusion model is not)
sample_bias_aligned → train_bias_amplifier[_real] → debias_classifier@{erm, lff, recipe1, recipe2, recipe1_real,
recipe2_real}. A stage whose output already exists for that (ρ, seed) is skipped, so the script resumes.
One MLflow run per stage execution (experiment debias-diffusion, tags method / bias_ratio / ddb_seed) goes to
$MLFLOW_TRACKING_URI, default sqlite:///<workdir>/mlflow.db.

The same runs through DVC, one (ρ, seed) at a time: `dvc exp run -S data.bias_ratio=0.99 -S ddb.seed=1
debias_classifier@recipe1 ...` (the whole upstream DAG re-runs for a new ρ).

Writes <out>.json (one row per method × ρ × seed, plus the summary) and <out>.md (the table).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.methods.diffusing_debias import CLASSIFIER_METHODS as METHODS  # noqa: E402
from pipeline.methods.diffusing_debias import select_by_validation, summarise  # noqa: E402

LABELS = {"recipe1_real": "recipe1 (ablation: real-data amplifier)",
          "recipe2_real": "recipe2 (ablation: real-data amplifier)"}


def workdir_for(root: Path, rho: float) -> Path:
    w = root / f"rho_{rho}"
    for name in ("pipeline", "stages"):
        if (w / name).exists():
            shutil.rmtree(w / name)
        shutil.copytree(ROOT / name, w / name, ignore=shutil.ignore_patterns("__pycache__"))
    return w


def set_params(w: Path, rho: float, seed: int, overrides: dict) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["bias_ratio"] = rho
    raw["ddb"]["seed"] = seed
    for key, value in overrides.items():
        section, leaf = key.split(".", 1)
        raw[section][leaf] = value
    (w / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def grid_points(grid: list[str]) -> dict[str, dict]:
    """{label: overrides} for the product of `SECTION.KEY=V1,V2,...` specs; no grid: one point, label ''."""
    import itertools

    axes = [(k, [yaml.safe_load(v) for v in vs.split(",")]) for k, vs in (s.split("=", 1) for s in grid)]
    if any(not k.startswith("ddb.") for k, _ in axes):  # the biased model is trained once per ρ, not per point
        raise SystemExit(f"--grid: only ddb.* keys may vary, got {[k for k, _ in axes]}")
    points = {}
    for values in itertools.product(*(vs for _, vs in axes)):
        over = {k: v for (k, _), v in zip(axes, values, strict=True)}
        points[",".join(f"{k}={v}" for k, v in over.items())] = over
    return points


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run(w: Path, args: list[str], timings: dict, label: str) -> None:
    start, cpu = time.perf_counter(), _children_cpu()
    proc = subprocess.run([sys.executable, "-m", *args], cwd=w, env={**os.environ, "PYTHONPATH": str(w)},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timings[label] = {"wall_s": time.perf_counter() - start, "cpu_s": _children_cpu() - cpu}
    lines = [ln for ln in proc.stdout.splitlines() if "it/s]" not in ln and "s/it]" not in ln]
    t = timings[label]
    print(f"  [{t['wall_s']:6.0f} s wall, {t['cpu_s']:6.0f} s CPU] {label}: " + (lines[-1] if lines else ""),
          flush=True)
    if proc.returncode:
        raise SystemExit(f"{label} failed in {w}:\n" + "\n".join(lines[-20:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.95, 0.98, 0.99, 0.995])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ddb_table"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ddb_table")
    ap.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE", help="extra params overrides")
    ap.add_argument("--grid", nargs="*", default=[], metavar="SECTION.KEY=V1,V2,...",
                    help="hyperparameter grid; the point reported is chosen by --select-by")
    ap.add_argument("--select-by", default="val_unbiased_accuracy", help="validation metric that chooses the point")
    args = ap.parse_args()
    base = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    points = grid_points(args.grid)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{args.workdir.resolve()}/mlflow.db")
    args.workdir.mkdir(parents=True, exist_ok=True)
    results_path = args.workdir / "rows.jsonl"
    done = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.is_file() else []
    timings_all = {}
    for rho in args.ratios:
        w = workdir_for(args.workdir, rho)
        print(f"ρ = {rho}: {w}", flush=True)
        set_params(w, rho, args.seeds[0], base)
        timings = timings_all.setdefault(str(rho), {})
        marker = w / "data" / "bias_ratio.txt"
        if not marker.is_file() or marker.read_text() != str(rho):
            for stage in ("prepare_data", "train_classifiers", "train_diffusion"):
                run(w, [f"stages.{stage}"], timings, stage)
            marker.write_text(str(rho))
        elif not (w / "data/judges/colour.safetensors").is_file():
            run(w, ["stages.train_classifiers"], timings, "train_classifiers")
        for (point, grid), seed in ((pt, s) for pt in points.items() for s in args.seeds):
            todo = [m for m in args.methods if not any(r["bias_ratio"] == rho and r["seed"] == seed and
                                                       r["method"] == m and r.get("point", "") == point for r in done)]
            if not todo:
                continue
            print(f"  point {point or '(params.yaml)'}, seed {seed}", flush=True)
            set_params(w, rho, seed, {**base, **grid})
            if any(m.startswith("recipe") and not m.endswith("_real") for m in todo):
                run(w, ["stages.sample_bias_aligned"], timings, f"sample_bias_aligned seed {seed}")
                run(w, ["stages.train_bias_amplifier", "--source", "synthetic"], timings,
                    f"train_bias_amplifier seed {seed}")
            if any(m.endswith("_real") for m in todo):
                run(w, ["stages.train_bias_amplifier", "--source", "real"], timings,
                    f"train_bias_amplifier_real seed {seed}")
            for m in todo:
                run(w, ["stages.debias_classifier", "--method", m], timings, f"debias_classifier@{m} seed {seed}")
                row = json.loads((w / "data/metrics" / f"debias_classifier_{m}.json").read_text())
                row.update(method=m, bias_ratio=rho, seed=seed, point=point)
                for stage in ("sample_bias_aligned", "train_bias_amplifier", "train_bias_amplifier_real"):
                    f = w / "data/metrics" / f"{stage}.json"
                    if f.is_file():
                        extra = json.loads(f.read_text())
                        row[f"{stage}.aligned_fraction" if stage == "sample_bias_aligned" else
                            f"{stage}.test_conflicting_accuracy"] = extra.get(
                            "aligned_fraction", extra.get("test_conflicting_accuracy"))
                done.append(row)
                with results_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    rows = [r for r in done if r["bias_ratio"] in args.ratios and r["seed"] in args.seeds
            and r.get("point", "") in points and r["method"] in args.methods]
    chosen = select_by_validation(rows, args.select_by) if len(points) > 1 else {}
    reported = [r for r in rows if chosen.get((r["bias_ratio"], r["method"]), r.get("point", "")) ==
                r.get("point", "")]
    table = summarise(reported)
    for r in table:
        r["point"] = chosen.get((r["bias_ratio"], r["method"]), next(iter(points)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps({"rows": rows, "summary": table, "timings": timings_all,
                                                    "selected_by": args.select_by if chosen else None},
                                                   indent=2) + "\n")
    md = ["| ρ | method | unbiased acc. | worst-group acc. | conflicting acc. | aligned acc. | seeds |"
          + (f" chosen by {args.select_by} |" if chosen else ""),
          "|---|---|---|---|---|---|---|" + ("---|" if chosen else "")]
    for r in table:
        cells = [f"{100 * r[k]:.1f} ± {100 * r[k + '_std']:.1f}" for k in
                 ("unbiased_accuracy", "worst_group_accuracy", "conflicting_accuracy", "aligned_accuracy")]
        md.append(f"| {r['bias_ratio']} | {LABELS.get(r['method'], r['method'])} | " + " | ".join(cells)
                  + f" | {r['n_seeds']} |" + (f" {r['point']} |" if chosen else ""))
    Path(f"{args.out}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
