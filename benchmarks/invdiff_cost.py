"""Sampling cost of InvDiff by the width of its guidance module δ: CPU time of the InvDiff sampler (f_θ + r·δ at
every step) over the plain sampler's, same U-Net, same batch, same seeds, the arms interleaved in one process.

    python benchmarks/invdiff_cost.py                        # widths 0.45 0.3 0.25 0.2, batches 100 and 250
    python benchmarks/invdiff_cost.py --widths 0.25 --repeats 6

The U-Net is params.yaml's architecture, untrained, and δ's zero output layer is replaced by a random one (the cost
of a forward pass does not depend on the weights); so no data is needed. One torch thread; rates per CPU second
(process_time), as in benchmarks/throughput.py. Writes benchmarks/results/invdiff_cost_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.throughput import interleaved, machine, sampling_inputs  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.data import NUM_CLASSES  # noqa: E402
from pipeline.diffusion import build_unet, make_noise_scheduler  # noqa: E402
from pipeline.methods.invdiff import InvDiffHooks, count_params, make_delta  # noqa: E402
from pipeline.pretrained import DiffusionModel  # noqa: E402
from pipeline.sampling import SamplerSettings, sample  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", type=float, nargs="+", default=[0.45, 0.3, 0.25, 0.2])
    ap.add_argument("--batches", type=int, nargs="+", default=[100, 250])
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "invdiff_cost_cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    params = load_params(args.params)
    d, s = params.diffusion, params.sample
    torch.manual_seed(params.seed)
    unet = build_unet(resolution=params.data.resolution, num_classes=NUM_CLASSES,
                      block_out_channels=d.block_out_channels, layers_per_block=d.layers_per_block,
                      attention=d.attention).eval()
    sched = make_noise_scheduler(d.num_train_timesteps, d.beta_schedule, d.prediction_type)
    model = DiffusionModel(unet=unet, scheduler_config=dict(sched.config))
    hooks, deltas = {}, {}
    for w in args.widths:
        delta = make_delta(unet, width=w).eval()
        torch.nn.init.normal_(delta.conv_out.weight, std=1e-3)  # a trained δ's output is not zero
        hooks[f"invdiff_w{w:g}"] = InvDiffHooks(delta, strength=params.invdiff.strength)
        deltas[f"{w:g}"] = {"channels": list(delta.config.block_out_channels),
                            "param_share": count_params(delta) / count_params(unet)}
    rows = {}
    for k in args.batches:
        cond, seeds = sampling_inputs(k, params.seed)
        settings = SamplerSettings.from_params(s, batch_size=k, guidance_scale=1.0)

        def arm(h, cond=cond, seeds=seeds, settings=settings, k=k):
            def fn():
                sample(model, cond, seeds, settings, hooks=h, progress=False)
                return k
            return fn

        rates, _ = interleaved({"baseline": arm(None), **{n: arm(h) for n, h in hooks.items()}}, args.repeats)
        med = {n: statistics.median(v) for n, v in rates.items()}
        rows[str(k)] = {"images_per_cpu_s": med,
                        "time_over_baseline": {n: med["baseline"] / m for n, m in med.items() if n != "baseline"},
                        "runs": rates}
        print(f"batch {k}: " + ", ".join(f"{n} {r:.3f}x" for n, r in rows[str(k)]["time_over_baseline"].items()),
              flush=True)
    result = {"machine": machine(), "steps": s.num_inference_steps, "repeats": args.repeats, "deltas": deltas,
              "timing": "rates per CPU second of the process (one torch thread); arms interleaved, each in "
                        "every position in turn (throughput.round_order)",
              "by_batch": rows, "target": "InvDiff time <= 1.25x the baseline sampler's"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
