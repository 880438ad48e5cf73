"""train_classifiers: the judges — the bias-attribute judge (colour.safetensors) and the target judge
(digit.safetensors) — trained on the judge split, or user-supplied files (classifiers.*_judge) adopted.
Also data/judges/confusion.json: each judge's confusion counts [true, predicted] on the held-out test split, with
which scoring corrects the bias estimates for the attribute judge's errors (docs/metrics.md)."""

from pathlib import Path

import numpy as np
import torch

from pipeline.data import load_meta, load_split, to_tensor
from pipeline.io import atomic_path, save_json
from pipeline.judges import adopt_judge, judge_outputs, save_judge, train_judge
from pipeline.metrics import confusion_matrix
from pipeline.seeds import stream
from stages.common import device, load_params, mlflow_run, stage_main

PREPARED, OUT, CKPT = Path("data/prepared"), Path("data/judges"), Path("data/checkpoints/classifiers")
# file name → (labels field of the split, params key of a user-supplied file); file names kept from Coloured MNIST
JUDGES = {"colour": ("bias", "attribute_judge"), "digit": ("classes", "target_judge")}


@stage_main
def main() -> None:
    params = load_params()
    p = params.classifiers
    dev = device()
    meta = load_meta(PREPARED)
    names = {"bias": meta.attr_names, "classes": meta.class_names}
    train = load_split(PREPARED, "judge", with_bias=True)
    test = load_split(PREPARED, "test", with_bias=True)
    x_train, x_test = to_tensor(train.images), to_tensor(test.images)
    metrics, confusion = {}, {"split": "test"}
    # both judges written into one temp directory that replaces data/judges at once: never one new, one old
    with mlflow_run("train_classifiers", params, ("classifiers",)) as run, atomic_path(OUT) as tmp:
        tmp.mkdir(parents=True)
        for name, (field, user_key) in JUDGES.items():
            k, dest, user = len(names[field]), tmp / f"{name}.safetensors", getattr(p, user_key)
            if user:
                judge = adopt_judge(user, k, dest, f"classifiers.{user_key}").to(dev)
            else:
                judge = train_judge(x_train, torch.from_numpy(getattr(train, field)), k, width=p.width,
                                    epochs=p.epochs, batch_size=p.batch_size, lr=p.lr,
                                    seed=stream(params.seed, f"judge:{name}"), device=str(dev), desc=f"judge:{name}",
                                    ckpt_dir=CKPT / name, arch=p.arch, blocks=p.blocks)
            pred, _ = judge_outputs(judge, x_test)
            metrics[f"{name}_test_accuracy"] = float(np.mean(pred == getattr(test, field)))
            confusion[name] = confusion_matrix(getattr(test, field), pred, k).tolist()
            if not user:
                labels = None if meta.format == "mnist" else names[field]
                save_judge(judge.cpu(), dest, {"attribute": name}, labels=labels)
        save_json(tmp / "confusion.json", confusion)
        run.metrics(metrics)
    save_json("data/metrics/train_classifiers.json", metrics)
    print(", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


if __name__ == "__main__":
    main()
