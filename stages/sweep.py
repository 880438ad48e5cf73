"""sweep@<method>: the method's knob over a grid, each point sampled (fewer samples) and scored, for the report's
bias-vs-FID plot. The knob at 0 is always included: the baseline at the same sample size, so points compare fairly.

  latentdir                                 weight w (× each of sweep_steps)
  invdiff, invdiff_lambda0, invdiff_oracle  strength r of f_θ + r·δ (the variants differ in λ and groups)
  distguide                                 scale s of h − s·∇_h L
Rows carry `swept` (the knob's name) and the method's other settings."""

import argparse
import itertools
from pathlib import Path

import numpy as np

from pipeline.data import to_uint8
from pipeline.io import load_json, save_json
from pipeline.methods.distribution_guidance import distribution_guidance_hooks
from pipeline.methods.invdiff import InvDiffHooks, load_delta
from pipeline.methods.latent_directions import latent_direction_hooks
from pipeline.pretrained import load_model
from pipeline.sampling import SamplerSettings, sample, sample_seeds
from pipeline.scoring import Scorer
from stages.common import UserError, check_name, device, load_params, mlflow_run, stage_main

MODEL, JUDGES, REF = Path("data/models/diffusion"), Path("data/judges"), Path("data/reference")
INVDIFF = ("invdiff", "invdiff_lambda0", "invdiff_oracle")


def sweep_grid(method: str, params, cond: np.ndarray, dev) -> tuple[str, list[tuple[dict, object]]]:
    """(params section, [(knobs, hooks)]) for one method."""
    if method == "latentdir":
        p = params.latentdir
        grid = [(p.sweep_steps[0], 0.0), *itertools.product(p.sweep_steps, p.sweep_weights)]
        return "latentdir", [({"swept": "weight", "source_step": s, "weight": w},
                              latent_direction_hooks(Path("data/methods/latentdir/directions.npz"), cond, step=s,
                                                     weight=w, target=p.target, seed=params.seed,
                                                     renormalise=p.renormalise)) for s, w in grid]
    if method in INVDIFF:
        folder = Path("data/methods") / method
        delta, lam = load_delta(folder / "delta", dev), load_json(folder / "summary.json")["lam"]
        strengths = sorted({0.0, *params.invdiff.sweep_strengths})
        return "invdiff", [({"swept": "strength", "lam": lam, "strength": r}, InvDiffHooks(delta, r))
                           for r in strengths]
    if method == "distguide":
        p = params.distguide
        return "distguide", [({"swept": "scale", "scale": s},
                              distribution_guidance_hooks(Path("data/methods/distguide/adp.safetensors"), scale=s,
                                                          tau=p.tau, steps=p.steps, group_size=p.batch_size,
                                                          target=p.target, device=dev, beta_power=p.beta_power))
                             for s in sorted({0.0, *p.sweep_scales})]
    raise UserError(f"--method {method!r}: no sweep defined (expected one of: latentdir, {', '.join(INVDIFF)}, "
                    "distguide)")


@stage_main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--method", required=True)
    args = ap.parse_args(argv)
    check_name("sweep", "--method", args.method)
    params = load_params()
    ps = params.sample
    per_class = params.invdiff.sweep_per_class if args.method in INVDIFF else params.latentdir.sweep_per_class
    per_class = params.distguide.sweep_per_class if args.method == "distguide" else per_class
    dev = device()
    model = load_model(MODEL, dev)
    cond = np.repeat(np.arange(model.num_classes), per_class)
    seeds = sample_seeds(params.seed, len(cond))
    section, grid = sweep_grid(args.method, params, cond, dev)
    settings = SamplerSettings.from_params(ps)
    scorer = Scorer(JUDGES, REF, device=dev, k=params.score.pr_k, seed=params.seed,
                    batch_size=params.score.batch_size, bootstrap=params.score.bootstrap,
                    bootstrap_fid=params.score.bootstrap_fid)
    rows = []
    with mlflow_run("sweep", params, (section, "sample", "score"), run_name=f"sweep@{args.method}",
                    extra_tags={"method": args.method}) as run:
        for i, (knobs, hooks) in enumerate(grid):
            images = sample(model, cond, seeds, settings, hooks=hooks, progress=False)
            metrics, _ = scorer(to_uint8(images), cond)
            rows.append({"method": args.method, **knobs, **metrics})
            run.metrics(metrics, step=i)
            shown = " ".join(f"{k} {v:g}" for k, v in knobs.items() if k != "swept")
            print(f"{shown}: normalised bias {metrics['bias_score_normalised']:.3f}, "
                  f"aligned {metrics['aligned_fraction']:.3f}, fidelity {metrics['fidelity']:.3f}, "
                  f"FID vs balanced {metrics['fid_balanced']:.2f}", flush=True)
    save_json(Path("data/sweeps") / f"{args.method}.json", rows)


if __name__ == "__main__":
    main()
