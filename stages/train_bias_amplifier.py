"""train_bias_amplifier: the bias amplifier (BA) of Diffusing DeBias — LfF's MLP trained with cross-entropy on the
synthetic images of sample_bias_aligned only, labelled by their generating class. It never sees a real image:
the library function takes a `SyntheticImages` set, and this stage asserts that no synthetic image is
byte-identical to a real training image.

`--source real` is the paper's ablation (stage train_bias_amplifier_real): the same training on the real, biased
training set. Writes data/methods/ddb_amplifier[_real]/{model.safetensors, summary.json} and
data/metrics/train_bias_amplifier[_real].json; the summary holds the BA's accuracy on the validation split (`val_…`,
what a choice of amplifier settings may read) and, as a final score of the frozen amplifier, on the colour-uniform
test set (bias-aligned vs bias-conflicting: an amplifier is good at the first and bad at the second).
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from pipeline.data import load_meta, load_split
from pipeline.io import atomic_path, save_json
from pipeline.methods.diffusing_debias import (
    VALIDATION_SPLIT,
    TrainConfig,
    assert_no_real_images,
    evaluate,
    fit_classifier,
    flatten_images,
    load_synthetic,
    save_classifier,
    train_bias_amplifier,
)
from stages.common import device, load_params, mlflow_run, stage_main

PREPARED, SYNTHETIC = Path("data/prepared"), Path("data/methods/ddb_synthetic/images.npz")


@stage_main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--source", choices=("synthetic", "real"), default="synthetic")
    args = ap.parse_args(argv)
    params = load_params()
    meta = load_meta(PREPARED)  # class count and each class's bias-aligned attribute value
    p = params.ddb
    device()  # thread count
    cfg = TrainConfig.for_amplifiers(p)
    name = "train_bias_amplifier" + ("_real" if args.source == "real" else "")
    with mlflow_run(name, params, ("ddb",), extra_tags={"bias_ratio": str(params.data.bias_ratio),
                                                        "ddb_seed": str(p.seed)}) as run:
        log = lambda epoch, m: run.metrics(m, step=epoch)  # noqa: E731
        if args.source == "synthetic":
            synthetic = load_synthetic(SYNTHETIC)
            assert_no_real_images(synthetic.images, load_split(PREPARED, "train", with_bias=False).images)
            model = train_bias_amplifier(synthetic, meta.num_classes, cfg, log=log)
            n = len(synthetic.classes)
        else:
            train = load_split(PREPARED, "train", with_bias=False)
            model = fit_classifier(flatten_images(train.images), torch.from_numpy(train.classes), meta.num_classes, cfg,
                                   what="bias amplifier (real)", log=log, image_shape=train.images.shape[1:])
            n = len(train.classes)
        summary = {}
        for prefix, split in (("val", VALIDATION_SPLIT), ("test", "test")):  # read after training only
            s = load_split(PREPARED, split, with_bias=True)
            summary.update({f"{prefix}_{k}": v for k, v in
                            evaluate(model, s.images, s.classes, s.bias, np.asarray(meta.aligned)).items()})
        summary.update(source=args.source, num_train=n)
        run.metrics({k: v for k, v in summary.items() if k != "source"})
    out = Path("data/methods") / ("ddb_amplifier" + ("_real" if args.source == "real" else ""))
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        save_classifier(model, tmp / "model.safetensors", extra={"source": args.source})
        save_json(tmp / "summary.json", summary)
    save_json(f"data/metrics/{name}.json", summary)
    print(f"{name}: {n} {args.source} images; test accuracy aligned {summary['test_aligned_accuracy']:.3f}, "
          f"conflicting {summary['test_conflicting_accuracy']:.3f}")


if __name__ == "__main__":
    main()
