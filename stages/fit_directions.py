"""fit_directions: Latent Directions' fit — record x_t while sampling the biased model, label each sample with the
colour judge, fit one linear SVM per recorded step; save unit directions with their step and held-out accuracy."""

from pathlib import Path

import numpy as np

from pipeline.io import atomic_path, save_json, save_npz
from pipeline.methods.latent_directions import RecordLatents, fit_directions, pool_latents, unpool_directions
from pipeline.models import judge_outputs, load_judge
from pipeline.pretrained import load_model
from pipeline.report import line_plot
from pipeline.sampling import make_scheduler, sample, sample_seeds
from stages.common import device, load_params, mlflow_run, stage_main

MODEL, JUDGES, OUT = Path("data/models/diffusion"), Path("data/judges"), Path("data/methods/latentdir")


@stage_main
def main() -> None:
    params = load_params()
    p, ps = params.latentdir, params.sample
    dev = device()
    model = load_model(MODEL, dev)
    colour = load_judge(JUDGES / "colour.safetensors", dev)
    num_attr = colour.config["num_outputs"]
    cond = np.repeat(np.arange(model.num_classes), p.fit_per_class)
    seeds = sample_seeds(params.seed + 1, len(cond))  # a stream of its own, disjoint from the scored samples
    recorder = RecordLatents(p.record_steps)
    images = sample(model.unet, make_scheduler(model.scheduler_config, ps.scheduler, ps.timestep_spacing), cond,
                    seeds, num_inference_steps=ps.num_inference_steps, guidance_scale=ps.guidance_scale, eta=ps.eta,
                    batch_size=ps.batch_size, null_class=model.null_class, hooks=recorder, device=dev,
                    conditioning=model.conditioning, vae=model.vae)
    labels, _ = judge_outputs(colour, images.to(dev))
    latents = pool_latents(recorder.stacked(), recorder.shape, p.pool)
    steps, directions, accuracy, missing = fit_directions(latents, labels, num_attr, C=p.svm_c,
                                                          holdout=p.holdout, seed=params.seed,
                                                          allow_missing=p.allow_missing)
    if missing:
        print(f"warning: colours {missing} never occurred in the fitting samples; their directions are zero "
              "(samples assigned to them are not steered)")
    directions = unpool_directions(directions, recorder.shape, p.pool)
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
