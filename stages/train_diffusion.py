"""train_diffusion: the biased class-conditional DDPM on the biased training split (accelerate, EMA, resume).

With diffusion.pretrained, the local diffusers model there is adopted instead of a new U-Net and fine-tuned for
diffusion.train_steps on the biased data (0: adopted as it is); a latent pipeline is trained on the VAE's latents,
conditioned by diffusion.prompt_template filled with the class names (pipeline/pretrained.py).
Runs as `python -m stages.train_diffusion`, or with N processes as `torchrun --nproc_per_node N -m
stages.train_diffusion` / `accelerate launch -m stages.train_diffusion` (world size in the metrics JSON).
Checkpoints go to data/checkpoints/diffusion (a DVC `persist` output), so a re-run resumes from the latest.
"""

from pathlib import Path

import torch

from pipeline.data import load_meta, load_split, to_tensor
from pipeline.diffusion import resolve_mixed_precision, train_diffusion
from pipeline.io import save_json
from stages.common import load_params, mlflow_run, stage_main

PREPARED, OUT, CKPT = Path("data/prepared"), Path("data/models/diffusion"), Path("data/checkpoints/diffusion")


@stage_main
def main() -> None:
    from accelerate import Accelerator

    params = load_params()
    cfg = params.diffusion.model_dump()
    # cpu=True without CUDA: accelerate then joins a torchrun/MPI process group over gloo (else it runs alone)
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(cfg["mixed_precision"]),
                              cpu=not torch.cuda.is_available())
    train = load_split(PREPARED, "train", with_bias=False)  # the biased model never sees the colour label
    images, classes = to_tensor(train.images), torch.from_numpy(train.classes)
    meta = load_meta(PREPARED)
    adopted = {}
    if cfg["pretrained"] is not None:
        from pipeline.pretrained import adopt_pretrained

        model = adopt_pretrained(cfg["pretrained"], class_names=meta.class_names,
                                 prompt_template=cfg["prompt_template"], resolution=images.shape[-1],
                                 device=accelerator.device)
        images = model.to_model_space(images)
        adopted = {"unet": model.unet, "conditioning": model.conditioning,
                   "scheduler_config": model.scheduler_config, "save_extra": model.save_extra}

    def fit(log=None):
        return train_diffusion(images, classes, num_classes=meta.num_classes, cfg=cfg, seed=params.seed,
                               out_dir=OUT, ckpt_dir=CKPT, accelerator=accelerator, log=log, **adopted)

    if not accelerator.is_main_process:
        fit()
        return
    with mlflow_run("train_diffusion", params, ("diffusion",)) as run:
        result = fit(log=lambda step, m: run.metrics(m, step=step))
        summary = {"final_loss": result.final_loss, "steps": result.steps, "resumed_from": result.resumed_from,
                   "num_params": result.num_params, "world_size": accelerator.num_processes}
        run.metrics(summary)
        run.model(OUT, "diffusion", "diffusion")  # an MLflow model, for the registry (docs/tracking.md)
    save_json("data/metrics/train_diffusion_loss.json",
              [{"step": s, "train_loss": loss} for s, loss in result.losses])
    save_json("data/metrics/train_diffusion.json", summary)
    shown = "none (adopted as it is)" if result.final_loss is None else f"{result.final_loss:.4f}"
    print(f"trained {result.steps} steps (resumed from {result.resumed_from}); final loss {shown}")


if __name__ == "__main__":
    main()
