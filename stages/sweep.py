"""sweep@<method>: the method's knob over a grid, each point sampled (fewer samples) and scored, for the report's
bias-vs-FID plot. The knob at 0 is always included: the baseline at the same sample size, so points compare fairly.
Each method's knob and grid: its entry in pipeline/methods/registry.py (latentdir: the weight w at each of
sweep_steps; invdiff and its ablations: the strength r of f_θ + r·δ; distguide: the scale s of h − s·∇_h L).
Rows carry `swept` (the knob's name) and the method's other settings. The sweep samples come from the validation
seed stream (`knob_validation`), never the scored samples' seeds, so a knob read off the sweep is chosen on
validation data."""

import argparse
from pathlib import Path

import numpy as np

from pipeline.data import to_uint8
from pipeline.io import save_json
from pipeline.methods.registry import get_method
from pipeline.pretrained import load_model
from pipeline.sampling import SamplerSettings, sample, sample_seeds
from pipeline.scoring import Scorer
from pipeline.seeds import stream
from stages.common import check_name, device, load_params, mlflow_run, stage_main

MODEL, JUDGES, REF = Path("data/models/diffusion"), Path("data/judges"), Path("data/reference")


@stage_main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--method", required=True)
    args = ap.parse_args(argv)
    check_name("sweep", "--method", args.method)
    params = load_params()
    ps = params.sample
    method = get_method(args.method)
    dev = device()
    model = load_model(MODEL, dev)
    cond = np.repeat(np.arange(model.num_classes), method.sweep_per_class(params))
    seeds = sample_seeds(stream(params.seed, "knob_validation"), len(cond))  # not the scored samples' seeds
    section, grid = method.section, method.sweep_grid(params, cond, dev)
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
