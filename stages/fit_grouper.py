"""fit_grouper: InvDiff's max step. Per-sample denoising losses of the frozen biased model over the training set
(class labels only — the dataset view has no bias attribute), with `invdiff.loss_contrast` each minus the same
draw's loss under the null class, normalised per timestep and within class; then the soft group matrix W.
The hidden labels are read afterwards, only to score the grouping.

Outputs data/methods/invdiff_groups/: groups.npz (W, scores, losses, timesteps), groups.parquet (one row per
training image: index, class, score, W_k, group), discovery.png (training images of each inferred group, one
row per group: what the grouper found); data/metrics/fit_grouper.json (grouping scored against the hidden
labels, per level: aligned-like vs conflicting-like, then with invdiff.conflict_clusters ≠ 1 the split of the
conflicting-like group against the attribute value)."""

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data import load_split
from pipeline.io import atomic_path, save_json, save_npz
from pipeline.methods.invdiff import grouping_quality, infer_groups, split_quality
from pipeline.pretrained import load_model
from pipeline.report import discovery_grid, save_png
from stages.common import UserError, device, load_params, mlflow_run, stage_main

DATA, MODEL, OUT = Path("data/prepared"), Path("data/models/diffusion"), Path("data/methods/invdiff_groups")


@stage_main
def main() -> None:
    params = load_params()
    p = params.invdiff
    if p.loss_timesteps[1] >= params.diffusion.num_train_timesteps:
        raise UserError(f"invdiff.loss_timesteps: t_max must be < diffusion.num_train_timesteps "
                        f"({params.diffusion.num_train_timesteps}), got {p.loss_timesteps[1]}")
    dev = device()
    model = load_model(MODEL, dev)
    train = load_split(DATA, "train", with_bias=False)
    with mlflow_run("fit_grouper", params, ("invdiff",), run_name="fit_grouper") as run:
        W, scores, losses, info = infer_groups(train, model, p, params.seed, dev)
        hidden = load_split(DATA, "train", with_bias=True)  # scoring only, after W is fixed
        # level 1 (aligned-like vs conflicting-like) on the split's sub-groups merged; level 2: the sub-groups
        # against the attribute value
        first = info["score_groups"] - 1
        merged = np.concatenate([W[:, :first], W[:, first:].sum(1, keepdims=True)], 1)
        quality = {"min_group_share": info["min_group_share"], **grouping_quality(merged, ~hidden.aligned, scores),
                   **split_quality(W, first, hidden.bias, ~hidden.aligned)}
        if "moved_to_group0" in info:
            quality.update(moved_to_group0=info["moved_to_group0"],
                           **{f"silhouette_k{k}": v for k, v in info["silhouette"].items()})
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
