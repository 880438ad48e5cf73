"""Real-world datasets (Waterbirds, CelebA, FairFace, a generic image folder) → the prepared-split format.

Each adapter reads one published layout into a `RawDataset`: a table of image files with an integer class,
an integer bias attribute and a split (train / judge / test), plus the label names. `prepare_real` then
optionally re-balances the training split to a chosen bias ratio, caps each split, decodes the images
(Pillow: RGB, centre crop to a square, bicubic resize) and returns what `stages.prepare_data` writes:
{split: uint8 [N,R,R,3]}, the labels frame (split, index, class, bias, aligned, file[, caption]) and meta.json.

"Aligned": class y's aligned attribute value is `aligned[y]` — set by the `data.aligned` param, else fixed by
the dataset's construction (Waterbirds: landbird ↔ land, waterbird ↔ water), else the most frequent
attribute value of class y in the training split (ties → the lower index). An image is bias-aligned when its
attribute equals its class's aligned value.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import UserError

FORMATS = ("waterbirds", "celeba", "fairface", "folder")
WATERBIRDS_CLASSES = ("landbird", "waterbird")
WATERBIRDS_PLACES = ("land", "water")
CELEBA_IMAGES = "img_align_celeba"
# FairFace's published label sets (fairface_label_{train,val}.csv), in the order used as label indices.
FAIRFACE_LABELS = {
    "gender": ("Male", "Female"),
    "race": ("White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern"),
    "age": ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70"),
}
FOLDER_SPLITS = {"train": "train", "val": "judge", "judge": "judge", "test": "test"}


@dataclass(frozen=True)
class RawDataset:
    """A dataset's index before decoding: frame columns file (as listed), path, class, bias, split[, caption]."""

    frame: pd.DataFrame
    class_names: tuple[str, ...]
    attr_names: tuple[str, ...]
    aligned: tuple[int, ...] | None = None  # fixed by the dataset's construction; None = majority in train


# ---------------------------------------------------------------- reading helpers


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def read_table(path: Path, required: dict[str, str]) -> pd.DataFrame:
    """Read a CSV as strings; `required` maps each needed column to what named it (for the error message)."""
    if not path.is_file():
        raise UserError(f"{path}: metadata file not found")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except Exception as exc:  # pandas' ParserError, UnicodeDecodeError, EmptyDataError
        raise UserError(f"{path}: not a readable CSV file ({_one_line(exc)})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    for column, named_by in required.items():
        if column not in frame.columns:
            raise UserError(f"{path}: no column {column!r} ({named_by}; columns: {', '.join(frame.columns)})")
    if frame.empty:
        raise UserError(f"{path}: no rows")
    return frame


def encode(values: pd.Series, declared: dict[str, object], path: Path, column: str, first_line: int = 2):
    """Map each string of `values` through `declared`; the first value outside it is a UserError naming its
    line (`first_line`: the file line of values[0], 2 for a CSV under its header)."""
    stripped = values.str.strip()
    bad = ~stripped.isin(list(declared))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise UserError(f"{path}: line {row + first_line}: {column} {values.iloc[row]!r} is not one of the declared "
                        "values "
                        f"{list(declared)}")
    return stripped.map(declared).to_numpy()


def _natural_sorted(values) -> list[str]:
    values = sorted(set(values))
    if all(v.lstrip("-").isdigit() for v in values):
        return sorted(values, key=int)
    return values


def _frame(files, paths, classes, bias, split, caption=None) -> pd.DataFrame:
    out = pd.DataFrame({"file": list(files), "path": [str(p) for p in paths],
                        "class": np.asarray(classes, np.int64), "bias": np.asarray(bias, np.int64),
                        "split": list(split)})
    if caption is not None:
        out["caption"] = list(caption)
    return out


# ---------------------------------------------------------------- adapters


def read_waterbirds(root: Path) -> RawDataset:
    """Waterbirds (Sagawa et al. 2020): metadata.csv with img_filename, y (0 landbird / 1 waterbird),
    split (0 train / 1 val → judge / 2 test), place (0 land / 1 water); images at root/img_filename."""
    path = root / "metadata.csv"
    need = dict.fromkeys(("img_filename", "y", "split", "place"), "Waterbirds metadata")
    df = read_table(path, need)
    y = encode(df["y"], {"0": 0, "1": 1}, path, "y")
    place = encode(df["place"], {"0": 0, "1": 1}, path, "place")
    split = encode(df["split"], {"0": "train", "1": "judge", "2": "test"}, path, "split")
    files = df["img_filename"].str.strip()
    return RawDataset(_frame(files, [root / f for f in files], y, place, split),
                      WATERBIRDS_CLASSES, WATERBIRDS_PLACES, aligned=(0, 1))


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"{path}: metadata file not found")
    try:
        return [line for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({_one_line(exc)})") from None


def read_celeba(root: Path, target_attr: str, bias_attr: str) -> RawDataset:
    """CelebA (aligned & cropped): list_attr_celeba.txt (line 1 the image count, line 2 the 40 attribute
    names, then `filename ±1 ...`), list_eval_partition.txt (`filename 0|1|2` = train / val → judge / test),
    images in img_align_celeba/. Class = target_attr (−1 → 0, 1 → 1), bias = bias_attr likewise."""
    attr_path, part_path = root / "list_attr_celeba.txt", root / "list_eval_partition.txt"
    lines = _read_lines(attr_path)
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise UserError(f"{attr_path}: line 1 must be the number of images")
    names = lines[1].split()
    for key, name in (("data.target_attr", target_attr), ("data.bias_attr", bias_attr)):
        if name not in names:
            raise UserError(f"{key}: unknown CelebA attribute {name!r} (not in {attr_path}; e.g. {names[:3]})")
    count, rows = int(lines[0]), lines[2:]
    if len(rows) != count:
        raise UserError(f"{attr_path}: line 1 says {count} images but {len(rows)} rows follow")
    cols = (names.index(target_attr) + 1, names.index(bias_attr) + 1)
    files, values = [], []
    for i, line in enumerate(rows):
        parts = line.split()
        if len(parts) != len(names) + 1:
            raise UserError(f"{attr_path}: line {i + 3}: expected a filename and {len(names)} values, "
                            f"got {len(parts)} fields")
        files.append(parts[0])
        values.append((parts[cols[0]], parts[cols[1]]))
    values = np.array(values)
    sign = {"-1": 0, "1": 1}
    y = encode(pd.Series(values[:, 0]), sign, attr_path, target_attr, first_line=3)
    b = encode(pd.Series(values[:, 1]), sign, attr_path, bias_attr, first_line=3)
    partition = {}
    for i, line in enumerate(_read_lines(part_path)):
        parts = line.split()
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise UserError(f"{part_path}: line {i + 1}: expected `filename 0|1|2`, got {line.strip()!r}")
        partition[parts[0]] = ("train", "judge", "test")[int(parts[1])]
    missing = [f for f in files if f not in partition]
    if missing:
        raise UserError(f"{part_path}: no split for {missing[0]} ({len(missing)} images of {attr_path.name} lack one)")
    return RawDataset(_frame(files, [root / CELEBA_IMAGES / f for f in files], y, b, [partition[f] for f in files]),
                      (f"not {target_attr}", target_attr), (f"not {bias_attr}", bias_attr))


def read_fairface(root: Path, target_attr: str, bias_attr: str, class_names, attr_names, seed: int) -> RawDataset:
    """FairFace: fairface_label_train.csv and fairface_label_val.csv (file, age, gender, race, service_test),
    `file` relative to root (train/1.jpg). Class and attribute are columns whose labels must lie in the declared
    lists (default: FairFace's published sets). Train → train; val is split in two at random (seeded): the first
    half the judge split, the rest the test split."""
    tables = {}
    for name in ("fairface_label_train.csv", "fairface_label_val.csv"):
        tables[name] = read_table(root / name, {"file": "FairFace labels", target_attr: "data.target_attr",
                                                bias_attr: "data.bias_attr"})
    declared = {}
    for key, column, names in (("data.class_names", target_attr, class_names),
                               ("data.attr_names", bias_attr, attr_names)):
        names = names or FAIRFACE_LABELS.get(column)
        if names is None:
            raise UserError(f"{key}: FairFace column {column!r} has no published label set; list its values")
        declared[column] = tuple(names)
    frames = []
    for name, split in (("fairface_label_train.csv", "train"), ("fairface_label_val.csv", "val")):
        path, df = root / name, tables[name]
        y = encode(df[target_attr], {v: i for i, v in enumerate(declared[target_attr])}, path, target_attr)
        b = encode(df[bias_attr], {v: i for i, v in enumerate(declared[bias_attr])}, path, bias_attr)
        if split == "val":
            order = np.random.default_rng(seed).permutation(len(df))
            split = np.where(np.argsort(order) < len(df) // 2, "judge", "test")
        else:
            split = ["train"] * len(df)
        files = df["file"].str.strip()
        frames.append(_frame(files, [root / f for f in files], y, b, split))
    return RawDataset(pd.concat(frames, ignore_index=True), declared[target_attr], declared[bias_attr])


def read_folder(root: Path, target_attr: str, bias_attr: str, class_names, attr_names, *, seed: int,
                n_judge: int, n_test: int) -> RawDataset:
    """A generic folder: root/metadata.csv with columns file, class [, attribute, split, caption]; `file`
    relative to root. Labels are strings; their index is their position in data.class_names / attr_names, or
    in sorted order (numeric when all are integers) when those are null. No attribute column: one attribute
    value "none". split ∈ train | val | judge | test (val = judge); no split column: a seeded permutation gives
    n_test test images, then n_judge judge images, the rest train."""
    path = root / "metadata.csv"
    df = read_table(path, {"file": "folder metadata", target_attr: "data.target_attr"})
    has_attr = bias_attr in df.columns
    if not has_attr and attr_names:
        raise UserError(f"{path}: data.attr_names is set but the file has no {bias_attr!r} column")
    classes = tuple(class_names) if class_names else tuple(_natural_sorted(df[target_attr].str.strip()))
    attrs = tuple(attr_names) if attr_names else (
        tuple(_natural_sorted(df[bias_attr].str.strip())) if has_attr else ("none",))
    y = encode(df[target_attr], {v: i for i, v in enumerate(classes)}, path, target_attr)
    b = encode(df[bias_attr], {v: i for i, v in enumerate(attrs)}, path, bias_attr) if has_attr else np.zeros(len(df))
    if "split" in df.columns:
        split = encode(df["split"], FOLDER_SPLITS, path, "split")
    else:
        if n_test + n_judge >= len(df):
            raise UserError(f"{path}: {len(df)} rows cannot give data.n_test + data.n_judge = {n_test + n_judge} "
                            "held-out images and a training split (add a split column or lower them)")
        rank = np.argsort(np.random.default_rng(seed).permutation(len(df)))
        split = np.where(rank < n_test, "test", np.where(rank < n_test + n_judge, "judge", "train"))
    files = df["file"].str.strip()
    caption = df["caption"] if "caption" in df.columns else None
    return RawDataset(_frame(files, [root / f for f in files], y, b, split, caption), classes, attrs)


def read_dataset(fmt: str, root: str | Path, *, target_attr: str | None, bias_attr: str | None,
                 class_names=None, attr_names=None, seed: int = 0, n_judge: int = 0, n_test: int = 0) -> RawDataset:
    """Dispatch on data.format; null target_attr / bias_attr take the format's default columns."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data.source: {root} is not a directory (the {fmt} dataset's root)")
    if fmt == "waterbirds":
        return read_waterbirds(root)
    if fmt == "celeba":
        return read_celeba(root, target_attr or "Blond_Hair", bias_attr or "Male")
    if fmt == "fairface":
        return read_fairface(root, target_attr or "gender", bias_attr or "race", class_names, attr_names, seed)
    if fmt == "folder":
        return read_folder(root, target_attr or "class", bias_attr or "attribute", class_names, attr_names,
                           seed=seed, n_judge=n_judge, n_test=n_test)
    raise UserError(f"data.format: {fmt!r} is not one of {FORMATS}")


# ---------------------------------------------------------------- images


def load_image(path: str | Path, resolution: int) -> np.ndarray:
    """Decode one image to uint8 [R,R,3]: RGB, centre crop to the shorter side, bicubic resize to R×R."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")  # forces the full decode: truncated files fail here
    except FileNotFoundError:
        raise UserError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{path}: cannot decode image ({_one_line(exc)})") from None
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    im = im.crop((left, top, left + s, top + s)).resize((resolution, resolution), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


def load_images(paths, resolution: int) -> np.ndarray:
    """Decode every path (the first missing file is reported with the count of missing ones, before decoding)."""
    paths = list(paths)
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise UserError(f"{missing[0]}: image file not found ({len(missing)} of {len(paths)} listed are missing)")
    out = np.empty((len(paths), resolution, resolution, 3), np.uint8)
    for i, p in enumerate(paths):
        out[i] = load_image(p, resolution)
    return out


# ---------------------------------------------------------------- bias ratio


def majority_attributes(classes: np.ndarray, bias: np.ndarray, num_classes: int, num_attrs: int) -> tuple[int, ...]:
    """Per class, its most frequent attribute value (ties → the lower index; a class with no images → 0)."""
    table = np.zeros((num_classes, num_attrs), np.int64)
    np.add.at(table, (classes, bias), 1)
    return tuple(int(v) for v in table.argmax(1))


def even_allocation(available: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """Split m draws over pools of the given sizes as evenly as the sizes allow (water-filling; the last
    unequal units go to randomly chosen pools). Requires m ≤ available.sum()."""
    alloc = np.zeros(len(available), np.int64)
    remaining = m
    while remaining > 0:
        open_ = np.flatnonzero(alloc < available)
        share = remaining // len(open_)
        if share == 0:
            alloc[rng.permutation(open_)[:remaining]] += 1
            break
        add = np.minimum(share, available[open_] - alloc[open_])
        alloc[open_] += add
        remaining -= int(add.sum())
    return alloc


def _ratio_counts(ratio: float, n_aligned: int, n_conflicting: int) -> int:
    """Largest n with round(ratio·n) ≤ n_aligned and n − round(ratio·n) ≤ n_conflicting."""
    n = n_aligned + n_conflicting
    if ratio > 0:
        n = min(n, int(np.floor((n_aligned + 0.5) / ratio)) + 1)
    if ratio < 1:
        n = min(n, int(np.floor((n_conflicting + 0.5) / (1 - ratio))) + 1)
    while n > 0 and (round(ratio * n) > n_aligned or n - round(ratio * n) > n_conflicting):
        n -= 1
    return n


def _exact_size(n: int, ratio: float) -> int:
    """The size n' in (n − q, n] whose round(ratio·n')/n' is closest to ratio (ties → the larger), q being the
    denominator of ratio as a fraction (denominator ≤ 100): exactness costs fewer than q images."""
    q = Fraction(ratio).limit_denominator(100).denominator
    best = n
    for m in range(n - 1, max(n - q, 0), -1):
        if abs(round(ratio * m) / m - ratio) < abs(round(ratio * best) / best - ratio) - 1e-12:
            best = m
    return best


def rebalance(classes: np.ndarray, bias: np.ndarray, aligned: tuple[int, ...], num_attrs: int, ratio: float,
              n_max: int, rng: np.random.Generator, class_names=None) -> np.ndarray:
    """Indices (sorted) of a subset where, per class y, exactly round(ρ·n_y) images carry the aligned value
    aligned[y] and the other n_y − round(ρ·n_y) are spread as evenly as possible over the other values.
    n_y is the largest the class's images allow at ratio ρ, all n_y are scaled down together (largest
    remainder) so that Σ n_y ≤ n_max, then each is lowered by less than q (ρ's denominator) where that makes
    ρ·n_y whole, so the ratio is hit exactly where possible. A class that cannot contribute both kinds of
    image is a UserError."""
    names = class_names or [str(c) for c in range(len(aligned))]
    pools = []
    for y in range(len(aligned)):
        idx = np.flatnonzero(classes == y)
        al = idx[bias[idx] == aligned[y]]
        conf = [idx[bias[idx] == v] for v in range(num_attrs) if v != aligned[y]]
        pools.append((al, conf, _ratio_counts(ratio, len(al), sum(len(c) for c in conf))))
    sizes = np.array([n for *_, n in pools])
    if sizes.sum() > n_max:
        exact = sizes * n_max / sizes.sum()
        scaled = np.floor(exact).astype(np.int64)
        scaled[np.argsort(scaled - exact, kind="stable")[: n_max - scaled.sum()]] += 1
        sizes = scaled
    sizes = [_exact_size(int(n), ratio) for n in sizes]
    chosen = []
    for y, ((al, conf, _), n) in enumerate(zip(pools, sizes, strict=True)):
        n_al = round(ratio * n)
        n_conf = int(n) - n_al
        if (ratio > 0 and n_al == 0) or (ratio < 1 and n_conf == 0):
            raise UserError(
                f"data.bias_ratio: class {names[y]!r} of the train split ({len(al)} aligned, "
                f"{sum(len(c) for c in conf)} conflicting images) cannot be sampled at ratio {ratio} "
                "(too few images of one kind; change data.bias_ratio or data.aligned, or raise data.n_train)")
        chosen.append(rng.choice(al, size=n_al, replace=False))
        alloc = even_allocation(np.array([len(c) for c in conf]), n_conf, rng)
        chosen += [rng.choice(c, size=k, replace=False) for c, k in zip(conf, alloc, strict=True)]
    return np.sort(np.concatenate(chosen))


# ---------------------------------------------------------------- the prepared splits


def prepare_real(raw: RawDataset, *, resolution: int, rebalance_train: bool, bias_ratio: float,
                 aligned: tuple[int, ...] | None, n_train: int, n_judge: int, n_test: int, seed: int,
                 fmt: str = "folder"):
    """Decode the three splits. Returns ({split: uint8 [N,R,R,3]}, labels frame: split, index, class, bias,
    aligned, file[, caption], meta dict for meta.json). Splits larger than n_<split> are subsampled (seeded);
    with rebalance_train the train split is drawn by `rebalance` at bias_ratio instead."""
    rng = np.random.default_rng(seed)
    frame = raw.frame
    nc, na = len(raw.class_names), len(raw.attr_names)
    classes, bias = frame["class"].to_numpy(), frame["bias"].to_numpy()
    is_train = (frame["split"] == "train").to_numpy()
    if aligned is not None:
        if len(aligned) != nc or not all(0 <= a < na for a in aligned):
            raise UserError(f"data.aligned: expected {nc} attribute indices in 0..{na - 1} (one per class "
                            f"{list(raw.class_names)}), got {list(aligned)}")
        source = "data.aligned"
    elif raw.aligned is not None:
        aligned, source = raw.aligned, "dataset"
    else:
        aligned = majority_attributes(classes[is_train], bias[is_train], nc, na)
        source = "majority in train split"
    images, frames = {}, []
    for split, cap in (("train", n_train), ("judge", n_judge), ("test", n_test)):
        idx = np.flatnonzero((frame["split"] == split).to_numpy())
        if len(idx) == 0:
            raise UserError(f"data.source: the {fmt} dataset has no {split} images")
        if split == "train" and rebalance_train:
            idx = idx[rebalance(classes[idx], bias[idx], aligned, na, bias_ratio, cap, rng, raw.class_names)]
        elif len(idx) > cap:
            idx = np.sort(rng.choice(idx, size=cap, replace=False))
        rows = frame.iloc[idx]
        images[split] = load_images(rows["path"], resolution)
        out = pd.DataFrame({"split": split, "index": np.arange(len(idx)), "class": rows["class"].to_numpy(),
                            "bias": rows["bias"].to_numpy(),
                            "aligned": rows["bias"].to_numpy() == np.asarray(aligned)[rows["class"].to_numpy()],
                            "file": rows["file"].to_numpy()})
        if "caption" in rows.columns:
            out["caption"] = rows["caption"].to_numpy()
        frames.append(out)
    meta = {"format": fmt, "class_names": list(raw.class_names), "attr_names": list(raw.attr_names),
            "aligned": [int(a) for a in aligned], "aligned_source": source, "resolution": resolution}
    return images, pd.concat(frames, ignore_index=True), meta
