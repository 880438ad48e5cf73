"""The scoring entry point (score_samples, Scorer) against independent references, and the interval, floor and
judge-error measures of docs/metrics.md on synthetic cases with known answers."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from pipeline import metrics
from pipeline.data import MNIST_META, DatasetMeta
from pipeline.report import per_class_counts
from pipeline.scoring import Scorer, score_samples
from tests.test_metrics import brute_precision_recall


def encode(n: int) -> np.ndarray:
    """uint8 images [n, 4, 4, 3] whose first pixel spells the image's index (for the stub judges)."""
    images = np.zeros((n, 4, 4, 3), np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
    return images


class StubJudge(nn.Module):
    """A judge with known answers: image i (see `encode`) has features table[i] and predicted label labels[i]."""

    def __init__(self, table: np.ndarray, labels: np.ndarray, num_outputs: int):
        super().__init__()
        self.table = torch.as_tensor(table, dtype=torch.float64)
        self.labels, self.num_outputs = torch.as_tensor(labels), num_outputs
        self.anchor = nn.Parameter(torch.zeros(1))  # judge_outputs reads the device off a parameter

    def features(self, x: torch.Tensor) -> torch.Tensor:
        v = ((x[:, :2, 0, 0] + 1) * 127.5).round().long()
        return self.table[v[:, 0] + 256 * v[:, 1]]

    def head(self, f: torch.Tensor) -> torch.Tensor:
        idx = torch.cdist(f, self.table).argmin(1)  # the rows of the table are distinct
        return nn.functional.one_hot(self.labels[idx], self.num_outputs).double()


def double_loop_bias(counts: np.ndarray) -> float:
    K = len(counts)
    return sum(abs(counts[i] - counts[j]) for i in range(K) for j in range(i + 1, K)) / counts.sum() / (K * (K - 1) / 2)


@pytest.fixture(scope="module")
def case():
    """60 samples (6 per class) with known colours, digit predictions and features; real references."""
    rng = np.random.default_rng(0)
    n, d = 60, 5
    cond = np.repeat(np.arange(10), 6)
    attr = np.where(rng.random(n) < 0.6, cond, rng.integers(0, 10, n))
    pred = np.where(rng.random(n) < 0.8, cond, rng.integers(0, 10, n))
    feats = rng.normal(0.3, 1.2, (n, d))
    real = rng.normal(size=(90, d))
    bal = rng.normal(0.5, 1.0, (80, d))
    mu, sigma = metrics.feature_statistics(real)
    mu_b, sigma_b = metrics.feature_statistics(bal)
    ref = {"mu": mu, "sigma": sigma, "features": real}
    return {"cond": cond, "attr": attr, "pred": pred, "feats": feats, "ref": ref,
            "balanced": {"mu": mu_b, "sigma": sigma_b}, "images": encode(n),
            "colour": StubJudge(feats + 100.0, attr, 10), "digit": StubJudge(feats, pred, 10)}


def run(case, k, **kw):
    return score_samples(case["images"], case["cond"], case["colour"], case["digit"], case["ref"], k=k, seed=3,
                         batch_size=16, balanced_ref=case["balanced"], bootstrap=200, bootstrap_fid=40, **kw)


@pytest.mark.parametrize("k", [1, 5])
def test_score_samples_uses_pr_k(case, k):
    """score.pr_k reaches precision/recall (it was overwritten by the number of attributes)."""
    got, _ = run(case, k)
    real = case["ref"]["features"][np.random.default_rng(3).permutation(90)[:60]]
    p, r = brute_precision_recall(real, case["feats"], k)
    assert (got["precision"], got["recall"]) == (pytest.approx(p), pytest.approx(r))
    assert (got["precision"], got["recall"]) != pytest.approx(brute_precision_recall(real, case["feats"], 10))
    for name, v in (("precision", p), ("recall", r)):
        assert got[f"{name}_ci95"] == pytest.approx(metrics.wilson_interval(round(v * 60), 60))


def test_score_samples_values_and_intervals(case):
    got, table = run(case, 3)
    cond, attr, pred = case["cond"], case["attr"], case["pred"]
    mu, sigma = metrics.feature_statistics(case["feats"])
    assert got["fid_balanced"] == pytest.approx(metrics.frechet_distance(mu, sigma, case["balanced"]["mu"],
                                                                         case["balanced"]["sigma"]))
    assert got["fid_indomain"] == pytest.approx(metrics.frechet_distance(mu, sigma, case["ref"]["mu"],
                                                                         case["ref"]["sigma"]))
    assert got["fid_balanced"] != pytest.approx(got["fid_indomain"])
    counts = np.stack([np.bincount(attr[cond == y], minlength=10) for y in range(10)])
    per_bias = [double_loop_bias(c) for c in counts]
    assert got["bias_score"] == pytest.approx(np.mean(per_bias))
    assert got["aligned_fraction"] == pytest.approx(np.mean(attr == cond))
    assert got["fidelity"] == pytest.approx(np.mean(pred == cond))
    assert got["aligned_fraction_ci95"] == pytest.approx(metrics.wilson_interval(int((attr == cond).sum()), 60))
    for key in ["bias_score", "bias_score_normalised", "fd", "fd_unbiased", "aligned_fraction", "fidelity",
                "fid_indomain", "fid_balanced", "precision", "recall"]:
        lo, hi = got[f"{key}_ci95"]
        assert lo < hi, key  # none of these is degenerate in this case
        assert lo <= got[key] <= hi, key
    # the per-class table: values against the double loop / direct counts, Wilson bounds, the count table
    assert table["condition"].tolist() == list(range(10))
    assert table["bias_score"].to_numpy() == pytest.approx(per_bias)
    assert table["aligned_fraction"].to_numpy() == pytest.approx([np.mean(attr[cond == y] == y) for y in range(10)])
    assert table["fidelity"].to_numpy() == pytest.approx([np.mean(pred[cond == y] == y) for y in range(10)])
    y = 4
    assert [table["fidelity_lo"][y], table["fidelity_hi"][y]] == pytest.approx(
        metrics.wilson_interval(int((pred[cond == y] == y).sum()), 6))
    assert (table["bias_score_lo"] <= table["bias_score_hi"]).all()
    assert (per_class_counts(table) == counts).all()
    # seeded: the same call gives the same intervals
    assert run(case, 3)[0] == got


def test_score_samples_non_mnist_aligned_map():
    """Three classes, two attribute values, class y aligned with attribute (1, 0, 1)[y]."""
    meta = DatasetMeta("folder", ("a", "b", "c"), ("x", "z"), (1, 0, 1))
    cond = np.repeat([0, 1, 2], 8)
    attr = np.array([1] * 6 + [0] * 2 + [0] * 8 + [0] * 4 + [1] * 4)
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(24, 3))
    ref = {"mu": feats.mean(0), "sigma": np.cov(feats.T), "features": rng.normal(size=(30, 3))}
    got, table = score_samples(encode(24), cond, StubJudge(feats + 50, attr, 2), StubJudge(feats, cond, 3), ref,
                               k=2, seed=0, batch_size=8, meta=meta, bootstrap=100, bootstrap_fid=20)
    assert got["aligned_fraction"] == pytest.approx((6 + 8 + 4) / 24)
    assert table["aligned_fraction"].tolist() == pytest.approx([6 / 8, 1.0, 0.5])
    # K = 2: bias_y = |c_0 − c_1| / n_y; normalised by 2/K = 1
    assert table["bias_score"].tolist() == pytest.approx([4 / 8, 1.0, 0.0])
    assert got["bias_score_normalised"] == pytest.approx(0.5)
    assert got["fidelity"] == 1.0 and "fid_balanced" not in got


def test_scorer_loads_and_passes_k(tmp_path):
    """Scorer (the stages' entry point) with saved judges: precision/recall follow its k, corrected keys present."""
    from pipeline.data import to_tensor
    from pipeline.io import save_json, save_npz
    from pipeline.judges import Judge, judge_outputs, load_judge, save_judge

    torch.manual_seed(0)
    for name in ("colour", "digit"):
        save_judge(Judge(10, width=4), tmp_path / f"{name}.safetensors")
    confusion = (np.eye(10) * 9 + 1).astype(int)
    save_json(tmp_path / "confusion.json", {"split": "test", "colour": confusion.tolist(), "digit": confusion.tolist()})
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    cond = np.repeat(np.arange(10), 4)
    _, feats = judge_outputs(load_judge(tmp_path / "digit.safetensors"), to_tensor(images))
    real = feats + rng.normal(0, 0.05, feats.shape)
    mu, sigma = metrics.feature_statistics(real)
    save_npz(tmp_path / "indomain.npz", mu=mu, sigma=sigma, features=real)
    save_npz(tmp_path / "balanced.npz", mu=mu + 1, sigma=sigma)
    save_json(tmp_path / "summary.json", {"inception": False})
    for k in (1, 4):
        scorer = Scorer(tmp_path, tmp_path, device="cpu", k=k, seed=0, batch_size=16, bootstrap=50,
                        bootstrap_fid=20)
        got, _ = scorer(images, cond)
        ref = real[np.random.default_rng(0).permutation(40)]
        assert (got["precision"], got["recall"]) == pytest.approx(brute_precision_recall(ref, feats, k))
        assert "bias_score_normalised_corrected_ci95" in got and "fid_balanced_ci95" in got


def test_scorer_rejects_a_bad_confusion_file(tmp_path):
    from pipeline.errors import UserError
    from pipeline.judges import Judge, save_judge

    for name in ("colour", "digit"):
        save_judge(Judge(10, width=4), tmp_path / f"{name}.safetensors")
    (tmp_path / "confusion.json").write_text(json.dumps({"colour": [[1, 0], [0, 1]]}))
    with pytest.raises(UserError, match="confusion.json"):
        Scorer(tmp_path, tmp_path, device="cpu", k=1, seed=0, batch_size=16)


# ------------------------------------------------------------------------------------------------ the new measures

def test_bootstrap_coverage_on_a_known_mean():
    """~95% of seeded centred-bootstrap intervals of a skewed sample's mean cover the true mean."""
    hits, repeats = 0, 300
    for i in range(repeats):
        x = np.random.default_rng([7, i]).exponential(2.0, 60)  # true mean 2
        lo, hi = metrics.bootstrap_interval((x,), lambda a: a.mean(-1), n_resamples=400, seed=i)
        hits += lo <= 2.0 <= hi
    assert 0.90 <= hits / repeats <= 0.98  # bootstrap intervals run a little short at n = 60


def test_bootstrap_coverage_of_the_bias_score():
    """The bias score's interval covers its expected value at this n (what methods are compared on; the
    population value sits far below it, docs/metrics.md) in ~95% of repeats."""
    K, n, p = 5, 40, np.array([0.6, 0.1, 0.1, 0.1, 0.1])
    rng = np.random.default_rng(0)
    expected = np.mean([metrics.bias_rows(rng.multinomial(n, p, (K,))).mean() for _ in range(20000)])

    def stat(*s):
        return metrics.bias_rows(metrics.counts_of(s, K)).mean(-1)

    hits = 0
    for i in range(200):
        counts = np.random.default_rng([3, i]).multinomial(n, p, (K,))
        lo, hi = metrics.bootstrap_interval(metrics.attribute_samples(counts), stat, n_resamples=300, seed=i)
        hits += lo <= expected <= hi
    assert 0.90 <= hits / 200 <= 0.99


def test_wilson_interval_formula():
    s, n, z = 7, 40, 1.959963984540054
    p = s / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (
        1 + z * z / n)
    assert metrics.wilson_interval(s, n) == pytest.approx([centre - half, centre + half])


def test_fd_unbiased_on_uniform_and_skewed_draws():
    rng = np.random.default_rng(0)
    uniform = rng.multinomial(100, np.full(10, 0.1), 4000)
    d2 = metrics.fd_unbiased_squared(uniform)
    raw = metrics.count_statistics(uniform, np.zeros(4000, int))["per_class"]["fd"] ** 2
    assert raw.mean() == pytest.approx(0.9 / 100, rel=0.05)  # the multinomial term: (1 − Σ p²)/n
    assert abs(d2.mean()) < 4 * d2.std() / np.sqrt(len(d2)) and abs(d2.mean()) < raw.mean() / 30
    p = np.array([0.5, 0.3, 0.2])
    d2 = metrics.fd_unbiased_squared(rng.multinomial(20, p, 20000))
    assert d2.mean() == pytest.approx(((p - 1 / 3) ** 2).sum(), abs=4 * d2.std() / np.sqrt(len(d2)))


def test_confusion_correction_recovers_the_distribution():
    """A simulated 80%-accurate judge: its confusion, measured on balanced held-out draws, undoes its error."""
    rng = np.random.default_rng(0)
    K = 4
    true_c = np.full((K, K), 0.2 / (K - 1)) + np.eye(K) * (0.8 - 0.2 / (K - 1))
    true_c[0] = [0.8, 0.15, 0.05, 0.0]  # rows need not be symmetric

    def judge(labels):
        return np.array([rng.choice(K, p=true_c[a]) for a in labels])

    held_out = np.repeat(np.arange(K), 5000)
    c_hat = metrics.confusion_rates(metrics.confusion_matrix(held_out, judge(held_out), K))
    assert np.abs(c_hat - true_c).max() < 0.02
    q = np.array([0.7, 0.2, 0.1, 0.0])
    said = judge(rng.choice(K, 40000, p=q))
    p_hat = np.bincount(said, minlength=K) / len(said)
    corrected = metrics.correct_distribution(p_hat, c_hat)
    assert np.abs(p_hat - q).max() > 0.1  # the raw estimate is badly off
    assert corrected == pytest.approx(q, abs=0.02) and corrected.min() >= 0 and corrected.sum() == pytest.approx(1)
    assert metrics.correct_distribution(p_hat, np.eye(K)) == pytest.approx(p_hat)


def test_frechet_to_reference_matches_frechet_distance():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(200, 6)), rng.normal(0.4, 1.3, size=(150, 6))
    mu, sigma = metrics.feature_statistics(b)
    exact = metrics.frechet_distance(*metrics.feature_statistics(a), mu, sigma)
    fast = metrics.frechet_to_reference(a, mu, metrics._psd_sqrt(sigma), float(np.trace(sigma)))
    assert fast == pytest.approx(exact, rel=1e-8)


def test_bias_removed():
    rng = np.random.default_rng(0)
    n, K = 100, 10
    base = np.stack([rng.multinomial(n, np.where(np.arange(K) == y, 0.9, 0.1 / 9)) for y in range(K)])
    fair = rng.multinomial(n, np.full(K, 0.1), K)
    floor = metrics.bias_floor([n] * K, K)
    assert floor == pytest.approx(metrics.uniform_bias_floor(n, K))
    same, ci_same = metrics.bias_removed(base, base, floor, n_resamples=300, seed=0)
    assert same == 0.0 and ci_same[0] < 0 < ci_same[1]
    half = np.stack([rng.multinomial(n, np.where(np.arange(K) == y, 0.5, 0.5 / 9)) for y in range(K)])
    removed, ci = metrics.bias_removed(base, half, floor, n_resamples=300, seed=0)
    assert 0.4 < removed < 0.6 and ci[0] <= removed <= ci[1] and ci[1] - ci[0] < 0.2
    removed, ci = metrics.bias_removed(base, fair, floor, n_resamples=300, seed=0)  # a fair method: ≈ 1
    assert removed == pytest.approx(1.0, abs=0.1) and ci[0] <= removed <= ci[1] and ci[0] > 0.7


def test_count_statistics_with_identity_confusion_equal_raw():
    counts = np.array([[5, 1, 0], [2, 2, 2]])
    s = metrics.count_statistics(counts, np.array([0, 1]), np.eye(3))["overall"]
    assert s["bias_score_normalised_corrected"] == pytest.approx(s["bias_score_normalised"])
    assert s["aligned_fraction_corrected"] == pytest.approx(s["aligned_fraction"])
    assert MNIST_META.num_attributes == 10


def test_report_marks_overlaps_and_adds_bias_removed():
    from pipeline.report import add_bias_removed, render_markdown

    rng = np.random.default_rng(0)
    base_counts = np.stack([rng.multinomial(50, np.where(np.arange(10) == y, 0.9, 0.1 / 9)) for y in range(10)])
    rows = [{"method": "baseline", "fid_balanced": 5.0, "fid_balanced_ci95": [4.0, 6.0]},
            {"method": "close", "fid_balanced": 5.5, "fid_balanced_ci95": [5.2, 5.9]},
            {"method": "far", "fid_balanced": 9.0, "fid_balanced_ci95": [8.0, 10.0]}]
    add_bias_removed(rows, {"baseline": base_counts, "close": base_counts,
                            "far": rng.multinomial(50, np.full(10, 0.1), 10)}, seed=0, n_resamples=200)
    assert "bias_removed" not in rows[0] and rows[1]["bias_removed"] == 0.0 and rows[2]["bias_removed"] > 0.8
    md = render_markdown(rows, data_bias={}, judges={}, grids={}, scatter="s.png",
                         context={"resolution": 16, "bias_ratio": 0.95, "num_per_class": 50, "scheduler": "ddim",
                                  "num_inference_steps": 5, "guidance_scale": 1.0, "fid_real_splits": 12.5})
    lines = {line.split(" |")[0]: line for line in md.splitlines() if line.startswith("| ")}
    assert "5.500 [5.200, 5.900] ≈" in lines["| close"] and "9.000 [8.000, 10.000] |" in lines["| far"]
    assert "5.000 [4.000, 6.000] |" in lines["| baseline"] and "12.500" in md


def test_report_cell_prints_an_interval_that_rounds_to_zero_without_a_sign():
    from pipeline.report import cell

    row = {"aligned_fraction_corrected": 0.0, "aligned_fraction_corrected_ci95": [-1e-9, 4e-4]}
    assert cell(row, "aligned_fraction_corrected") == "0.000 [0.000, 0.000]"
    assert cell({"x": -0.25, "x_ci95": [-0.5, -0.1]}, "x") == "-0.250 [-0.500, -0.100]"
