"""finetune_guidance@<variant>: InvDiff's min step. The biased model frozen, a small δ (same class and inputs,
zero-initialised output) trained on the target-weighted data (invdiff.target; docs/methods.md "InvDiff") with
loss mean + λ·var_g L_g over the groups.

Variants (one DVC stage each, so the report compares them):
  invdiff          groups inferred by fit_grouper, λ = invdiff.lam        (the method; no bias labels)
  invdiff_lambda0  inferred groups, λ = 0                                 (ablation: no invariance term)
  invdiff_oracle   true class × attribute cells, λ = invdiff.lam          (ablation: uses the hidden labels; with
                   target: equal, the aligned/conflicting pair instead)
Output data/methods/<variant>/: delta/ (save_pretrained), groups.npz (the W used), summary.json; the loss
curve (total and per group) in data/metrics/finetune_guidance_<variant>_loss.json.
Several processes: `torchrun --nproc_per_node N -m stages.finetune_guidance --variant …` (each takes its slice of
the same global batch; the group loss is computed per slice, so only with λ = 0 and hard groups is the result
that of one process)."""

import argparse
from pathlib import Path

import numpy as np
import torch

from pipeline.data import load_meta, load_split, to_tensor
from pipeline.io import atomic_path, load_npz, save_json, save_npz
from pipeline.methods.invdiff import (
    Conditioning,
    attribute_groups,
    check_groups,
    finetune_guidance,
    group_targets,
    harden,
    make_delta,
    oracle_groups,
)
from pipeline.pretrained import load_model
from pipeline.sampling import make_scheduler
from stages.common import check_name, device, load_params, mlflow_run, stage_main

DATA, MODEL, GROUPS = Path("data/prepared"), Path("data/models/diffusion"), Path("data/methods/invdiff_groups")


def groups_for(variant: str, p, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(W, T): the groups and their target shares per class (None: every group alike, the B/K layout);
    `classes`: the training images' classes."""
    meta = load_meta(DATA)
    if variant == "invdiff_oracle":
        hidden = load_split(DATA, "train", with_bias=True)
        if p.target == "equal":
            return oracle_groups(hidden.aligned), None
        W = attribute_groups(hidden.bias, meta.num_attributes)
        return W, group_targets(p.target, W.shape[1], meta.aligned, meta.num_attributes, attribute_groups=True)
    W = check_groups(load_npz(GROUPS / "groups.npz", "W")["W"], str(GROUPS / "groups.npz"), None)
    W = harden(W) if p.hard_groups else W
    if p.target == "equal":
        return W, None
    present = np.stack([W[classes == y].sum(0) > 0 for y in range(len(meta.aligned))])
    return W, group_targets(p.target, W.shape[1], meta.aligned, meta.num_attributes, present=present)


@stage_main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--variant", default="invdiff")
    args = ap.parse_args(argv)
    check_name("finetune_guidance", "--variant", args.variant)  # the variants: dvc.yaml's foreach
    from accelerate import Accelerator

    params = load_params()
    p = params.invdiff
    # cpu=True without CUDA: accelerate then joins a torchrun process group over gloo (else it runs alone)
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no",
                              cpu=not torch.cuda.is_available())
    lam = 0.0 if args.variant == "invdiff_lambda0" else p.lam
    device()  # thread count
    dev = accelerator.device
    model = load_model(MODEL, dev)
    base, scheduler = model.unet, make_scheduler(model.scheduler_config, "ddpm")
    train = load_split(DATA, "train", with_bias=False)
    W, targets = groups_for(args.variant, p, train.classes)
    origin = "oracle groups from data/prepared" if args.variant == "invdiff_oracle" else str(GROUPS / "groups.npz")
    W = check_groups(W, origin, len(train.classes))
    torch.manual_seed(params.seed)
    delta = make_delta(base, width=p.delta_width)
    cfg = {"steps": p.steps, "batch_size": p.batch_size, "lr": p.lr, "lam": lam, "balanced": p.balanced,
           "paired": p.paired, "label_dropout": p.label_dropout, "checkpoint_every": p.checkpoint_every,
           "lr_schedule": p.lr_schedule, "warmup_steps": p.warmup_steps, "ema_decay": p.ema_decay,
           # only when set: the default's checkpoint fingerprint stays what it was
           **({"train_timesteps": tuple(p.train_timesteps)} if p.train_timesteps is not None else {})}
    out = Path("data/methods") / args.variant
    cond = Conditioning(class_labels=torch.from_numpy(train.classes), prompt_embeds=model.prompt_embeds)

    def fit(out_dir, log=None):
        return finetune_guidance(base, delta, scheduler, model.to_model_space(to_tensor(train.images)), cond, W,
                                 cfg=cfg, seed=params.seed, out_dir=out_dir, accelerator=accelerator,
                                 ckpt_dir=Path("data/checkpoints") / args.variant, null_class=model.null_class,
                                 targets=targets, log=log)

    if not accelerator.is_main_process:  # the other ranks train their slices; rank 0 writes
        fit(out / "delta")
        return
    with mlflow_run("finetune_guidance", params, ("invdiff",), run_name=f"finetune_guidance@{args.variant}",
                    extra_tags={"method": args.variant}) as run, atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        result = fit(tmp / "delta", log=lambda step, m: run.metrics(m, step=step))
        summary = {"variant": args.variant, "lam": lam, "world_size": accelerator.num_processes,
                   "target": p.target if isinstance(p.target, str) else list(p.target), "groups": W.shape[1],
                   "steps": result.steps, "resumed_from": result.resumed_from,
                   "final_loss": result.final_loss, "delta_params": result.delta_params,
                   "base_params": result.base_params, "param_ratio": result.delta_params / result.base_params,
                   "train_timesteps": None if p.train_timesteps is None else list(p.train_timesteps)}
        run.metrics({k: v for k, v in summary.items() if k not in ("variant", "lam", "target")})
        save_npz(tmp / "groups.npz", W=W)
        save_json(tmp / "summary.json", summary)
        run.model(tmp / "delta", f"delta_{args.variant}", "delta")  # an MLflow model (docs/tracking.md)
    save_json(f"data/metrics/finetune_guidance_{args.variant}.json", summary)
    curve = [{"step": step, "train_loss": loss, **{f"group_loss_{k}": g for k, g in enumerate(groups)}}
             for (step, loss), groups in zip(result.losses, result.group_losses, strict=True)]
    save_json(f"data/metrics/finetune_guidance_{args.variant}_loss.json", curve)
    print(f"finetune_guidance@{args.variant}: δ {result.delta_params} params ({summary['param_ratio']:.0%} of the "
          f"base), final loss {result.final_loss:.4f}")


if __name__ == "__main__":
    main()
