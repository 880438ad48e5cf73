"""Sampling cost of Distribution Guidance: images/s of the guided sampler against the plain sampler, same model,
same batch, same seeds; prints the medians of a few repeats and their ratio (guided / plain).

    python benchmarks/distguide_cost.py          # the model and ADP under data/ (dvc repro fit_adp)
    python benchmarks/distguide_cost.py --repeats 5 --batch 200

Uses the params.yaml knobs (sample.*, distguide.*); the guided run applies the hook at distguide.steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.throughput import sampling_inputs  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.methods.distribution_guidance import distribution_guidance_hooks  # noqa: E402
from pipeline.pretrained import load_model  # noqa: E402
from pipeline.sampling import SamplerHooks, SamplerSettings, sample  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=None, help="images per run (default: distguide.batch_size × 2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--root", default=str(ROOT), help="project directory holding params.yaml and data/")
    args = ap.parse_args()
    root = Path(args.root)
    params = load_params(root / "params.yaml")
    ps, p = params.sample, params.distguide
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(root / "data/models/diffusion", dev)
    n = args.batch or 2 * p.batch_size
    settings = SamplerSettings.from_params(ps, batch_size=n)
    cond, seeds = sampling_inputs(n, params.seed)
    guided = distribution_guidance_hooks(root / "data/methods/distguide/adp.safetensors", scale=p.scale, tau=p.tau,
                                         steps=p.steps, group_size=p.batch_size, target=p.target, device=dev,
                                         beta_power=p.beta_power, space=p.space, guidance_scale=p.guidance_scale)
    runs = {"plain": SamplerHooks(), "guided": guided}

    def once(hooks) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        sample(model, cond, seeds, settings, hooks=hooks, progress=False)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return n / (time.perf_counter() - start)

    once(runs["plain"])  # warm-up
    rates = {k: [] for k in runs}
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits both alike
        for name, hooks in runs.items():
            rates[name].append(once(hooks))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"device {dev}, {torch.get_num_threads()} threads, {n} images per run, {ps.num_inference_steps} steps, "
          f"guided steps [{p.steps[0]}, {p.steps[1]}), guidance batch {p.batch_size}, {args.repeats} repeats")
    for name in runs:
        print(f"{name:>7}: {med[name]:.2f} images/s (runs: {', '.join(f'{r:.2f}' for r in rates[name])})")
    print(f"ratio guided / plain: {med['guided'] / med['plain']:.3f}")


if __name__ == "__main__":
    main()
