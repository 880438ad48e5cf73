"""prepare_data: real MNIST → Coloured MNIST (LfF protocol) → data/prepared/{train,judge,test}.npz + labels.parquet."""

from pathlib import Path

from pipeline.data import SPLITS, load_mnist, make_coloured_mnist
from pipeline.io import atomic_path, save_json, save_npz
from stages.common import load_params, mlflow_run, stage_main

OUT = Path("data/prepared")


@stage_main
def main() -> None:
    params = load_params()
    p = params.data
    mnist = load_mnist(p.source)
    images, labels = make_coloured_mnist(
        mnist, resolution=p.resolution, bias_ratio=p.bias_ratio, colour_jitter=p.colour_jitter,
        n_judge=p.n_judge, n_train=p.n_train, n_test=p.n_test, seed=params.seed)
    by_split = labels.groupby("split")
    stats = {
        "aligned_fraction": {s: float(g["aligned"].mean()) for s, g in by_split},
        "count": {s: len(g) for s, g in by_split},
    }
    with atomic_path(OUT) as tmp:
        tmp.mkdir(parents=True)
        for split in SPLITS:
            save_npz(tmp / f"{split}.npz", images=images[split])
        labels.to_parquet(tmp / "labels.parquet", index=False)
    save_json("data/metrics/prepare_data.json", stats)
    with mlflow_run("prepare_data", params, ("data",)) as run:
        run.metrics({"train_aligned_fraction": stats["aligned_fraction"]["train"],
                     **{f"n_{s}": n for s, n in stats["count"].items()}})
    print(f"prepared {stats['count']} images; train aligned fraction {stats['aligned_fraction']['train']:.3f}")


if __name__ == "__main__":
    main()
