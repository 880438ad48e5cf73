"""fit_grouper: InvDiff's max step. Per-sample denoising losses of the frozen biased model over the training set
(class labels only — the dataset view has no bias attribute), with `invdiff.loss_contrast` each minus the same
draw's loss under the null class, normalised per timestep and within class; then the soft group matrix W.
The hidden labels are read afterwards, only to score the grouping.

Outputs data/methods/invdiff_groups/: groups.npz (W, scores, losses, timesteps), groups.parquet (one row per
training image: index, class, score, W_k, group), discovery.png (training images of each inferred group, one
row per group: what the grouper found); data/metrics/fit_grouper.json (grouping scored against the hidden
labels)."""

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.data import load_split, to_tensor
from pipeline.io import atomic_path, save_json, save_npz
from pipeline.methods.invdiff import (
    Conditioning,
    denoising_losses,
    estimate_minority_share,
    fit_grouper,
    grouping_quality,
    loss_timesteps,
    normalised_scores,
)
from pipeline.pretrained import load_model
from pipeline.report import save_png
from pipeline.sampling import make_scheduler
from stages.common import UserError, device, load_params, mlflow_run, stage_main

DATA, MODEL, OUT = Path("data/prepared"), Path("data/models/diffusion"), Path("data/methods/invdiff_groups")


def infer_groups(train, model, scheduler, p, seed: int, dev) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """The max step on a dataset view that must not carry the bias attribute. (W, scores, losses [N, D] or with the
    null-class reference [N, D, 2], grouper info)"""
    if hasattr(train, "bias") or hasattr(train, "aligned"):
        raise UserError("fit_grouper: the training view carries the bias attribute; the grouper must infer groups "
                        "without it (load_split(..., with_bias=False))")
    ts = loss_timesteps(*p.loss_timesteps, p.loss_draws)
    classes, table = torch.from_numpy(train.classes), model.prompt_embeds
    reference = (Conditioning(class_labels=torch.full_like(classes, model.null_class), prompt_embeds=table)
                 if p.loss_contrast else None)
    losses, ref = denoising_losses(model.unet, scheduler, model.to_model_space(to_tensor(train.images)),
                                   Conditioning(class_labels=classes, prompt_embeds=table), ts,
                                   reference=reference, seed=seed, batch_size=p.loss_batch_size, device=dev)
    scores = normalised_scores(losses, train.classes, ref)
    share = estimate_minority_share(scores) if p.min_group_share == "auto" else p.min_group_share
    fit = fit_grouper(scores, p.num_groups, min_share=min(share, 1 / p.num_groups), steps=p.grouper_steps,
                      lr=p.grouper_lr, init=p.grouper_init, seed=seed)
    losses = losses if ref is None else np.stack([losses, ref], -1)
    return fit.W, scores, losses, {"timesteps": ts, "objective": fit.objective, "min_group_share": share}


def discovery_grid(images: np.ndarray, classes: np.ndarray, W: np.ndarray, scores: np.ndarray,
                   per_group: int) -> np.ndarray:
    """Row k: the training images most firmly in group k (ties broken by score: the highest-loss group shows its
    highest scores, the others their lowest), round-robin over the classes (class 0's firmest, class 1's, …, then
    each class's second), so every digit shows."""
    from pipeline.report import sample_grid

    rows = []
    for k in range(W.shape[1]):
        sign = 1.0 if k == W.shape[1] - 1 else -1.0
        ranked = [np.flatnonzero(m)[np.lexsort((-sign * scores[m], -W[m, k].round(3)))]
                  for m in (classes == y for y in np.unique(classes))]
        rows.append([r[j] for j in range(max(map(len, ranked))) for r in ranked if j < len(r)][:per_group])
    return sample_grid(images[np.concatenate(rows)], np.repeat(np.arange(W.shape[1]), [len(r) for r in rows]),
                       per_group)


@stage_main
def main() -> None:
    params = load_params()
    p = params.invdiff
    if p.loss_timesteps[1] >= params.diffusion.num_train_timesteps:
        raise UserError(f"invdiff.loss_timesteps: t_max must be < diffusion.num_train_timesteps "
                        f"({params.diffusion.num_train_timesteps}), got {p.loss_timesteps[1]}")
    dev = device()
    model = load_model(MODEL, dev)
    scheduler = make_scheduler(model.scheduler_config, "ddpm")
    train = load_split(DATA, "train", with_bias=False)
    with mlflow_run("fit_grouper", params, ("invdiff",), run_name="fit_grouper") as run:
        W, scores, losses, info = infer_groups(train, model, scheduler, p, params.seed, dev)
        hidden = load_split(DATA, "train", with_bias=True)  # scoring only, after W is fixed
        quality = {"min_group_share": info["min_group_share"], **grouping_quality(W, ~hidden.aligned, scores)}
        run.metrics(quality)
        for i, v in enumerate(info["objective"][:: max(1, len(info["objective"]) // 50)]):
            run.metrics({"grouper_objective": v}, step=i)
    table = pd.DataFrame({"index": np.arange(len(scores)), "class": train.classes, "score": scores,
                          **{f"W{k}": W[:, k] for k in range(W.shape[1])}, "group": W.argmax(1)})
    with atomic_path(OUT) as tmp:
        tmp.mkdir(parents=True)
        save_npz(tmp / "groups.npz", W=W, scores=scores, losses=losses, timesteps=info["timesteps"])
        table.to_parquet(tmp / "groups.parquet", index=False)
        save_png(discovery_grid(train.images, train.classes, W, scores, p.grid_per_group), tmp / "discovery.png")
    save_json("data/metrics/fit_grouper.json", quality)
    print("fit_grouper: " + ", ".join(f"{k} {v:.3f}" for k, v in quality.items()))


if __name__ == "__main__":
    main()
