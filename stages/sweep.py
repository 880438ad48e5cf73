"""sweep@<method>: the method's knobs over a grid, each point sampled (fewer samples) and scored, for the report's
bias-vs-FID plot. Weight 0 is always included: the baseline at the same sample size, so points compare fairly."""

import argparse
import itertools
from pathlib import Path

import numpy as np

from pipeline.data import NUM_CLASSES, to_uint8
from pipeline.diffusion import load_diffusion
from pipeline.io import save_json
from pipeline.methods.latent_directions import latent_direction_hooks
from pipeline.models import null_class
from pipeline.sampling import make_scheduler, sample, sample_seeds
from pipeline.scoring import Scorer
from stages.common import UserError, device, load_params, mlflow_run, stage_main

MODEL, JUDGES, REF = Path("data/models/diffusion"), Path("data/judges"), Path("data/reference")


@stage_main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--method", required=True)
    args = ap.parse_args(argv)
    params = load_params()
    if args.method != "latentdir":
        raise UserError(f"--method {args.method!r}: no sweep defined (expected: latentdir)")
    p, ps = params.latentdir, params.sample
    cond = np.repeat(np.arange(NUM_CLASSES), p.sweep_per_class)
    seeds = sample_seeds(params.seed, len(cond))
    grid = [(p.sweep_steps[0], 0.0), *itertools.product(p.sweep_steps, p.sweep_weights)]
    dev = device()
    unet, sched_cfg = load_diffusion(MODEL, dev)
    scheduler = make_scheduler(sched_cfg, ps.scheduler, ps.timestep_spacing)
    scorer = Scorer(JUDGES, REF, device=dev, k=params.score.pr_k, seed=params.seed,
                    batch_size=params.score.batch_size)
    rows = []
    with mlflow_run("sweep", params, ("latentdir", "sample", "score"), run_name=f"sweep@{args.method}",
                    extra_tags={"method": args.method}) as run:
        for i, (step, weight) in enumerate(grid):
            hooks = latent_direction_hooks(Path("data/methods/latentdir/directions.npz"), cond, step=step,
                                           weight=weight, target=p.target, seed=params.seed,
                                           renormalise=p.renormalise)
            images = sample(unet, scheduler, cond, seeds, num_inference_steps=ps.num_inference_steps,
                            guidance_scale=ps.guidance_scale, eta=ps.eta, batch_size=ps.batch_size,
                            null_class=null_class(unet), hooks=hooks, device=dev, progress=False)
            metrics, _ = scorer(to_uint8(images), cond)
            rows.append({"method": args.method, "source_step": step, "weight": weight, **metrics})
            run.metrics(metrics, step=i)
            print(f"step {step} w {weight:g}: normalised bias {metrics['bias_score_normalised']:.3f}, "
                  f"aligned {metrics['aligned_fraction']:.3f}, fidelity {metrics['fidelity']:.3f}, "
                  f"FID {metrics['fid_indomain']:.2f}", flush=True)
    save_json(Path("data/sweeps") / f"{args.method}.json", rows)


if __name__ == "__main__":
    main()
