"""fit_grouper: InvDiff's max step. Per-sample denoising losses of the frozen biased model over the training set
(class labels only — the dataset view has no bias attribute), normalised per timestep and within class, then the
soft group matrix W. The hidden labels are read afterwards, only to score the grouping.

Outputs data/methods/invdiff_groups/: groups.npz (W, scores, losses, timesteps), groups.parquet (one row per
training image: index, class, score, W_k, group), discovery.png (training images of each inferred group, one
row per group: what the grouper found); data/metrics/fit_grouper.json (grouping scored against the hidden
labels)."""

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.data import load_split, to_tensor
from pipeline.diffusion import load_diffusion
from pipeline.io import atomic_path, save_json, save_npz
from pipeline.methods.invdiff import (
    Conditioning,
    denoising_losses,
    fit_grouper,
    grouping_quality,
    loss_timesteps,
    normalised_scores,
)
from pipeline.report import save_png
from pipeline.sampling import make_scheduler
from stages.common import UserError, device, load_params, mlflow_run, stage_main

DATA, MODEL, OUT = Path("data/prepared"), Path("data/models/diffusion"), Path("data/methods/invdiff_groups")


def infer_groups(train, unet, scheduler, p, seed: int, dev) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """The max step on a dataset view that must not carry the bias attribute. (W, scores, losses, grouper info)"""
    if hasattr(train, "bias") or hasattr(train, "aligned"):
        raise UserError("fit_grouper: the training view carries the bias attribute; the grouper must infer groups "
                        "without it (load_split(..., with_bias=False))")
    ts = loss_timesteps(*p.loss_timesteps, p.loss_draws)
    cond = Conditioning(class_labels=torch.from_numpy(train.classes))
    losses = denoising_losses(unet, scheduler, to_tensor(train.images), cond, ts, seed=seed,
                              batch_size=p.loss_batch_size, device=dev)
    scores = normalised_scores(losses, train.classes)
    fit = fit_grouper(scores, p.num_groups, min_share=p.min_group_share, steps=p.grouper_steps, lr=p.grouper_lr,
                      init=p.grouper_init, seed=seed)
    return fit.W, scores, losses, {"timesteps": ts, "objective": fit.objective}


def discovery_grid(images: np.ndarray, classes: np.ndarray, W: np.ndarray, per_group: int) -> np.ndarray:
    """Row k: the training images most firmly in group k, cycling over the classes so every digit shows."""
    from pipeline.report import sample_grid

    picks = []
    for k in range(W.shape[1]):
        order = np.argsort(-W[:, k], kind="stable")
        chosen = []
        for y in np.unique(classes):  # round-robin over classes
            chosen.append(order[classes[order] == y][: max(1, per_group // len(np.unique(classes)) + 1)])
        row = np.concatenate(chosen)
        row = row[np.argsort(-W[row, k], kind="stable")][:per_group]
        picks.append(row)
    idx = np.concatenate(picks)
    return sample_grid(images[idx], np.repeat(np.arange(W.shape[1]), [len(r) for r in picks]), per_group)


@stage_main
def main() -> None:
    params = load_params()
    p = params.invdiff
    if p.loss_timesteps[1] >= params.diffusion.num_train_timesteps:
        raise UserError(f"invdiff.loss_timesteps: t_max must be < diffusion.num_train_timesteps "
                        f"({params.diffusion.num_train_timesteps}), got {p.loss_timesteps[1]}")
    dev = device()
    unet, sched_cfg = load_diffusion(MODEL, dev)
    scheduler = make_scheduler(sched_cfg, "ddpm")
    train = load_split(DATA, "train", with_bias=False)
    with mlflow_run("fit_grouper", params, ("invdiff",), run_name="fit_grouper") as run:
        W, scores, losses, info = infer_groups(train, unet, scheduler, p, params.seed, dev)
        hidden = load_split(DATA, "train", with_bias=True)  # scoring only, after W is fixed
        quality = grouping_quality(W, ~hidden.aligned, scores)
        run.metrics(quality)
        for i, v in enumerate(info["objective"][:: max(1, len(info["objective"]) // 50)]):
            run.metrics({"grouper_objective": v}, step=i)
    table = pd.DataFrame({"index": np.arange(len(scores)), "class": train.classes, "score": scores,
                          **{f"W{k}": W[:, k] for k in range(W.shape[1])}, "group": W.argmax(1)})
    with atomic_path(OUT) as tmp:
        tmp.mkdir(parents=True)
        save_npz(tmp / "groups.npz", W=W, scores=scores, losses=losses, timesteps=info["timesteps"])
        table.to_parquet(tmp / "groups.parquet", index=False)
        save_png(discovery_grid(train.images, train.classes, W, p.grid_per_group), tmp / "discovery.png")
    save_json("data/metrics/fit_grouper.json", quality)
    print("fit_grouper: " + ", ".join(f"{k} {v:.3f}" for k, v in quality.items()))


if __name__ == "__main__":
    main()
