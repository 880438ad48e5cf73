"""prepare_data: real MNIST → Coloured MNIST (LfF protocol), or a real-world dataset (data.format) →
data/prepared/{train,judge,test}.npz + labels.parquet (+ meta.json for the real-world formats)."""

from pathlib import Path

from pipeline.data import SPLITS, load_mnist, make_coloured_mnist
from pipeline.datasets import prepare_real, read_dataset
from pipeline.io import atomic_path, save_json, save_npz
from stages.common import load_params, mlflow_run, stage_main

OUT = Path("data/prepared")


def build(params):
    """({split: images}, labels frame, meta dict or None) for params.data."""
    p = params.data
    if p.format == "mnist":
        images, labels = make_coloured_mnist(
            load_mnist(p.source), resolution=p.resolution, bias_ratio=p.bias_ratio, colour_jitter=p.colour_jitter,
            n_judge=p.n_judge, n_train=p.n_train, n_test=p.n_test, seed=params.seed)
        return images, labels, None
    raw = read_dataset(p.format, p.source, target_attr=p.target_attr, bias_attr=p.bias_attr,
                       class_names=p.class_names, attr_names=p.attr_names, seed=params.seed,
                       n_judge=p.n_judge, n_test=p.n_test)
    return prepare_real(raw, resolution=p.resolution, rebalance_train=p.rebalance, bias_ratio=p.bias_ratio,
                        aligned=p.aligned, n_train=p.n_train, n_judge=p.n_judge, n_test=p.n_test,
                        seed=params.seed, fmt=p.format)


def write(out: Path, images, labels, meta) -> None:
    """Write the prepared directory atomically: one npz per split, labels.parquet, meta.json when given."""
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        for split in SPLITS:
            save_npz(tmp / f"{split}.npz", images=images[split])
        labels.to_parquet(tmp / "labels.parquet", index=False)
        if meta is not None:
            save_json(tmp / "meta.json", meta)


@stage_main
def main() -> None:
    params = load_params()
    images, labels, meta = build(params)
    by_split = labels.groupby("split")
    stats = {
        "aligned_fraction": {s: float(g["aligned"].mean()) for s, g in by_split},
        "count": {s: len(g) for s, g in by_split},
    }
    # the run opened before the first write: a tracking error leaves the previous outputs as they were
    with mlflow_run("prepare_data", params, ("data",)) as run:
        write(OUT, images, labels, meta)
        save_json("data/metrics/prepare_data.json", stats)
        run.metrics({"train_aligned_fraction": stats["aligned_fraction"]["train"],
                     **{f"n_{s}": n for s, n in stats["count"].items()}})
    print(f"prepared {stats['count']} images; train aligned fraction {stats['aligned_fraction']['train']:.3f}")


if __name__ == "__main__":
    main()
