"""Two CPU levers the speed issue names, measured side by side against eager fp32 on the default profile's U-Net:
channels-last memory format and torch.compile (inductor). Both are timed on what the pipeline's heavy stages do —
the training step (train_diffusion; finetune_guidance's δ is the same kind of step) and the no-grad forward at the
grouper's batch (fit_grouper's losses, δ's frozen base, the sampler) — interleaved over repeats (`round_order`),
rates per CPU second of the process at one torch thread, medians. torch.compile's one-off cost (the first call of
each shape: tracing and C++ compilation) is kept apart, with the number of calls it takes to pay for itself.

    python benchmarks/cpu_levers.py                       # ~10 CPU minutes (compilation included)
    python benchmarks/cpu_levers.py --quick --arms eager channels_last   # checks the script (seconds)

Results: benchmarks/results/cpu_levers_cpu.json (`--out`); docs/results.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.throughput import QUICK, interleaved, machine  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.data import NUM_CLASSES  # noqa: E402
from pipeline.diffusion import build_unet  # noqa: E402

ARMS = ("eager", "channels_last", "compile")


def arm(kind: str, params, *, channels: list[int], train_batch: int, forward_batch: int, steps: int):
    """(train fn, forward fn, one-off seconds) for one lever; each fn returns the work it did (steps, images)."""
    d, res = params.diffusion, params.data.resolution
    torch.manual_seed(params.seed)
    unet = build_unet(resolution=res, num_classes=NUM_CLASSES, block_out_channels=channels,
                      layers_per_block=d.layers_per_block, attention=d.attention)
    opt = torch.optim.AdamW(unet.parameters(), lr=d.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    fmt = torch.channels_last if kind == "channels_last" else torch.contiguous_format
    if kind == "channels_last":
        unet = unet.to(memory_format=torch.channels_last)
    model = torch.compile(unet) if kind == "compile" else unet

    def inputs(n):
        x = torch.randn((n, 3, res, res), generator=gen).contiguous(memory_format=fmt)
        return x, torch.randint(0, 1000, (n,), generator=gen), torch.randint(0, NUM_CLASSES, (n,), generator=gen)

    def train():
        unet.train()
        for _ in range(steps):
            x, t, y = inputs(train_batch)
            loss = torch.nn.functional.mse_loss(model(x, t, class_labels=y).sample, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return steps

    @torch.no_grad()
    def forward():
        unet.eval()
        x, t, y = inputs(forward_batch)
        model(x, t, class_labels=y)
        return forward_batch

    one_off = {}
    for name, fn in (("train", train), ("forward", forward)):  # the first call of each: compilation for `compile`
        c0 = time.process_time()
        fn()
        one_off[name] = time.process_time() - c0
    return train, forward, one_off


def run(*, quick: bool, arms: list[str], reps: int, out: Path | None, log=print) -> dict:
    torch.set_num_threads(1)
    cache = tempfile.TemporaryDirectory(prefix="cpu_levers_inductor_")
    if "compile" in arms:  # an empty compile cache, so the one-off cost is a first run's (a warm cache hides it)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name
    params = load_params(ROOT / "params.yaml")
    channels = QUICK["block_out_channels"] if quick else list(params.diffusion.block_out_channels)
    train_batch = QUICK["train_batch"] if quick else params.diffusion.batch_size
    forward_batch = 8 if quick else params.invdiff.loss_batch_size
    steps = 1 if quick else 2
    built = {k: arm(k, params, channels=channels, train_batch=train_batch, forward_batch=forward_batch, steps=steps)
             for k in arms}
    log(f"U-Net {channels}, training batch {train_batch} ({steps} steps per timing), forward batch {forward_batch}; "
        f"{reps} interleaved repeats, one thread")
    train_rates, _ = interleaved({k: v[0] for k, v in built.items()}, reps)
    forward_rates, _ = interleaved({k: v[1] for k, v in built.items()}, reps)
    med = {f"train_{k}": statistics.median(v) for k, v in train_rates.items()}
    med.update({f"forward_{k}": statistics.median(v) for k, v in forward_rates.items()})
    speedup = {f"{what}_{k}_over_eager": med[f"{what}_{k}"] / med[f"{what}_eager"]
               for what in ("train", "forward") for k in arms if k != "eager"}
    one_off = {k: v[2] for k, v in built.items()}
    break_even = {}  # calls after which the compiled arm's one-off cost is paid back (None: it never is)
    if "compile" in arms:
        for what, unit in (("train", steps), ("forward", forward_batch)):
            extra = one_off["compile"][what] - one_off["eager"][what]
            gain = unit / med[f"{what}_eager"] - unit / med[f"{what}_compile"]  # CPU-s saved per call
            break_even[what] = extra / gain if gain > 0 else None
    result = {"machine": machine(), "quick": quick, "reps": reps,
              "config": {"block_out_channels": channels, "train_batch": train_batch, "train_steps_per_timing": steps,
                         "forward_batch": forward_batch},
              "units": {"train": "steps per CPU second", "forward": "images per CPU second"},
              "rates": {"train": train_rates, "forward": forward_rates}, "medians": med,
              "speedup_over_eager": speedup, "first_call_cpu_s": one_off, "compile_break_even_calls": break_even}
    for name, r in speedup.items():
        log(f"{name:<36}{r:.3f}")
    log(f"first call (CPU s): {json.dumps({k: {w: round(s, 1) for w, s in v.items()} for k, v in one_off.items()})}")
    if break_even:
        log(f"torch.compile pays for itself after (calls): {break_even}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {out}")
    cache.cleanup()
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a tiny U-Net and batch (checks the script)")
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    ap.add_argument("--reps", type=int, default=None, help="interleaved repeats (default 4; quick 2)")
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/results/cpu_levers_cpu[_quick].json")
    args = ap.parse_args(argv)
    if "eager" not in args.arms:
        ap.error("--arms must include eager (the reference)")
    out = args.out or ROOT / "benchmarks/results" / f"cpu_levers_cpu{'_quick' if args.quick else ''}.json"
    run(quick=args.quick, arms=args.arms, reps=args.reps or (2 if args.quick else 4), out=out,
        log=lambda *a: print(*a, flush=True))


if __name__ == "__main__":
    main()
