"""score@<method>: bias (InvDiff score, normalised, FD, aligned fraction), in-domain FID, fidelity,
precision/recall, and Inception FID when on — per class and overall, each with a 95% interval, and the bias
corrected for the colour judge's confusion (docs/metrics.md)."""

import argparse
from pathlib import Path

from pipeline.io import atomic_path, load_npz, load_parquet, save_json
from pipeline.scoring import Scorer
from stages.common import UserError, check_name, device, load_params, mlflow_run, stage_main

JUDGES, REF = Path("data/judges"), Path("data/reference")


@stage_main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--method", default="baseline")
    args = ap.parse_args(argv)
    check_name("score", "--method", args.method)
    params = load_params()
    p = params.score
    dev = device()
    sample_dir = Path("data/samples") / args.method
    images = load_npz(sample_dir / "images.npz", "images")["images"]
    table = load_parquet(sample_dir / "samples.parquet", ["condition"])
    if len(table) != len(images):
        raise UserError(f"{sample_dir}: images.npz has {len(images)} images, samples.parquet {len(table)} rows")
    scorer = Scorer(JUDGES, REF, device=dev, k=p.pr_k, seed=params.seed, batch_size=p.batch_size,
                    bootstrap=p.bootstrap, bootstrap_fid=p.bootstrap_fid)
    metrics, per_class = scorer(images, table["condition"].to_numpy())
    out = Path("data/scores") / args.method
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        save_json(tmp / "metrics.json", metrics)
        per_class.to_parquet(tmp / "per_class.parquet", index=False)
    with mlflow_run("score", params, ("score",), run_name=f"score@{args.method}",
                    extra_tags={"method": args.method}) as run:
        run.metrics(metrics)
    print(f"score@{args.method}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if not isinstance(v, list)))


if __name__ == "__main__":
    main()
