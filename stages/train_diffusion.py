"""train_diffusion: the biased class-conditional DDPM on the biased training split (accelerate, EMA, resume).

Runs as `python -m stages.train_diffusion` or under `accelerate launch -m stages.train_diffusion`.
Checkpoints go to data/checkpoints/diffusion (a DVC `persist` output), so a re-run resumes from the latest.
"""

from pathlib import Path

import torch

from pipeline.data import NUM_CLASSES, load_split, to_tensor
from pipeline.diffusion import resolve_mixed_precision, train_diffusion
from pipeline.io import save_json
from stages.common import load_params, mlflow_run, stage_main

PREPARED, OUT, CKPT = Path("data/prepared"), Path("data/models/diffusion"), Path("data/checkpoints/diffusion")


@stage_main
def main() -> None:
    from accelerate import Accelerator

    params = load_params()
    cfg = params.diffusion.model_dump()
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(cfg["mixed_precision"]))
    train = load_split(PREPARED, "train", with_bias=False)  # the biased model never sees the colour label
    images, classes = to_tensor(train.images), torch.from_numpy(train.classes)

    def fit(log=None):
        return train_diffusion(images, classes, num_classes=NUM_CLASSES, cfg=cfg, seed=params.seed,
                               out_dir=OUT, ckpt_dir=CKPT, accelerator=accelerator, log=log)

    if not accelerator.is_main_process:
        fit()
        return
    with mlflow_run("train_diffusion", params, ("diffusion",)) as run:
        result = fit(log=lambda step, m: run.metrics(m, step=step))
        summary = {"final_loss": result.final_loss, "steps": result.steps, "resumed_from": result.resumed_from,
                   "num_params": result.num_params}
        run.metrics(summary)
    save_json("data/metrics/train_diffusion_loss.json",
              [{"step": s, "train_loss": loss} for s, loss in result.losses])
    save_json("data/metrics/train_diffusion.json", summary)
    print(f"trained {result.steps} steps (resumed from {result.resumed_from}); final loss {result.final_loss:.4f}")


if __name__ == "__main__":
    main()
