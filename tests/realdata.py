"""Writers of tiny fixture datasets in each published layout (Waterbirds, CelebA, FairFace, image folder).

Every image is a flat colour that encodes its row: red = 40 + 150·class, green = 40 + 150·attribute, so a test
can check that each decoded image belongs to the row it is listed on (JPEG keeps flat colours to a few levels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# the 40 names of list_attr_celeba.txt, in the published order
CELEBA_ATTRS = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
    "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open",
    "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)


def colour_of(cls: int, attr: int) -> tuple[int, int, int]:
    return (40 + 150 * min(cls, 1), 40 + 150 * min(attr, 1), 90)


def write_image(path: Path, colour, size=(12, 16)) -> None:
    """A flat-colour image (PNG or JPEG by suffix) of size (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))


def groups(counts: dict[tuple[int, int], int]) -> list[tuple[int, int]]:
    """(class, attribute) per row, `counts[(y, a)]` rows of each, in a fixed interleaved order."""
    rows = [key for key, n in sorted(counts.items()) for _ in range(n)]
    return [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]


WATERBIRDS = {  # split → {(y, place): n}: training split biased (aligned = place == y), val/test balanced
    0: {(0, 0): 12, (0, 1): 2, (1, 1): 8, (1, 0): 2},
    1: {(0, 0): 2, (0, 1): 2, (1, 0): 2, (1, 1): 2},
    2: {(0, 0): 3, (0, 1): 3, (1, 0): 3, (1, 1): 3},
}


def write_waterbirds(root: Path, spec=WATERBIRDS) -> list[dict]:
    """metadata.csv (img_id, img_filename, y, split, place, place_filename) and JPEGs in species folders."""
    rows, i = [], 0
    for split, counts in spec.items():
        for y, place in groups(counts):
            i += 1
            species = "001.Black_footed_Albatross" if y else "026.Bronzed_Cowbird"
            name = f"{species}/{species.split('.')[1]}_{i:04d}.jpg"
            write_image(root / name, colour_of(y, place))
            rows.append({"img_id": i, "img_filename": name, "y": y, "split": split, "place": place,
                         "place_filename": f"/o/ocean/{i:08d}.jpg"})
    lines = ["img_id,img_filename,y,split,place,place_filename"]
    lines += [",".join(str(r[k]) for k in ("img_id", "img_filename", "y", "split", "place", "place_filename"))
              for r in rows]
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return rows


def write_celeba(root: Path, n: int = 30) -> list[dict]:
    """list_attr_celeba.txt, list_eval_partition.txt and img_align_celeba/NNNNNN.jpg (non-square, like 178×218)."""
    rng = np.random.default_rng(1)
    rows = []
    for i in range(1, n + 1):
        values = rng.choice([-1, 1], size=len(CELEBA_ATTRS))
        name = f"{i:06d}.jpg"
        blond, male = int(values[CELEBA_ATTRS.index("Blond_Hair")] > 0), int(values[CELEBA_ATTRS.index("Male")] > 0)
        write_image(root / "img_align_celeba" / name, colour_of(blond, male), size=(14, 18))
        rows.append({"file": name, "values": values, "split": 0 if i <= n // 2 else (1 if i <= 3 * n // 4 else 2)})
    lines = [str(n), " ".join(CELEBA_ATTRS)]
    lines += [r["file"] + " " + " ".join(f"{v:2d}" for v in r["values"]) for r in rows]  # published: "000001.jpg -1  1"
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("".join(f"{r['file']} {r['split']}\n" for r in rows))
    return rows


FAIRFACE_RACES = ("White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern")


def write_fairface(root: Path, n_train: int = 28, n_val: int = 14) -> dict[str, list[dict]]:
    """fairface_label_{train,val}.csv (file, age, gender, race, service_test) and train/N.jpg, val/N.jpg."""
    out = {}
    for split, n in (("train", n_train), ("val", n_val)):
        rows = []
        for i in range(1, n + 1):
            gender = ("Male", "Female")[i % 2]
            race = FAIRFACE_RACES[(i // 2) % len(FAIRFACE_RACES)]
            age = ("20-29", "3-9", "more than 70")[i % 3]
            write_image(root / split / f"{i}.jpg", colour_of(i % 2, int(race != "White")))
            rows.append({"file": f"{split}/{i}.jpg", "age": age, "gender": gender, "race": race,
                         "service_test": str(i % 3 == 0)})
        lines = ["file,age,gender,race,service_test"]
        lines += [",".join(r[k] for k in ("file", "age", "gender", "race", "service_test")) for r in rows]
        (root / f"fairface_label_{split}.csv").write_text("\n".join(lines) + "\n")
        out[split] = rows
    return out


def write_folder(root: Path, rows: list[dict], columns=("file", "class", "attribute", "split")) -> None:
    """metadata.csv with the given columns; an image per row coloured by its (class, attribute) index."""
    lines = [",".join(columns)]
    for r in rows:
        write_image(root / r["file"], colour_of(int(r.get("y", 0)), int(r.get("a", 0))), size=(16, 16))
        lines.append(",".join(str(r[c]) for c in columns))
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")


def folder_rows(n: int = 24, split: bool = True) -> list[dict]:
    """Rows for write_folder: classes cat/dog (alternating), attributes indoor/outdoor (cat ↔ indoor, dog ↔
    outdoor except where (i // 2) % 3 == 0), splits train, train, val, test for i // 2 = 0, 1, 2, 3 (mod 4)."""
    rows = []
    for i in range(n):
        y = i % 2
        a = y if (i // 2) % 3 else 1 - y
        rows.append({"file": f"img/{i:03d}.png", "class": ("cat", "dog")[y], "attribute": ("indoor", "outdoor")[a],
                     "split": ("train", "train", "val", "test")[i // 2 % 4] if split else "", "y": y, "a": a,
                     "caption": f"a photo of a {('cat', 'dog')[y]}"})
    return rows
