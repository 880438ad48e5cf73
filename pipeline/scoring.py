"""Score a set of generated samples with the judges: the metrics of DESIGN.md §5 in one call."""

import numpy as np
import pandas as pd

from pipeline.data import MNIST_META, DatasetMeta, load_meta, to_tensor
from pipeline.metrics import (
    aligned_fraction,
    bias_score,
    fairness_discrepancy,
    feature_statistics,
    fidelity,
    frechet_distance,
    precision_recall,
)
from pipeline.models import judge_outputs


def score_samples(images: np.ndarray, cond: np.ndarray, colour_judge, digit_judge, ref: dict, *, k: int,
                  seed: int, batch_size: int, inception=None, inception_ref: dict | None = None,
                  balanced_ref: dict | None = None, meta: DatasetMeta = MNIST_META):
    """(overall metrics, per-class frame) for uint8 NHWC samples conditioned on `cond`; `meta` gives the number of
    attribute values and each class's bias-aligned value (Coloured MNIST: ten colours, digit y ↔ colour y)."""
    x = to_tensor(images)
    attr, _ = judge_outputs(colour_judge, x, batch_size)
    pred, feats = judge_outputs(digit_judge, x, batch_size)
    k, aligned_attr = meta.num_attributes, np.asarray(meta.aligned)  # class y's bias-aligned attribute value
    bias = bias_score(attr, cond, k)
    fd = fairness_discrepancy(attr, cond, k)
    al = aligned_fraction(attr, cond, aligned_attr)
    mu, sigma = feature_statistics(feats)
    rng = np.random.default_rng(seed)
    real = ref["features"][rng.permutation(len(ref["features"]))[: len(feats)]]
    pr = precision_recall(real.astype(np.float64), feats, k=k)
    metrics = {"bias_score": bias["bias_score"], "bias_score_normalised": bias["bias_score_normalised"],
               "fd": fd["fd"], "aligned_fraction": al["aligned_fraction"], "fidelity": fidelity(pred, cond),
               "fid_indomain": frechet_distance(mu, sigma, ref["mu"], ref["sigma"]),
               "precision": pr["precision"], "recall": pr["recall"], "num_samples": len(cond)}
    if balanced_ref is not None:
        metrics["fid_balanced"] = frechet_distance(mu, sigma, balanced_ref["mu"], balanced_ref["sigma"])
    if inception is not None:
        mu_i, sigma_i = feature_statistics(inception(images))
        metrics["fid_inception"] = frechet_distance(mu_i, sigma_i, inception_ref["mu"], inception_ref["sigma"])
    classes = sorted(bias["per_class"])
    per_class = pd.DataFrame({
        "condition": classes,
        "bias_score": [bias["per_class"][y] for y in classes],
        "fd": [fd["per_class"][y] for y in classes],
        "aligned_fraction": [al["per_class"][y] for y in classes],
        "fidelity": [float(np.mean(pred[cond == y] == y)) for y in classes],
    })
    return metrics, per_class


class Scorer:
    """The judges and reference statistics loaded once; `scorer(images, cond)` → (metrics, per-class frame)."""

    def __init__(self, judges_dir, reference_dir, *, device, k: int, seed: int, batch_size: int):
        from pathlib import Path

        from pipeline.io import load_json, load_npz
        from pipeline.metrics import InceptionFeatures
        from pipeline.models import load_judge

        judges_dir, reference_dir = Path(judges_dir), Path(reference_dir)
        self.meta = load_meta(reference_dir)  # fid_reference copies the prepared data's meta.json, if any
        self.colour = load_judge(judges_dir / "colour.safetensors", device)
        self.digit = load_judge(judges_dir / "digit.safetensors", device)
        self.ref = load_npz(reference_dir / "indomain.npz", "mu", "sigma", "features")
        self.balanced = load_npz(reference_dir / "balanced.npz", "mu", "sigma")
        self.inception = self.inception_ref = None
        if load_json(reference_dir / "summary.json")["inception"]:
            self.inception = InceptionFeatures(device=str(device))
            self.inception_ref = load_npz(reference_dir / "inception.npz", "mu", "sigma")
        self.k, self.seed, self.batch_size = k, seed, batch_size

    def __call__(self, images: np.ndarray, cond: np.ndarray):
        return score_samples(images, cond, self.colour, self.digit, self.ref, k=self.k, seed=self.seed,
                             batch_size=self.batch_size, inception=self.inception, inception_ref=self.inception_ref,
                             balanced_ref=self.balanced, meta=self.meta)
