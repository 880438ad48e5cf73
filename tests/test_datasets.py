"""pipeline/datasets.py: each published layout loads to the right classes, attributes and splits; malformed
layouts fail with one line naming the file or key; re-balancing hits the ratio; prepare_data writes its outputs."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.config import parse_params
from pipeline.data import MNIST_META, load_meta, load_split
from pipeline.datasets import (
    even_allocation,
    load_image,
    majority_attributes,
    prepare_real,
    read_dataset,
    rebalance,
)
from pipeline.errors import UserError
from stages.prepare_data import build, write
from tests.realdata import (
    CELEBA_ATTRS,
    colour_of,
    folder_rows,
    write_celeba,
    write_fairface,
    write_folder,
    write_image,
    write_waterbirds,
)

BIG = {"n_train": 10_000, "n_judge": 10_000, "n_test": 10_000}


def prepare(raw, **kw):
    args = {"resolution": 8, "rebalance_train": False, "bias_ratio": 0.9, "aligned": None, "seed": 0, **BIG, **kw}
    return prepare_real(raw, **args)


def assert_colours_match(images, labels):
    """Every decoded image carries the flat colour of the (class, attribute) it is listed with."""
    for split, x in images.items():
        rows = labels[labels["split"] == split]
        want = np.array([colour_of(min(c, 1), min(b, 1)) for c, b in zip(rows["class"], rows["bias"], strict=True)])
        assert np.abs(x.reshape(len(x), -1, 3).astype(int) - want[:, None, :]).max() <= 6, split


def one_line(exc_info, *needles):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert str(n) in msg, (n, msg)
    return msg


# ---------------------------------------------------------------------------------------------------- adapters

def test_waterbirds_classes_places_splits(tmp_path):
    rows = write_waterbirds(tmp_path)
    raw = read_dataset("waterbirds", tmp_path, target_attr=None, bias_attr=None)
    assert raw.class_names == ("landbird", "waterbird") and raw.attr_names == ("land", "water")
    f = raw.frame
    assert f["class"].tolist() == [r["y"] for r in rows] and f["bias"].tolist() == [r["place"] for r in rows]
    assert f["split"].tolist() == [("train", "judge", "test")[r["split"]] for r in rows]
    images, labels, meta = prepare(raw)
    assert {s: len(x) for s, x in images.items()} == {"train": 24, "judge": 8, "test": 12}
    assert images["train"].shape[1:] == (8, 8, 3) and images["train"].dtype == np.uint8
    assert_colours_match(images, labels)
    assert (labels["aligned"] == (labels["class"] == labels["bias"])).all()  # landbird ↔ land, waterbird ↔ water
    assert labels[labels["split"] == "train"]["aligned"].mean() == pytest.approx(20 / 24)
    assert meta["aligned"] == [0, 1] and meta["aligned_source"] == "dataset"
    assert list(labels.columns) == ["split", "index", "class", "bias", "aligned", "file"]


@pytest.mark.parametrize(("target", "bias"), [("Blond_Hair", "Male"), ("Smiling", "Young")])
def test_celeba_attributes_and_partition(tmp_path, target, bias):
    rows = write_celeba(tmp_path)
    raw = read_dataset("celeba", tmp_path, target_attr=target, bias_attr=bias)
    f = raw.frame
    ti, bi = CELEBA_ATTRS.index(target), CELEBA_ATTRS.index(bias)
    assert f["class"].tolist() == [int(r["values"][ti] > 0) for r in rows]
    assert f["bias"].tolist() == [int(r["values"][bi] > 0) for r in rows]
    assert f["split"].tolist() == [("train", "judge", "test")[r["split"]] for r in rows]
    assert raw.class_names == (f"not {target}", target) and raw.attr_names == (f"not {bias}", bias)
    images, labels, meta = prepare(raw, resolution=12)
    assert images["test"].shape[1:] == (12, 12, 3)
    if target == "Blond_Hair":  # the fixture colours encode blond and male
        assert_colours_match(images, labels)
    train = f[f["split"] == "train"]
    assert meta["aligned"] == list(majority_attributes(train["class"].to_numpy(), train["bias"].to_numpy(), 2, 2))


def test_celeba_defaults_to_blond_hair_and_male(tmp_path):
    write_celeba(tmp_path)
    raw = read_dataset("celeba", tmp_path, target_attr=None, bias_attr=None)
    assert raw.class_names == ("not Blond_Hair", "Blond_Hair") and raw.attr_names == ("not Male", "Male")


def test_fairface_columns_labels_and_val_halves(tmp_path):
    rows = write_fairface(tmp_path)
    raw = read_dataset("fairface", tmp_path, target_attr=None, bias_attr=None, seed=3)
    f = raw.frame
    assert raw.class_names == ("Male", "Female") and len(raw.attr_names) == 7
    all_rows = rows["train"] + rows["val"]
    assert f["class"].tolist() == [("Male", "Female").index(r["gender"]) for r in all_rows]
    assert f["bias"].tolist() == [raw.attr_names.index(r["race"]) for r in all_rows]
    assert Counter(f["split"]) == {"train": 28, "judge": 7, "test": 7}
    assert set(f[f["split"] != "train"]["file"]) == {r["file"] for r in rows["val"]}
    images, labels, _ = prepare(raw)
    assert_colours_match({s: x for s, x in images.items()}, labels.assign(bias=(labels["bias"] > 0).astype(int)))
    again = read_dataset("fairface", tmp_path, target_attr=None, bias_attr=None, seed=3).frame
    assert again["split"].tolist() == f["split"].tolist()  # seeded


def test_fairface_age_as_class_with_declared_names(tmp_path):
    write_fairface(tmp_path)
    raw = read_dataset("fairface", tmp_path, target_attr="age", bias_attr="gender",
                       class_names=("3-9", "20-29", "more than 70"), attr_names=None)
    assert raw.class_names == ("3-9", "20-29", "more than 70") and raw.attr_names == ("Male", "Female")
    assert sorted(set(raw.frame["class"])) == [0, 1, 2]


def test_folder_with_split_attribute_and_caption(tmp_path):
    rows = folder_rows()
    write_folder(tmp_path, rows, ("file", "class", "attribute", "split", "caption"))
    raw = read_dataset("folder", tmp_path, target_attr=None, bias_attr=None)
    assert raw.class_names == ("cat", "dog") and raw.attr_names == ("indoor", "outdoor")
    assert raw.frame["class"].tolist() == [r["y"] for r in rows]
    assert raw.frame["bias"].tolist() == [r["a"] for r in rows]
    assert raw.frame["split"].tolist() == [{"val": "judge"}.get(r["split"], r["split"]) for r in rows]
    images, labels, meta = prepare(raw)
    assert_colours_match(images, labels)
    assert labels[labels["split"] == "train"]["caption"].str.startswith("a photo of a ").all()
    assert meta["class_names"] == ["cat", "dog"] and meta["aligned_source"] == "majority in train split"


def test_folder_without_split_or_attribute(tmp_path):
    rows = folder_rows(30, split=False)
    write_folder(tmp_path, rows, ("file", "class"))
    raw = read_dataset("folder", tmp_path, target_attr=None, bias_attr=None, seed=1, n_judge=5, n_test=7)
    assert Counter(raw.frame["split"]) == {"train": 18, "judge": 5, "test": 7}
    assert raw.attr_names == ("none",) and (raw.frame["bias"] == 0).all()
    _, labels, meta = prepare(raw)
    assert labels["aligned"].all() and meta["attr_names"] == ["none"]


def test_folder_numeric_labels_sort_numerically(tmp_path):
    rows = [{"file": f"{i}.png", "class": c, "split": ["train", "test", "judge"][i % 3]}
            for i, c in enumerate([2, 10, 1, 2, 10, 1])]
    write_folder(tmp_path, rows, ("file", "class", "split"))
    raw = read_dataset("folder", tmp_path, target_attr=None, bias_attr=None)
    assert raw.class_names == ("1", "2", "10") and raw.frame["class"].tolist() == [1, 2, 0, 1, 2, 0]


def test_load_image_centre_crops_then_resizes(tmp_path):
    """A 30×10 image with red sides and a green centre square becomes all green; a 10×30 one likewise."""
    for size, box in (((30, 10), (10, 0, 20, 10)), ((10, 30), (0, 10, 10, 20))):
        img = Image.new("RGB", size, (255, 0, 0))
        img.paste((0, 255, 0), box)
        img.save(tmp_path / "x.png")
        out = load_image(tmp_path / "x.png", 8)
        assert out.shape == (8, 8, 3) and out.dtype == np.uint8
        assert (out[..., 1] == 255).all() and (out[..., 0] == 0).all()
    Image.new("L", (5, 5), 77).save(tmp_path / "grey.png")  # greyscale → RGB
    assert (load_image(tmp_path / "grey.png", 4) == 77).all()


# ---------------------------------------------------------------------------------------------------- malformed

def _break_csv(path, column, old, new):
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    if old is None:
        frame = frame.drop(columns=[column])
    else:
        frame.loc[frame.index[3], column] = new
    frame.to_csv(path, index=False)


def _read(fmt, root, **kw):
    defaults = {"target_attr": None, "bias_attr": None}
    raw = read_dataset(fmt, root, **{**defaults, **kw})
    return prepare(raw)


@pytest.mark.parametrize(("case", "needles"), [
    ("no-metadata", ["metadata.csv", "not found"]),
    ("no-column", ["metadata.csv", "'place'"]),
    ("bad-label", ["metadata.csv", "line 5", "y '2'"]),
    ("bad-split", ["metadata.csv", "line 5", "split '3'"]),
    ("missing-image", ["image file not found", "1 of"]),
    ("corrupt-image", ["cannot decode image"]),
    ("truncated-image", ["cannot decode image"]),
])
def test_waterbirds_malformed(tmp_path, case, needles):
    rows = write_waterbirds(tmp_path)
    meta = tmp_path / "metadata.csv"
    first = tmp_path / rows[0]["img_filename"]
    if case == "no-metadata":
        meta.unlink()
    elif case == "no-column":
        _break_csv(meta, "place", None, None)
    elif case == "bad-label":
        _break_csv(meta, "y", "", "2")
    elif case == "bad-split":
        _break_csv(meta, "split", "", "3")
    elif case == "missing-image":
        first.unlink()
        needles = [*needles, str(first)]
    elif case == "corrupt-image":
        first.write_bytes(b"not a jpeg at all")
        needles = [*needles, str(first)]
    elif case == "truncated-image":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(first)
        first.write_bytes(first.read_bytes()[:400])
        needles = [*needles, str(first)]
    with pytest.raises(UserError) as exc:
        _read("waterbirds", tmp_path)
    one_line(exc, *needles)


@pytest.mark.parametrize(("case", "needles"), [
    ("unknown-target", ["data.target_attr", "'Purple_Hair'"]),
    ("unknown-bias", ["data.bias_attr", "'male'"]),
    ("no-partition-file", ["list_eval_partition.txt", "not found"]),
    ("no-attr-file", ["list_attr_celeba.txt", "not found"]),
    ("bad-value", ["list_attr_celeba.txt", "line 4", "Blond_Hair '0'"]),
    ("bad-split", ["list_eval_partition.txt", "line 2", "000002.jpg 5"]),
    ("short-row", ["list_attr_celeba.txt", "line 3", "40 values"]),
    ("bad-count", ["list_attr_celeba.txt", "says 31 images"]),
    ("missing-partition-row", ["list_eval_partition.txt", "no split for 000030.jpg"]),
    ("missing-image", ["img_align_celeba", "000007.jpg", "image file not found"]),
])
def test_celeba_malformed(tmp_path, case, needles):
    write_celeba(tmp_path)
    attr, part = tmp_path / "list_attr_celeba.txt", tmp_path / "list_eval_partition.txt"
    lines = attr.read_text().splitlines()
    kw = {}
    if case == "unknown-target":
        kw["target_attr"] = "Purple_Hair"
    elif case == "unknown-bias":
        kw["bias_attr"] = "male"
    elif case == "no-partition-file":
        part.unlink()
    elif case == "no-attr-file":
        attr.unlink()
    elif case == "bad-value":
        parts = lines[3].split()
        parts[1 + CELEBA_ATTRS.index("Blond_Hair")] = "0"
        lines[3] = " ".join(parts)
    elif case == "bad-split":
        p = part.read_text().splitlines()
        p[1] = "000002.jpg 5"
        part.write_text("\n".join(p) + "\n")
    elif case == "short-row":
        lines[2] = " ".join(lines[2].split()[:-1])
    elif case == "bad-count":
        lines[0] = "31"
    elif case == "missing-partition-row":
        part.write_text("".join(line + "\n" for line in part.read_text().splitlines()[:-1]))
    elif case == "missing-image":
        (tmp_path / "img_align_celeba" / "000007.jpg").unlink()
    if case in ("bad-value", "short-row", "bad-count"):
        attr.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as exc:
        _read("celeba", tmp_path, **kw)
    one_line(exc, *needles)


@pytest.mark.parametrize(("case", "needles"), [
    ("no-val-file", ["fairface_label_val.csv", "not found"]),
    ("unknown-column", ["fairface_label_train.csv", "'skin'", "data.bias_attr"]),
    ("label-outside", ["fairface_label_train.csv", "line 5", "race 'Martian'"]),
    ("declared-too-narrow", ["fairface_label_train.csv", "gender 'Female'"]),
    ("unlisted-column", ["data.class_names", "'service_test'"]),
    ("missing-image", ["val/3.jpg", "image file not found"]),
])
def test_fairface_malformed(tmp_path, case, needles):
    write_fairface(tmp_path)
    kw = {}
    if case == "no-val-file":
        (tmp_path / "fairface_label_val.csv").unlink()
    elif case == "unknown-column":
        kw["bias_attr"] = "skin"
    elif case == "label-outside":
        _break_csv(tmp_path / "fairface_label_train.csv", "race", "", "Martian")
    elif case == "declared-too-narrow":
        kw["class_names"] = ("Male",)
    elif case == "unlisted-column":
        kw["target_attr"] = "service_test"
    elif case == "missing-image":
        (tmp_path / "val" / "3.jpg").unlink()
    with pytest.raises(UserError) as exc:
        _read("fairface", tmp_path, **kw)
    one_line(exc, *needles)


@pytest.mark.parametrize(("case", "needles"), [
    ("no-metadata", ["metadata.csv", "not found"]),
    ("no-class-column", ["metadata.csv", "'class'", "data.target_attr"]),
    ("bad-split", ["metadata.csv", "line 5", "split 'dev'"]),
    ("undeclared-class", ["metadata.csv", "class 'dog'", "['cat', 'bird']"]),
    ("attr-names-without-column", ["data.attr_names", "'attribute'"]),
    ("empty-split", ["no test images"]),
    ("too-few-rows", ["data.n_test + data.n_judge"]),
    ("not-a-directory", ["data.source", "nowhere"]),
    ("not-csv", ["metadata.csv", "not a readable CSV"]),
])
def test_folder_malformed(tmp_path, case, needles):
    rows = folder_rows()
    write_folder(tmp_path, rows)
    meta = tmp_path / "metadata.csv"
    root, kw = tmp_path, {}
    if case == "no-metadata":
        meta.unlink()
    elif case == "no-class-column":
        _break_csv(meta, "class", None, None)
    elif case == "bad-split":
        _break_csv(meta, "split", "", "dev")
    elif case == "undeclared-class":
        kw["class_names"] = ("cat", "bird")
    elif case == "attr-names-without-column":
        _break_csv(meta, "attribute", None, None)
        kw["attr_names"] = ("a", "b")
    elif case == "empty-split":
        write_folder(tmp_path, [r for r in rows if r["split"] != "test"])
    elif case == "too-few-rows":
        _break_csv(meta, "split", None, None)
        kw.update(n_judge=12, n_test=12)
    elif case == "not-a-directory":
        root = tmp_path / "nowhere"
    elif case == "not-csv":
        meta.write_bytes(b"\xff\xfe\x00\x01garbage\x00" * 20)
    with pytest.raises(UserError) as exc:
        _read("folder", root, **kw)
    one_line(exc, *needles)


# ---------------------------------------------------------------------------------------------------- bias ratio

def test_even_allocation_water_fills():
    rng = np.random.default_rng(0)
    assert even_allocation(np.array([10, 10, 10]), 9, rng).tolist() == [3, 3, 3]
    assert even_allocation(np.array([1, 10, 10]), 9, rng).tolist() == [1, 4, 4]
    got = even_allocation(np.array([5, 5, 5, 5]), 6, rng)
    assert got.sum() == 6 and got.max() - got.min() == 1
    assert even_allocation(np.array([2, 0, 7]), 9, rng).tolist() == [2, 0, 7]


def _toy(n_per_cell: dict[tuple[int, int], int]):
    pairs = [k for k, n in n_per_cell.items() for _ in range(n)]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


@pytest.mark.parametrize("ratio", [0.5, 0.8, 0.9, 0.95])
def test_rebalance_hits_ratio_exactly(ratio):
    classes, bias = _toy({(0, 0): 300, (0, 1): 40, (0, 2): 15, (1, 1): 200, (1, 0): 60, (1, 2): 60})
    idx = rebalance(classes, bias, (0, 1), 3, ratio, 10_000, np.random.default_rng(0))
    assert len(set(idx.tolist())) == len(idx) and (np.diff(idx) > 0).all()
    for y, a in ((0, 0), (1, 1)):
        sel = bias[idx][classes[idx] == y]
        assert (sel == a).mean() == pytest.approx(ratio, abs=1e-12), (y, len(sel))
        conf = Counter(sel[sel != a].tolist())
        others = [v for v in range(3) if v != a]
        avail = {v: int(((classes == y) & (bias == v)).sum()) for v in others}
        # spread as evenly as the pools allow: a value short of the mean is exhausted
        mean = sum(conf.values()) / len(others)
        for v in others:
            assert conf[v] >= min(avail[v], int(mean)), (y, conf, avail)


def test_rebalance_uses_as_many_images_as_the_ratio_allows_exactly():
    classes, bias = _toy({(0, 0): 300, (0, 1): 10, (1, 1): 100, (1, 0): 100})
    idx = rebalance(classes, bias, (0, 1), 2, 0.9, 10_000, np.random.default_rng(0))
    counts = Counter(zip(classes[idx].tolist(), bias[idx].tolist(), strict=True))
    # class 0: its 10 conflicting images allow 100 at 0.9; class 1: its 100 aligned allow 111, and 110 is exact
    assert counts == {(0, 0): 90, (0, 1): 10, (1, 1): 99, (1, 0): 11}


def test_rebalance_caps_total_and_keeps_ratio():
    classes, bias = _toy({(0, 0): 500, (0, 1): 500, (1, 1): 500, (1, 0): 500})
    idx = rebalance(classes, bias, (0, 1), 2, 0.75, 200, np.random.default_rng(0))
    assert len(idx) == 200
    for y in (0, 1):
        assert (bias[idx][classes[idx] == y] == y).sum() == 75


def test_rebalance_seeded():
    classes, bias = _toy({(0, 0): 50, (0, 1): 50, (1, 1): 50, (1, 0): 50})
    a = rebalance(classes, bias, (0, 1), 2, 0.9, 1000, np.random.default_rng(4))
    b = rebalance(classes, bias, (0, 1), 2, 0.9, 1000, np.random.default_rng(4))
    c = rebalance(classes, bias, (0, 1), 2, 0.9, 1000, np.random.default_rng(5))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize(("cells", "ratio"), [
    ({(0, 0): 50, (1, 1): 40, (1, 0): 5}, 0.9),       # class 0 has no conflicting image
    ({(0, 1): 50, (1, 1): 40, (1, 0): 5}, 0.9),       # class 0 has no aligned image
    ({(0, 0): 50, (0, 1): 1, (1, 1): 40, (1, 0): 5}, 0.995),  # one conflicting image cannot carry this ratio at n ≤ 51
])
def test_rebalance_impossible_ratio_names_class(cells, ratio):
    classes, bias = _toy(cells)
    with pytest.raises(UserError) as exc:
        rebalance(classes, bias, (0, 1), 2, ratio, 1000, np.random.default_rng(0), ("cat", "dog"))
    one_line(exc, "data.bias_ratio", "'cat'", str(ratio))


def test_prepare_real_rebalances_waterbirds_train(tmp_path):
    write_waterbirds(tmp_path)
    raw = read_dataset("waterbirds", tmp_path, target_attr=None, bias_attr=None)
    images, labels, _ = prepare(raw, rebalance_train=True, bias_ratio=0.5)
    train = labels[labels["split"] == "train"]
    assert len(images["train"]) == len(train) == 8  # per class 2 aligned + 2 conflicting (2 conflicting exist)
    assert train.groupby("class")["aligned"].mean().tolist() == [0.5, 0.5]
    assert len(labels[labels["split"] == "test"]) == 12  # other splits untouched
    images, labels, _ = prepare(raw, rebalance_train=True, bias_ratio=0.8)
    train = labels[labels["split"] == "train"]
    assert train.groupby("class")["aligned"].mean().tolist() == [0.8, 0.8] and len(train) == 20


def test_prepare_real_aligned_param_and_caps(tmp_path):
    write_waterbirds(tmp_path)
    raw = read_dataset("waterbirds", tmp_path, target_attr=None, bias_attr=None)
    _, labels, meta = prepare(raw, aligned=(1, 0), n_judge=5, n_test=4)
    assert meta["aligned"] == [1, 0] and meta["aligned_source"] == "data.aligned"
    assert (labels["aligned"] == (labels["class"] != labels["bias"])).all()
    assert Counter(labels["split"]) == {"train": 24, "judge": 5, "test": 4}
    with pytest.raises(UserError) as exc:
        prepare(raw, aligned=(0, 2))
    one_line(exc, "data.aligned", "0..1")


# ---------------------------------------------------------------------------------------------------- the stage

def _params(tmp_path, **data):
    return parse_params({"data": {"format": "folder", "source": str(tmp_path / "ds"), "resolution": 8, **data}})


def test_prepare_data_stage_on_a_folder_writes_the_usual_outputs(tmp_path):
    write_folder(tmp_path / "ds", folder_rows(32))
    params = _params(tmp_path, rebalance=True, bias_ratio=0.5, aligned=[0, 1])
    images, labels, meta = build(params)
    write(tmp_path / "prepared", images, labels, meta)
    out = tmp_path / "prepared"
    assert sorted(p.name for p in out.iterdir()) == ["judge.npz", "labels.parquet", "meta.json", "test.npz",
                                                     "train.npz"]
    train = load_split(out, "train", with_bias=False)
    assert not hasattr(train, "bias") and train.images.shape[1:] == (8, 8, 3)
    scored = load_split(out, "train", with_bias=True)
    assert scored.aligned.mean() == 0.5 and set(scored.classes.tolist()) == {0, 1}
    m = load_meta(out)
    assert (m.format, m.class_names, m.attr_names, m.aligned) == ("folder", ("cat", "dog"), ("indoor", "outdoor"),
                                                                  (0, 1))
    assert m.num_classes == 2 and m.num_attributes == 2
    assert json.loads((out / "meta.json").read_text())["resolution"] == 8


def test_load_meta_defaults_to_coloured_mnist_and_rejects_bad_files(tmp_path):
    assert load_meta(tmp_path) == MNIST_META and MNIST_META.num_classes == MNIST_META.num_attributes == 10
    (tmp_path / "meta.json").write_text(json.dumps({"format": "folder", "class_names": ["a", "b"],
                                                    "attr_names": ["x"], "aligned": [0, 1]}))
    with pytest.raises(UserError) as exc:
        load_meta(tmp_path)
    one_line(exc, "meta.json", "aligned")
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(UserError) as exc:
        load_meta(tmp_path)
    one_line(exc, "meta.json")


def test_prepare_data_stage_exits_2_with_one_line(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    write_folder(tmp_path / "ds", folder_rows(16))
    (tmp_path / "ds" / "img" / "003.png").unlink()
    (tmp_path / "params.yaml").write_text(f"data:\n  format: folder\n  source: {tmp_path / 'ds'}\n  resolution: 8\n")
    proc = subprocess.run([sys.executable, "-m", "stages.prepare_data"], cwd=tmp_path, capture_output=True,
                          text=True, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "003.png: image file not found" in proc.stderr
    assert not (tmp_path / "data" / "prepared").exists()


@pytest.mark.parametrize(("data", "needle"), [
    ({"format": "celeba"}, "source must be the celeba dataset's root"),
    ({"format": "mnist", "target_attr": "Male"}, "target_attr applies to format"),
    ({"format": "waterbirds", "source": "/x", "class_names": ["a", "b"]}, "class_names applies to format"),
    ({"format": "mnist", "rebalance": True}, "rebalance applies"),
    ({"format": "folder", "source": "/x", "class_names": ["a", "a"]}, "distinct"),
    ({"format": "imagenet", "source": "/x"}, "data.format"),
])
def test_config_rejects_bad_real_data_params(data, needle):
    with pytest.raises(UserError) as exc:
        parse_params({"data": data})
    one_line(exc, needle)


def test_write_image_helper_round_trip(tmp_path):
    """The fixture writer's flat colours survive JPEG within the tolerance the adapter tests use."""
    write_image(tmp_path / "a.jpg", (190, 40, 90))
    assert np.abs(load_image(tmp_path / "a.jpg", 8).astype(int) - [190, 40, 90]).max() <= 6


@pytest.mark.parametrize("name", ["waterbirds", "celeba", "fairface"])
def test_dataset_profiles_validate_and_spell_out_every_key(name):
    from pipeline.config import Params, merge_profile, parse_params

    root = Path(__file__).resolve().parents[1]
    raw = merge_profile(root / f"params_{name}.yaml", root / "params.yaml")  # docs/profiles.md
    params = parse_params(raw)
    assert params.data.format == name and params.classifiers.arch == "resnet"
    assert set(raw) == set(Params.model_fields)
    assert set(raw["data"]) == set(type(params.data).model_fields)


def test_prepare_data_and_train_classifiers_stages_on_a_folder(tmp_path, monkeypatch, one_thread):
    """Both stages end to end (MLflow in a temp SQLite): a resnet target judge trained on the folder's classes,
    a user-supplied attribute judge adopted byte for byte, label names recorded in the trained judge."""
    import yaml
    from safetensors import safe_open
    from safetensors.torch import save_file

    import stages.prepare_data
    import stages.train_classifiers
    from pipeline.judges import ResNetJudge

    write_folder(tmp_path / "ds", folder_rows(48))
    net = ResNetJudge(2, width=4, blocks=[1])
    header = {"config": net.config, "input": {"size": 8, "mean": [0.5] * 3, "std": [0.5] * 3},
              "labels": ["indoor", "outdoor"]}
    save_file(net.state_dict(), str(tmp_path / "user.safetensors"), metadata={"judge": json.dumps(header)})
    raw = {"data": {"format": "folder", "source": str(tmp_path / "ds"), "resolution": 8},
           "classifiers": {"arch": "resnet", "blocks": [1], "width": 4, "epochs": 8, "batch_size": 8, "lr": 0.01,
                           "attribute_judge": str(tmp_path / "user.safetensors")}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    stages.prepare_data.main()
    assert (tmp_path / "data/prepared/meta.json").is_file()
    stages.train_classifiers.main()
    judges = tmp_path / "data/judges"
    assert (judges / "colour.safetensors").read_bytes() == (tmp_path / "user.safetensors").read_bytes()
    with safe_open(str(judges / "digit.safetensors"), framework="pt") as f:
        saved = json.loads(f.metadata()["judge"])
    assert saved["config"]["arch"] == "resnet" and saved["labels"] == ["cat", "dog"]
    metrics = json.loads((tmp_path / "data/metrics/train_classifiers.json").read_text())
    assert metrics["digit_test_accuracy"] == 1.0  # classes are flat red / not-red images
    assert 0.0 <= metrics["colour_test_accuracy"] <= 1.0
