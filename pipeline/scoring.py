"""Score a set of generated samples with the judges: the metrics of docs/metrics.md in one call, each with a 95%
interval (docs/metrics.md)."""

import numpy as np
import pandas as pd

from pipeline.data import MNIST_META, DatasetMeta, load_meta, to_tensor
from pipeline.errors import UserError
from pipeline.judges import judge_outputs
from pipeline.metrics import (
    attribute_samples,
    bootstrap_interval,
    count_statistics,
    counts_of,
    feature_statistics,
    frechet_distance,
    frechet_interval,
    precision_recall,
    wilson_interval,
)
from pipeline.seeds import key

# Each interval has its own random stream (pipeline/seeds.py), so adding a metric never moves another's interval.

# The per-class bias measures that come out of the count-table bootstrap, in per_class.parquet.
PER_CLASS_BOOTSTRAP = ("bias_score", "fd", "fd_unbiased", "bias_score_corrected", "aligned_fraction_corrected")
OVERALL_BOOTSTRAP = ("bias_score", "bias_score_normalised", "fd", "fd_unbiased", "bias_score_normalised_corrected",
                     "aligned_fraction_corrected")


def _class_counts(attr: np.ndarray, cond: np.ndarray, num_attr: int, num_classes: int) -> tuple[np.ndarray, ...]:
    """(classes present, counts [Y, K]) of the attribute predictions per condition."""
    ys = np.unique(cond)
    if ys.min() < 0 or ys.max() >= num_classes or attr.min() < 0 or attr.max() >= num_attr:
        raise ValueError(f"conditions must lie in [0, {num_classes}) and attributes in [0, {num_attr})")
    counts = np.stack([np.bincount(attr[cond == y], minlength=num_attr) for y in ys])
    return ys, counts


def bias_measures(counts: np.ndarray, aligned_attr: np.ndarray, confusion: np.ndarray | None, *,
                  n_resamples: int, seed: int) -> tuple[dict, dict]:
    """(overall {name: value}, per-class {name: [Y] values}) of count_statistics, and centred bootstrap
    intervals as '<name>_ci95' = [lo, hi] (overall) / '<name>_lo', '<name>_hi' (per class), resampling each
    class's samples (scipy.stats.bootstrap over the per-class attribute predictions)."""
    K, Y = counts.shape[1], len(counts)
    stats = count_statistics(counts, aligned_attr, confusion)
    overall = {k: float(v) for k, v in stats["overall"].items()}
    per = {k: np.asarray(v) for k, v in stats["per_class"].items()}
    per["fd_unbiased"] = np.sqrt(np.maximum(per.pop("fd_unbiased_squared"), 0.0))
    o_keys = [k for k in OVERALL_BOOTSTRAP if k in overall]
    p_keys = [k for k in PER_CLASS_BOOTSTRAP if k in per]

    def stat(*samples):
        s = count_statistics(counts_of(samples, K), aligned_attr, confusion)
        s["per_class"]["fd_unbiased"] = np.sqrt(np.maximum(s["per_class"]["fd_unbiased_squared"], 0.0))
        return np.concatenate([np.stack([s["overall"][k] for k in o_keys])]
                              + [np.moveaxis(s["per_class"][k], -1, 0) for k in p_keys])

    lo, hi = bootstrap_interval(attribute_samples(counts), stat, n_resamples=n_resamples,
                                  seed=key(seed, "bootstrap:counts"))
    for i, k in enumerate(o_keys):
        overall[f"{k}_ci95"] = [float(lo[i]), float(hi[i])]
    for j, k in enumerate(p_keys):
        sl = slice(len(o_keys) + j * Y, len(o_keys) + (j + 1) * Y)
        per[f"{k}_lo"], per[f"{k}_hi"] = lo[sl], hi[sl]
    return overall, per


def score_samples(images: np.ndarray, cond: np.ndarray, colour_judge, digit_judge, ref: dict, *, k: int,
                  seed: int, batch_size: int, inception=None, inception_ref: dict | None = None,
                  balanced_ref: dict | None = None, meta: DatasetMeta = MNIST_META,
                  attr_confusion: np.ndarray | None = None, bootstrap: int = 1000, bootstrap_fid: int = 100):
    """(overall metrics, per-class frame) for uint8 NHWC samples conditioned on `cond`; `meta` gives the number of
    attribute values and each class's bias-aligned value (Coloured MNIST: ten colours, digit y ↔ colour y).
    `k` is the k of the k-NN precision/recall; `attr_confusion` the attribute judge's confusion rates C[i, j] =
    P(says j | true i), for the judge-corrected bias; `bootstrap`/`bootstrap_fid` the resamples of the intervals.
    Every metric m comes with m_ci95 = [lo, hi] (docs/metrics.md)."""
    x = to_tensor(images)
    cond = np.asarray(cond).ravel()
    attr, _ = judge_outputs(colour_judge, x, batch_size)
    pred, feats = judge_outputs(digit_judge, x, batch_size)
    aligned_attr = np.asarray(meta.aligned)  # class y's bias-aligned attribute value
    classes, counts = _class_counts(attr, cond, meta.num_attributes, len(aligned_attr))
    n_class = counts.sum(1)
    if n_class.min() < 2:
        raise UserError(f"score: class {classes[n_class.argmin()]} has {n_class.min()} sample; the intervals and "
                        "fd_unbiased need at least 2 per class (sample.num_per_class)")
    overall, per = bias_measures(counts, aligned_attr[classes], attr_confusion, n_resamples=bootstrap, seed=seed)
    hits = counts[np.arange(len(classes)), aligned_attr[classes]]
    correct = np.array([int(np.sum(pred[cond == y] == y)) for y in classes])
    n = len(cond)
    metrics = {**overall,
               "aligned_fraction": float(hits.sum() / n), "aligned_fraction_ci95": wilson_interval(hits.sum(), n),
               "fidelity": float(correct.sum() / n), "fidelity_ci95": wilson_interval(correct.sum(), n)}
    mu, sigma = feature_statistics(feats)
    for name, r in (("fid_indomain", ref), ("fid_balanced", balanced_ref)):
        if r is not None:
            metrics[name] = frechet_distance(mu, sigma, r["mu"], r["sigma"])
            metrics[f"{name}_ci95"] = frechet_interval(feats, r["mu"], r["sigma"], n_resamples=bootstrap_fid,
                                                       seed=key(seed, f"bootstrap:{name}"))
    if inception is not None:
        feats_i = inception(images)
        mu_i, sigma_i = feature_statistics(feats_i)
        metrics["fid_inception"] = frechet_distance(mu_i, sigma_i, inception_ref["mu"], inception_ref["sigma"])
        metrics["fid_inception_ci95"] = frechet_interval(feats_i, inception_ref["mu"], inception_ref["sigma"],
                                                         n_resamples=bootstrap_fid,
                                                         seed=key(seed, "bootstrap:fid_inception"))
    rng = np.random.default_rng(seed)
    real = ref["features"][rng.permutation(len(ref["features"]))[: len(feats)]]
    pr = precision_recall(real.astype(np.float64), feats, k=k, indicators=True)
    for name in ("precision", "recall"):
        hit = pr[f"{name}_indicators"]
        metrics[name], metrics[f"{name}_ci95"] = pr[name], wilson_interval(int(hit.sum()), len(hit))
    metrics["num_samples"] = n
    table = {"condition": classes, "num_samples": n_class}
    for name in ("bias_score", "fd", "fd_unbiased"):
        table.update({name: per[name], f"{name}_lo": per[f"{name}_lo"], f"{name}_hi": per[f"{name}_hi"]})
    for name, succ in (("aligned_fraction", hits), ("fidelity", correct)):
        ci = np.array([wilson_interval(s, m) for s, m in zip(succ, n_class, strict=True)])
        table.update({name: succ / n_class, f"{name}_lo": ci[:, 0], f"{name}_hi": ci[:, 1]})
    for name in ("bias_score_corrected", "aligned_fraction_corrected"):
        if name in per:
            table.update({name: per[name], f"{name}_lo": per[f"{name}_lo"], f"{name}_hi": per[f"{name}_hi"]})
    table.update({f"count_attr_{a}": counts[:, a] for a in range(counts.shape[1])})  # for the report's bootstraps
    return metrics, pd.DataFrame(table)


class Scorer:
    """The judges and reference statistics loaded once; `scorer(images, cond)` → (metrics, per-class frame)."""

    def __init__(self, judges_dir, reference_dir, *, device, k: int, seed: int, batch_size: int,
                 bootstrap: int = 1000, bootstrap_fid: int = 100):
        from pathlib import Path

        from pipeline.io import load_json, load_npz
        from pipeline.judges import load_judge
        from pipeline.metrics import InceptionFeatures, confusion_rates

        judges_dir, reference_dir = Path(judges_dir), Path(reference_dir)
        self.meta = load_meta(reference_dir)  # fid_reference copies the prepared data's meta.json, if any
        self.colour = load_judge(judges_dir / "colour.safetensors", device)
        self.digit = load_judge(judges_dir / "digit.safetensors", device)
        confusion = load_json(judges_dir / "confusion.json")
        counts = np.asarray(confusion.get("colour", []), dtype=np.int64)
        if counts.shape != (self.meta.num_attributes,) * 2:
            raise UserError(f"{judges_dir / 'confusion.json'}: 'colour' must be a {self.meta.num_attributes}×"
                            f"{self.meta.num_attributes} count matrix (re-run train_classifiers)")
        self.attr_confusion = confusion_rates(counts)
        self.ref = load_npz(reference_dir / "indomain.npz", "mu", "sigma", "features")
        self.balanced = load_npz(reference_dir / "balanced.npz", "mu", "sigma")
        self.inception = self.inception_ref = None
        if load_json(reference_dir / "summary.json")["inception"]:
            self.inception = InceptionFeatures(device=str(device))
            self.inception_ref = load_npz(reference_dir / "inception.npz", "mu", "sigma")
        self.k, self.seed, self.batch_size = k, seed, batch_size
        self.bootstrap, self.bootstrap_fid = bootstrap, bootstrap_fid

    def __call__(self, images: np.ndarray, cond: np.ndarray):
        return score_samples(images, cond, self.colour, self.digit, self.ref, k=self.k, seed=self.seed,
                             batch_size=self.batch_size, inception=self.inception, inception_ref=self.inception_ref,
                             balanced_ref=self.balanced, meta=self.meta, attr_confusion=self.attr_confusion,
                             bootstrap=self.bootstrap, bootstrap_fid=self.bootstrap_fid)
