"""sample@<method>: draw num_per_class samples per class with the one sampler and the method's hooks (its entry in
pipeline/methods/registry.py).

Outputs data/samples/<method>/images.npz (uint8 NHWC) and samples.parquet (condition, seed, method, knobs).
Every method uses the same per-sample seeds, so samples are paired across methods.
"""

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data import to_uint8
from pipeline.io import atomic_path, save_npz
from pipeline.methods.registry import get_method
from pipeline.pretrained import load_model
from pipeline.sampling import SamplerSettings, check_memory, sample, sample_seeds
from stages.common import check_name, device, load_params, mlflow_run, stage_main

MODEL = Path("data/models/diffusion")


@stage_main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--method", default="baseline")
    args = ap.parse_args(argv)
    check_name("sample", "--method", args.method)
    params = load_params()
    p = params.sample
    dev = device()
    loaded = {}

    def conditions() -> np.ndarray:  # num_per_class of each of the model's classes
        if "model" not in loaded:
            loaded["model"] = load_model(MODEL, dev)
        k, cfg = loaded["model"].num_classes, loaded["model"].unet.config  # a uint8 image each, plus its float32
        pixels = int(np.prod(np.broadcast_to(cfg.sample_size, 2)))
        check_memory(k * p.num_per_class, 9 * cfg.in_channels * pixels, "sample.num_per_class")
        return np.repeat(np.arange(k), p.num_per_class)

    hooks, knobs = get_method(args.method).sampler(params, conditions, dev)  # pipeline/methods/registry.py
    cond, model = conditions(), loaded["model"]
    seeds = sample_seeds(params.seed, len(cond))
    with mlflow_run("sample", params, ("sample",), run_name=f"sample@{args.method}",
                    extra_tags={"method": args.method}) as run:
        images = sample(model, cond, seeds, SamplerSettings.from_params(p), hooks=hooks)
        run.metrics({"num_samples": len(cond)})
    table = pd.DataFrame({"index": np.arange(len(cond)), "condition": cond, "seed": seeds, "method": args.method,
                          "scheduler": p.scheduler, "num_inference_steps": p.num_inference_steps,
                          "guidance_scale": hooks.guidance_for(p.guidance_scale), "eta": p.eta,
                          **knobs})
    with atomic_path(Path("data/samples") / args.method) as tmp:
        tmp.mkdir(parents=True)
        save_npz(tmp / "images.npz", images=to_uint8(images))
        table.to_parquet(tmp / "samples.parquet", index=False)
    print(f"sample@{args.method}: {len(cond)} images")


if __name__ == "__main__":
    main()
