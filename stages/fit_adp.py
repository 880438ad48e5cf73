"""fit_adp: Distribution Guidance's fit — record h_t (output of distguide.h_module) at every sampling step, either
along the DDIM inversion of the attribute-balanced judge split with its attribute labels (distguide.fit_on: balanced,
the published recipe) or while sampling the biased model, labelled by the colour judge on the final image (samples),
and train the Attribute Distribution Predictor ADP_t(h) → colour logits (pipeline/methods/distribution_guidance.py).

distguide.adp: linear (one probe per step) | mlp (one step-conditioned MLP) | auto (fit both, keep the one with the
higher mean held-out accuracy on the minority samples: label ≠ the class's most frequent label).
Writes data/methods/distguide/{adp.safetensors, adp_accuracy.png, summary.json} and the per-step accuracy curve
data/metrics/fit_adp.json (a DVC plot).
"""

from pathlib import Path

import numpy as np

from pipeline.data import balanced_subset, load_split, to_tensor
from pipeline.io import atomic_path, save_json
from pipeline.judges import judge_outputs, load_judge
from pipeline.methods.distribution_guidance import RecordH, save_adp, train_adp
from pipeline.pretrained import load_model
from pipeline.report import line_plot
from pipeline.sampling import SamplerSettings, invert, sample, sample_seeds
from pipeline.seeds import key, stream
from stages.common import device, load_params, mlflow_run, stage_main

MODEL, JUDGES, OUT = Path("data/models/diffusion"), Path("data/judges"), Path("data/methods/distguide")
PREPARED = Path("data/prepared")


@stage_main
def main() -> None:
    params = load_params()
    p, ps = params.distguide, params.sample
    dev = device()
    model = load_model(MODEL, dev)
    colour = load_judge(JUDGES / "colour.safetensors", dev)
    num_attr, num_classes = colour.config["num_outputs"], model.num_classes
    settings = SamplerSettings.from_params(ps)
    recorder = RecordH(p.h_module, p.pool, p.pool_weights)
    if p.fit_on == "balanced":  # h along the DDIM inversion of labelled, attribute-balanced real images
        split = load_split(PREPARED, "judge", with_bias=True)
        idx = balanced_subset(split.classes, p.fit_per_class, key(params.seed, "distguide_subset"))
        cond, labels = split.classes[idx], split.bias[idx]
        invert(model, to_tensor(split.images[idx]), cond, settings, hooks=recorder)
    else:
        cond = np.repeat(np.arange(num_classes), p.fit_per_class)
        fit_seeds = sample_seeds(stream(params.seed, "distguide_fit"), len(cond))  # not the scored seeds
        images = sample(model, cond, fit_seeds, settings, hooks=recorder)
        labels, _ = judge_outputs(colour, images.to(dev))
    h = recorder.stacked()
    timesteps = [recorder.timesteps[s] for s in sorted(recorder.timesteps)]
    betas = settings.make_scheduler(model).betas[timesteps].tolist()  # β_t at each step, for the step size s·β_t^p
    fits = {}
    for kind in (("linear", "mlp") if p.adp == "auto" else (p.adp,)):
        fits[kind] = train_adp(h, labels, cond, kind=kind, shape=recorder.shape, num_attr=num_attr,
                               num_classes=num_classes, timesteps=timesteps, betas=betas, module=p.h_module,
                               hidden=p.hidden,
                               class_offset=p.class_offset, pool=p.pool, pool_weights=p.pool_weights,
                               epochs=p.epochs,
                               lr=p.lr, weight_decay=p.weight_decay, holdout=p.holdout, seed=params.seed)
    # Minority accuracy decides: a class-prior guess already scores ~0.95 plain accuracy on a biased model.
    chosen = max(fits, key=lambda k: (float(np.nan_to_num(np.mean(fits[k][1]["minority_accuracy"]))),
                                      float(np.mean(fits[k][1]["accuracy"]))))
    curve = [{"step": s, **{f"{k}_{m}": float(acc[m][s]) for k, (_, acc) in fits.items() for m in acc}}
             for s in range(len(timesteps))]
    for row in curve:
        row["accuracy"] = row[f"{chosen}_accuracy"]
    summary = {"chosen": chosen, "label_counts": np.bincount(labels, minlength=num_attr).tolist(),
               **{f"{k}_mean_{m}": float(np.mean(acc[m])) for k, (_, acc) in fits.items() for m in acc}}
    with mlflow_run("fit_adp", params, ("distguide", "sample")) as run:  # opened before the first write
        with atomic_path(OUT) as tmp:
            tmp.mkdir(parents=True)
            save_adp(fits[chosen][0], tmp / "adp.safetensors",
                     extra={"chosen_by": "mean held-out minority accuracy"})
            line_plot(curve, "step", "accuracy", tmp / "adp_accuracy.png",
                      title=f"held-out accuracy of the colour from h_t ({chosen} ADP; step 0 = noisiest)")
            save_json(tmp / "summary.json", summary)
        save_json("data/metrics/fit_adp.json", curve)
        run.metrics({k: v for k, v in summary.items() if k != "label_counts"})
        for row in curve:
            run.metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        run.artifact(OUT / "adp_accuracy.png")
        run.model(OUT / "adp.safetensors", "adp", "adp")  # an MLflow model (docs/tracking.md)
    print(f"ADP: {chosen} (mean held-out accuracy, minority accuracy: " + ", ".join(
        f"{k} {summary[f'{k}_mean_accuracy']:.3f}, {summary[f'{k}_mean_minority_accuracy']:.3f}" for k in fits) + ")")
    print("held-out accuracy per step: " + ", ".join(f"{r['step']}: {r['accuracy']:.3f}" for r in curve))


if __name__ == "__main__":
    main()
