"""debias_classifier@<method>: Diffusing DeBias's target classifier (LfF's MLP) on the real, biased training set.

Methods (pipeline/methods/diffusing_debias.py): erm (cross-entropy), recipe1 (GroupDRO on class × pseudo-bias from
the bias amplifier), recipe2 (LfF-style weights W = ℓ^BA / (ℓ^BA + ℓ^D) from the frozen amplifier), lff (LfF proper:
a GCE bias model trained jointly on real data); recipe1_real / recipe2_real are the ablation with the amplifier
trained on the real training set (train_bias_amplifier_real). The training set is read without its bias labels.
After training, the validation split (the judge split, with bias labels) gives the `val_…` metrics that choose
hyperparameters (benchmarks/ddb_table.py: an equal budget per method), and the colour-uniform test split scores
the result; neither reaches a fitting function (docs/protocol.md).
Writes data/methods/ddb_<method>/{model.safetensors, metrics.json} and data/metrics/debias_classifier_<method>.json;
one MLflow run per method × ρ × seed (tags method, bias_ratio, ddb_seed).
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.data import load_meta, load_split
from pipeline.io import atomic_path, save_json
from pipeline.methods.diffusing_debias import (
    CLASSIFIER_METHODS,
    VALIDATION_SPLIT,
    TrainConfig,
    evaluate,
    fit_classifier,
    fit_groupdro,
    fit_reweighted,
    flatten_images,
    load_classifier,
    predict,
    pseudo_groups,
    save_classifier,
)
from stages.common import UserError, device, load_params, mlflow_run, stage_main

PREPARED = Path("data/prepared")


@stage_main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--method", required=True)
    args = ap.parse_args(argv)
    method = args.method
    if method not in CLASSIFIER_METHODS:
        raise UserError(f"--method {method!r}: unknown method (expected one of: {', '.join(CLASSIFIER_METHODS)})")
    params = load_params()
    meta = load_meta(PREPARED)  # class count and each class's bias-aligned attribute value
    p = params.ddb
    device()  # thread count
    cfg = TrainConfig.from_params(p, p.epochs)
    train = load_split(PREPARED, "train", with_bias=False)  # no bias labels for any recipe
    x, y = flatten_images(train.images), torch.from_numpy(train.classes)
    amplifier = None
    if method.startswith("recipe"):
        source = "ddb_amplifier_real" if method.endswith("_real") else "ddb_amplifier"
        amplifier = load_classifier(Path("data/methods") / source / "model.safetensors")
    tags = {"method": method, "bias_ratio": str(params.data.bias_ratio), "ddb_seed": str(p.seed)}
    extra = {}
    with mlflow_run("debias_classifier", params, ("ddb", "data"), run_name=f"debias_classifier@{method}",
                    extra_tags=tags) as run:
        log = lambda epoch, m: run.metrics(m, step=epoch)  # noqa: E731
        start = time.perf_counter()
        if method == "erm":
            model = fit_classifier(x, y, meta.num_classes, cfg, log=log)
        elif method.startswith("recipe1"):
            ba_pred, _ = predict(amplifier, x)
            groups = pseudo_groups(ba_pred, train.classes, meta.num_classes, p.pseudo_bias)
            model, info = fit_groupdro(x, y, groups, meta.num_classes, cfg, log=log)
            extra = {"pseudo_conflicting_share": float(np.mean(ba_pred != train.classes)),
                     "num_groups_nonempty": int(np.sum(np.array(info["group_counts"]) > 0)),
                     "q_max": float(max(info["q"]))}
        else:  # recipe2, recipe2_real, lff
            model, info = fit_reweighted(x, y, meta.num_classes, cfg, amplifier=amplifier, log=log)
            extra = {"weight_mean": info["weight_mean"]}
        seconds = time.perf_counter() - start
        aligned = np.asarray(meta.aligned)
        val = load_split(PREPARED, VALIDATION_SPLIT, with_bias=True)  # model selection reads these only
        chosen_by = {f"val_{k}": v for k, v in evaluate(model, val.images, val.classes, val.bias, aligned).items()}
        test = load_split(PREPARED, "test", with_bias=True)  # final scoring
        metrics = {**evaluate(model, test.images, test.classes, test.bias, aligned), **chosen_by, **extra,
                   "bias_ratio": params.data.bias_ratio, "seed": p.seed}
        run.metrics({**metrics, "train_seconds": seconds})  # the time is not written to the outputs (reproducible)
    with atomic_path(Path("data/methods") / f"ddb_{method}") as tmp:
        tmp.mkdir(parents=True)
        save_classifier(model, tmp / "model.safetensors", extra={"method": method})
        save_json(tmp / "metrics.json", {"method": method, **metrics})
    save_json(f"data/metrics/debias_classifier_{method}.json", metrics)
    print(f"debias_classifier@{method}: unbiased {metrics['unbiased_accuracy']:.4f}, worst group "
          f"{metrics['worst_group_accuracy']:.4f}, conflicting {metrics['conflicting_accuracy']:.4f}, aligned "
          f"{metrics['aligned_accuracy']:.4f} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
