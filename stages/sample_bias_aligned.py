"""sample_bias_aligned: Diffusing DeBias's synthetic set — ddb.num_per_class samples per class from the biased
model at the high classifier-free guidance scale ddb.guidance_scale (w), labelled by their generating class.

The colour judge measures how bias-aligned the set is (logged; the amplifier never sees the judge's labels).
Writes data/methods/ddb_synthetic/{images.npz (images, classes, guidance_scale, origin), grid.png} and
data/metrics/sample_bias_aligned.json.
"""

from pathlib import Path

import numpy as np

from pipeline.data import load_meta, to_uint8
from pipeline.io import atomic_path, save_json, save_npz
from pipeline.judges import judge_outputs, load_judge
from pipeline.metrics import aligned_fraction
from pipeline.pretrained import load_model
from pipeline.report import sample_grid, save_png
from pipeline.sampling import SamplerSettings, sample, sample_seeds
from pipeline.seeds import stream
from stages.common import device, load_params, mlflow_run, stage_main

MODEL, JUDGES, PREPARED = Path("data/models/diffusion"), Path("data/judges"), Path("data/prepared")
OUT = Path("data/methods/ddb_synthetic")


@stage_main
def main() -> None:
    params = load_params()
    p, ps = params.ddb, params.sample
    dev = device()
    model = load_model(MODEL, dev)  # pixel or latent (then sampled in latent space and decoded)
    aligned = np.asarray(load_meta(PREPARED).aligned)  # class y's bias-aligned attribute value
    cond = np.repeat(np.arange(model.num_classes), p.num_per_class)
    seeds = sample_seeds(stream(p.seed, "ddb_synthetic"), len(cond))  # not the scored samples' seeds
    with mlflow_run("sample_bias_aligned", params, ("ddb",), extra_tags={"bias_ratio": str(params.data.bias_ratio),
                                                                         "ddb_seed": str(p.seed)}) as run:
        settings = SamplerSettings.from_params(ps, num_inference_steps=p.num_inference_steps,
                                               guidance_scale=p.guidance_scale, batch_size=p.sample_batch_size)
        images = sample(model, cond, seeds, settings)
        colour, _ = judge_outputs(load_judge(JUDGES / "colour.safetensors", dev), images.to(dev))
        al = aligned_fraction(colour, cond, aligned)
        summary = {"aligned_fraction": al["aligned_fraction"], "guidance_scale": p.guidance_scale,
                   "num_samples": len(cond), "bias_ratio": params.data.bias_ratio,
                   **{f"aligned_fraction_class{y}": v for y, v in al["per_class"].items()}}
        run.metrics(summary)
    uint8 = to_uint8(images)
    with atomic_path(OUT) as tmp:
        tmp.mkdir(parents=True)
        save_npz(tmp / "images.npz", images=uint8, classes=cond, guidance_scale=np.float64(p.guidance_scale),
                 origin=np.array("synthetic"))
        save_png(sample_grid(uint8, cond, min(10, p.num_per_class)), tmp / "grid.png")
    save_json("data/metrics/sample_bias_aligned.json", summary)
    print(f"sample_bias_aligned: {len(cond)} images at w = {p.guidance_scale:g}; aligned fraction "
          f"{al['aligned_fraction']:.3f} (colour judge)")


if __name__ == "__main__":
    main()
