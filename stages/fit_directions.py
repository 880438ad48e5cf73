"""fit_directions: Latent Directions' fit — x_t at the recorded steps, either along the DDIM inversion of the
attribute-balanced judge split with its attribute labels (latentdir.fit_on: balanced) or while sampling the biased
model, labelled by the colour judge (samples); one linear SVM per recorded step; saves unit directions with their
step and held-out accuracy."""

from pathlib import Path

import numpy as np

from pipeline.data import balanced_subset, load_split, to_tensor
from pipeline.io import atomic_path, save_json, save_npz
from pipeline.judges import judge_outputs, load_judge
from pipeline.methods.latent_directions import RecordLatents, fit_directions, pool_latents, unpool_directions
from pipeline.pretrained import load_model
from pipeline.report import line_plot
from pipeline.sampling import SamplerSettings, invert, sample, sample_seeds
from pipeline.seeds import key, stream
from stages.common import device, load_params, mlflow_run, stage_main

MODEL, JUDGES, OUT = Path("data/models/diffusion"), Path("data/judges"), Path("data/methods/latentdir")
PREPARED = Path("data/prepared")


@stage_main
def main() -> None:
    params = load_params()
    p, ps = params.latentdir, params.sample
    dev = device()
    model = load_model(MODEL, dev)
    colour = load_judge(JUDGES / "colour.safetensors", dev)
    num_attr = colour.config["num_outputs"]
    settings = SamplerSettings.from_params(ps)
    if p.fit_on == "balanced":  # DDIM inversion of labelled, attribute-balanced real images under their own class
        split = load_split(PREPARED, "judge", with_bias=True)
        idx = balanced_subset(split.classes, p.fit_per_class, key(params.seed, "latentdir_subset"))
        z, kept = invert(model, to_tensor(split.images[idx]), split.classes[idx], settings,
                         keep_steps=p.record_steps)
        raw, labels, shape = {s: v.numpy() for s, v in kept.items()}, split.bias[idx], tuple(z.shape[1:])
    else:
        cond = np.repeat(np.arange(model.num_classes), p.fit_per_class)
        fit_seeds = sample_seeds(stream(params.seed, "latentdir_fit"), len(cond))  # not the scored seeds
        recorder = RecordLatents(p.record_steps)
        images = sample(model, cond, fit_seeds, settings, hooks=recorder)
        labels, _ = judge_outputs(colour, images.to(dev))
        raw, shape = recorder.stacked(), recorder.shape
    latents = pool_latents(raw, shape, p.pool)
    steps, directions, accuracy, missing = fit_directions(latents, labels, num_attr, C=p.svm_c,
                                                          holdout=p.holdout, seed=params.seed,
                                                          allow_missing=p.allow_missing)
    if missing:
        print(f"warning: colours {missing} never occurred in the fitting samples; their directions are zero "
              "(samples assigned to them are not steered)")
    directions = unpool_directions(directions, shape, p.pool)
    curve = [{"step": int(s), "svm_accuracy": float(a)} for s, a in zip(steps, accuracy, strict=True)]
    with mlflow_run("fit_directions", params, ("latentdir", "sample")) as run:  # opened before the first write
        with atomic_path(OUT) as tmp:
            tmp.mkdir(parents=True)
            save_npz(tmp / "directions.npz", steps=steps, directions=directions, accuracy=accuracy,
                     missing=np.array(missing, dtype=np.int64))
            line_plot(curve, "step", "svm_accuracy", tmp / "svm_accuracy.png",
                      title="held-out SVM accuracy of the colour from x_t (−1 = z_T)")
        save_json("data/metrics/fit_directions.json", curve)
        run.metrics({"missing_colours": len(missing)})
        for row in curve:
            run.metrics({"svm_accuracy": row["svm_accuracy"]}, step=row["step"] + 1)
    print("held-out SVM accuracy per step: " + ", ".join(f"{r['step']}: {r['svm_accuracy']:.3f}" for r in curve))


if __name__ == "__main__":
    main()
