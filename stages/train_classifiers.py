"""train_classifiers: the judges — a colour (bias attribute) and a digit (target) classifier — on the balanced split."""

from pathlib import Path

import numpy as np
import torch

from pipeline.data import NUM_CLASSES, NUM_COLOURS, load_split, to_tensor
from pipeline.io import save_json
from pipeline.models import judge_outputs, save_judge, train_judge
from stages.common import device, load_params, mlflow_run, stage_main

PREPARED, OUT, CKPT = Path("data/prepared"), Path("data/judges"), Path("data/checkpoints/classifiers")
JUDGES = {"colour": ("bias", NUM_COLOURS), "digit": ("classes", NUM_CLASSES)}


@stage_main
def main() -> None:
    params = load_params()
    p = params.classifiers
    dev = device()
    train = load_split(PREPARED, "judge", with_bias=True)
    test = load_split(PREPARED, "test", with_bias=True)
    x_train, x_test = to_tensor(train.images), to_tensor(test.images)
    metrics = {}
    with mlflow_run("train_classifiers", params, ("classifiers",)) as run:
        for offset, (name, (field, k)) in enumerate(JUDGES.items()):
            judge = train_judge(x_train, torch.from_numpy(getattr(train, field)), k, width=p.width,
                                epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, seed=params.seed + offset,
                                device=str(dev), desc=f"judge:{name}", ckpt_dir=CKPT / name)
            pred, _ = judge_outputs(judge, x_test)
            metrics[f"{name}_test_accuracy"] = float(np.mean(pred == getattr(test, field)))
            save_judge(judge.cpu(), OUT / f"{name}.safetensors", {"attribute": name})
        run.metrics(metrics)
    save_json("data/metrics/train_classifiers.json", metrics)
    print(", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


if __name__ == "__main__":
    main()
