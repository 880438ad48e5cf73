"""Our training and sampling loops side by side with the obvious peer, the same diffusers U-Net in a plain eager
fp32 loop, in one run; medians of interleaved repeats and their ratios (docs/results.md, "Where the time goes").

    python benchmarks/throughput.py              # the default profile's U-Net and batches (~5 CPU minutes)
    python benchmarks/throughput.py --quick      # a tiny U-Net, to check the script (seconds)

(a) training steps/s: pipeline.diffusion.train_step (AdamW, warm-up schedule, grad clipping, EMA, label dropout,
    through accelerate) against UNet2DModel + DDPMScheduler.add_noise + MSE + AdamW, and our step without its EMA
    and gradient clipping (what the peer does not do) as a third arm;
(b) sampling images/s: pipeline.sampling.sample against a plain DDIMScheduler loop with the same per-sample
    generators, at guidance scale 1 and > 1 (classifier-free guidance doubles the U-Net batch); the two must give
    the same images bit for bit (max_abs_diff in the JSON), so the comparison is apples to apples;
(c) InvDiff (f_θ + r·δ) and Distribution Guidance (h-space gradient step) sampling time against the plain sampler,
    at Distribution Guidance's guidance batch (distguide.batch_size images: one group), and InvDiff again at the
    batch sample@invdiff uses (sample.batch_size);
(d) a lever measured, not taken: the plain sampler under bf16 autocast on the CPU against fp32 (same images, n
    per timing; its images differ from fp32's in the last bits, max |Δ| in the JSON).
δ and the ADP are built untrained (δ: make_delta of the U-Net; ADP: random probe weights): their cost does not
depend on what they learnt. Training images are seeded random tensors of the profile's shape, for the same reason.
Both arms run on one thread (torch.set_num_threads(1), `--threads`) so a shared machine treats them alike; arms
are interleaved over `--reps` repeats (`round_order`: over 2k repeats of k arms each arm runs in each position
equally often), and rates count the process's CPU seconds (wall-clock rates are kept alongside: under load they
also count other jobs' turns on the core).
Results: benchmarks/results/throughput_cpu.json (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.conditioning import Conditioning  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.data import NUM_CLASSES  # noqa: E402
from pipeline.diffusion import build_unet, make_noise_scheduler, null_class, optimisers, train_step  # noqa: E402
from pipeline.pretrained import DiffusionModel  # noqa: E402
from pipeline.sampling import SamplerSettings, make_scheduler, sample, sample_seeds  # noqa: E402

QUICK = {"block_out_channels": [16, 32], "train_batch": 8, "train_steps": 2, "sample_n": 4, "method_n": 4,
         "pipeline_n": 8, "sample_steps": 3, "distguide_steps": [0, 2], "reps": 2, "train_reps": 2}


# ---------------------------------------------------------------------------------------------------------------
# the peer loops: plain diffusers, nothing of ours


def peer_train_loop(unet, scheduler, opt, images, classes, gen, *, batch: int, steps: int) -> None:
    """diffusers' train_text_to_image habit, eager fp32: add_noise, v/ε target, MSE, AdamW."""
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        x0, y = images[idx], classes[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        x_t = scheduler.add_noise(x0, noise, t)
        target = scheduler.get_velocity(x0, noise, t) if scheduler.config.prediction_type == "v_prediction" else noise
        loss = F.mse_loss(unet(x_t, t, class_labels=y).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@torch.no_grad()
def peer_ddim(unet, scheduler, cond: np.ndarray, seeds: np.ndarray, *, steps: int, guidance_scale: float,
              null: int) -> torch.Tensor:
    """A plain DDIM loop (diffusers' DDIMPipeline with class labels and classifier-free guidance); one generator
    per sample, as diffusers pipelines take a list of generators."""
    from diffusers.utils.torch_utils import randn_tensor

    size = unet.config.sample_size
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = randn_tensor((len(cond), unet.config.in_channels, size, size), generator=gens) * scheduler.init_noise_sigma
    y = torch.as_tensor(cond, dtype=torch.long)
    labels = torch.cat([y, torch.full_like(y, null)]) if guidance_scale != 1.0 else y
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x_in = torch.cat([x, x]) if guidance_scale != 1.0 else x
        out = unet(x_in, t, class_labels=labels).sample
        if guidance_scale != 1.0:
            f_cond, f_null = out.chunk(2)
            out = f_null + guidance_scale * (f_cond - f_null)
        x = scheduler.step(out, t, x, eta=0.0).prev_sample
    return x.clamp(-1, 1)


# ---------------------------------------------------------------------------------------------------------------
# the arms


def sampling_inputs(k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(classes, seeds) of k images: the classes in turn, as balanced as k allows."""
    return np.repeat(np.arange(NUM_CLASSES), -(-k // NUM_CLASSES))[:k], sample_seeds(seed, k)


def h_shape(unet, module: str, size: int) -> tuple[int, ...]:
    """[C, H, W] of the output of the U-Net submodule `module` (where Distribution Guidance reads h)."""
    seen = []
    handle = unet.get_submodule(module).register_forward_hook(lambda m, i, o: seen.append(o.shape[1:]))
    with torch.no_grad():
        unet(torch.zeros(1, unet.config.in_channels, size, size), torch.tensor([0]), class_labels=torch.tensor([0]))
    handle.remove()
    return tuple(seen[0])


def untrained_methods(unet, scheduler, params, *, steps: int, group: int, dg_steps, seed: int):
    """(InvDiff hooks with an untrained δ, Distribution Guidance hooks with a random linear ADP)."""
    from pipeline.methods.distribution_guidance import ADP, DistributionGuidanceHooks
    from pipeline.methods.invdiff import InvDiffHooks, make_delta

    torch.manual_seed(seed)
    delta = make_delta(unet, width=params.invdiff.delta_width).eval()
    invdiff = InvDiffHooks(delta, strength=params.invdiff.strength)
    p = params.distguide
    scheduler.set_timesteps(steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    adp = ADP("linear", h_shape(unet, p.h_module, unet.config.sample_size), NUM_CLASSES, steps, NUM_CLASSES,
              class_offset=p.class_offset, pool=p.pool, pool_weights=p.pool_weights, timesteps=timesteps,
              module=p.h_module, betas=[float(scheduler.betas[t]) for t in timesteps])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adp.weight.copy_(torch.randn(adp.weight.shape, generator=gen))
    adp.requires_grad_(False)
    distguide = DistributionGuidanceHooks(adp.eval(), p.target, scale=p.scale, tau=p.tau, steps=tuple(dg_steps),
                                          group_size=group, beta_power=p.beta_power, space=p.space,
                                          guidance_scale=p.guidance_scale)
    return invdiff, distguide


def round_order(names: list[str], r: int) -> list[str]:
    """The arms' order in round r: the list rotated by r mod k, reversed on every other pass of k rounds. Over 2k
    rounds every arm runs in every position twice (k = 2: ABBA BAAB), so no arm always sits between two others
    — plain ABBA with three arms keeps the middle one there every round, so any order effect hits it every time."""
    k = len(names)
    rotated = names[r % k:] + names[:r % k]
    return rotated[::-1] if (r // k) % 2 else rotated


def interleaved(arms: dict, reps: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(rates by CPU time, rates by wall time) of each arm — a callable returning the work done per call — over
    `reps` rounds in `round_order`, after one warm-up call each. CPU time (process_time, one torch thread) is what
    the ratios use: on a shared machine the wall clock also counts the time other jobs held the core."""
    for fn in arms.values():
        fn()
    cpu, wall = {k: [] for k in arms}, {k: [] for k in arms}
    for r in range(reps):
        for name in round_order(list(arms), r):
            c0, w0 = time.process_time(), time.perf_counter()
            work = arms[name]()
            cpu[name].append(work / (time.process_time() - c0))
            wall[name].append(work / (time.perf_counter() - w0))
    return cpu, wall


def ratio_interval(a: list[float], b: list[float], *, seed: int, resamples: int = 2000) -> list[float]:
    """95% percentile-bootstrap interval of median(a) / median(b), resampling the rounds (a[r] and b[r] were timed
    in the same round, so a round is resampled whole: slow spells of a shared machine hit both arms)."""
    a, b = np.asarray(a), np.asarray(b)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    boot = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    return [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]


def machine() -> dict:
    import diffusers

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else None, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "python": platform.python_version(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def run(*, quick: bool = False, reps: int | None = None, threads: int = 1, guidance: float = 3.0,
        out: Path | None = None, params_path: Path = ROOT / "params.yaml", log=print) -> dict:
    torch.set_num_threads(threads)
    params = load_params(params_path)
    d, s = params.diffusion.model_dump(), params.sample
    cfg = {"block_out_channels": d["block_out_channels"], "train_batch": d["batch_size"], "train_steps": 4,
           "sample_n": 50, "method_n": params.distguide.batch_size, "pipeline_n": s.batch_size,
           "sample_steps": s.num_inference_steps,
           "distguide_steps": list(params.distguide.steps), "reps": 4, "train_reps": 24}
    if quick:
        cfg.update(QUICK)
    reps = reps or cfg["reps"]
    # the training ratio sits near 1 (the target's edge): more rounds for a tighter interval (still ±6% on a
    # noisy shared 2-core machine: docs/results.md "Where the time goes")
    train_reps = max(reps, cfg["train_reps"])
    res = params.data.resolution
    log(f"machine: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()} (both arms), "
        f"load {os.getloadavg()[0]:.2f}; {reps} interleaved repeats")

    def new_unet():
        torch.manual_seed(params.seed)
        return build_unet(resolution=res, num_classes=NUM_CLASSES, block_out_channels=cfg["block_out_channels"],
                          layers_per_block=d["layers_per_block"], attention=d["attention"])

    # (a) training
    from accelerate import Accelerator
    from diffusers import UNet2DModel

    gen = torch.Generator().manual_seed(params.seed)
    images = torch.rand((max(1000, cfg["train_batch"]), 3, res, res), generator=gen) * 2 - 1
    classes = torch.randint(0, NUM_CLASSES, (len(images),), generator=gen)
    accelerator = Accelerator(mixed_precision="no", cpu=True)
    sched = make_noise_scheduler(d["num_train_timesteps"], d["beta_schedule"], d["prediction_type"])
    k = cfg["train_steps"]

    class WithoutClipping:  # the accelerator, with gradient clipping a no-op (the "bare" arm)
        def __getattr__(self, name):
            return getattr(accelerator, name)

        def clip_grad_norm_(self, *args, **kwargs):
            return None

    def our_loop(bare: bool):
        """train_diffusion's step on a fresh U-Net; bare: without its EMA and gradient clipping (where the gap
        to the peer is, if it is in what the peer does not do)."""
        unet = new_unet()
        ema, opt, lr_sched = optimisers(unet, d)
        unet, opt = accelerator.prepare(unet, opt)
        unet.train()
        if bare:
            ema = SimpleNamespace(step=lambda *args, **kwargs: None)
        acc = WithoutClipping() if bare else accelerator
        gen, step, null, conditioning = torch.Generator().manual_seed(1), [0], null_class(unet), Conditioning()

        def fn():
            for _ in range(k):
                loss = train_step(unet, opt, lr_sched, ema, sched, images, classes, gen,
                                  batch=cfg["train_batch"], label_dropout=d["label_dropout"], null=null,
                                  conditioning=conditioning, accelerator=acc, step=step[0])
                accelerator.gather(loss[None]).mean().item()  # what train_diffusion's loop does with it every step
                step[0] += 1
            return k
        return fn, unet

    ours_train, ours_unet = our_loop(bare=False)
    ours_bare, _ = our_loop(bare=True)
    peer_unet = UNet2DModel.from_config(ours_unet.config)
    peer_unet.load_state_dict(ours_unet.state_dict())
    peer_unet.train()
    peer_opt = torch.optim.AdamW(peer_unet.parameters(), lr=d["lr"], weight_decay=0.0)
    peer_gen = torch.Generator().manual_seed(1)

    def peer_train():
        peer_train_loop(peer_unet, sched, peer_opt, images, classes, peer_gen, batch=cfg["train_batch"], steps=k)
        return k

    log(f"(a) training: batch {cfg['train_batch']}, {k} steps per timing, U-Net {cfg['block_out_channels']}")
    train_rates, train_wall = interleaved({"ours": ours_train, "peer": peer_train, "ours_bare": ours_bare},
                                          train_reps)

    # (b) sampling, (c) methods
    unet = new_unet().eval()
    null = null_class(unet)
    n, m, steps = cfg["sample_n"], cfg["method_n"], cfg["sample_steps"]

    cond, seeds = sampling_inputs(n, params.seed)
    model = DiffusionModel(unet=unet, scheduler_config=dict(sched.config))

    def settings(w, k, autocast=None):
        return SamplerSettings(num_inference_steps=steps, guidance_scale=w, eta=0.0, batch_size=k,
                               scheduler=s.scheduler, timestep_spacing=s.timestep_spacing, autocast=autocast)

    peer_sched = make_scheduler(sched.config, "ddim", s.timestep_spacing)
    invdiff, distguide = untrained_methods(unet, make_scheduler(sched.config, s.scheduler, s.timestep_spacing),
                                           params, steps=steps, group=m, dg_steps=cfg["distguide_steps"],
                                           seed=params.seed)
    diffs = {}

    def ours(w, hooks=None, k=n, autocast=None):
        c, sd = sampling_inputs(k, params.seed)

        def fn():
            sample(model, c, sd, settings(w, k, autocast), hooks=hooks, progress=False)
            return k
        return fn

    def peer(w):
        def fn():
            peer_ddim(unet, peer_sched, cond, seeds, steps=steps, guidance_scale=w, null=null)
            return n
        return fn

    for w in (1.0, guidance):
        a = sample(model, cond, seeds, settings(w, n), progress=False)
        b = peer_ddim(unet, peer_sched, cond, seeds, steps=steps, guidance_scale=w, null=null)
        diffs[f"w{w:g}"] = float((a - b).abs().max())
    log(f"(b) sampling: {n} images per timing, {steps} steps, guidance 1 and {guidance:g}; "
        f"ours vs peer max |Δ|: {diffs}")
    arms = {"ours_w1": ours(1.0), "peer_w1": peer(1.0), f"ours_w{guidance:g}": ours(guidance),
            f"peer_w{guidance:g}": peer(guidance)}
    sample_rates, sample_wall = interleaved(arms, reps)
    # (c) at the guidance batch of Distribution Guidance (its groups are whole batches), guidance scale 1
    log(f"(c) methods: {m} images per timing (one guidance group), {steps} steps, guided steps "
        f"{cfg['distguide_steps']}")
    rates, wall = interleaved({"baseline": ours(1.0, None, m), "invdiff": ours(1.0, invdiff, m),
                               "distguide": ours(1.0, distguide, m)}, reps)
    sample_rates.update(rates)
    sample_wall.update(wall)
    big = cfg["pipeline_n"]
    log(f"(c) InvDiff at sample@invdiff's batch: {big} images per timing")
    rates, wall = interleaved({f"baseline_{big}": ours(1.0, None, big), f"invdiff_{big}": ours(1.0, invdiff, big)},
                              reps)
    sample_rates.update(rates)
    sample_wall.update(wall)
    bf16_diff = float((sample(model, cond, seeds, settings(1.0, n, True), progress=False)
                       - sample(model, cond, seeds, settings(1.0, n, False), progress=False)).abs().max())
    log(f"(d) bf16 autocast on the CPU: {n} images per timing; max |Δ| vs fp32 {bf16_diff:.3g}")
    rates, wall = interleaved({"ours_w1_fp32": ours(1.0, None, n, False), "ours_w1_bf16": ours(1.0, None, n, True)},
                              reps)
    sample_rates.update(rates)
    sample_wall.update(wall)

    med = {f"train_{k}": statistics.median(v) for k, v in train_rates.items()}
    med.update({k: statistics.median(v) for k, v in sample_rates.items()})
    wall_med = {f"train_{k}": statistics.median(v) for k, v in train_wall.items()}
    wall_med.update({k: statistics.median(v) for k, v in sample_wall.items()})
    ratios = {"train_ours_over_peer": med["train_ours"] / med["train_peer"],
              "train_ours_without_ema_clipping_over_peer": med["train_ours_bare"] / med["train_peer"],
              "sample_w1_ours_over_peer": med["ours_w1"] / med["peer_w1"],
              f"sample_w{guidance:g}_ours_over_peer": med[f"ours_w{guidance:g}"] / med[f"peer_w{guidance:g}"],
              # time ratios (method / baseline sampler): the inverse of the rate ratio
              "invdiff_time_over_baseline": med["baseline"] / med["invdiff"],
              f"invdiff_time_over_baseline_at_{big}": med[f"baseline_{big}"] / med[f"invdiff_{big}"],
              "distguide_time_over_baseline": med["baseline"] / med["distguide"],
              "sample_bf16_time_over_fp32": med["ours_w1_fp32"] / med["ours_w1_bf16"]}
    # the noise: range over repeats of the paired ratio (same round, adjacent timings)
    pairs = {"train_ours_over_peer": (train_rates["ours"], train_rates["peer"]),
             "train_ours_without_ema_clipping_over_peer": (train_rates["ours_bare"], train_rates["peer"]),
             "sample_w1_ours_over_peer": (sample_rates["ours_w1"], sample_rates["peer_w1"]),
             f"sample_w{guidance:g}_ours_over_peer": (sample_rates[f"ours_w{guidance:g}"],
                                                      sample_rates[f"peer_w{guidance:g}"]),
             "invdiff_time_over_baseline": (sample_rates["baseline"], sample_rates["invdiff"]),
             f"invdiff_time_over_baseline_at_{big}": (sample_rates[f"baseline_{big}"], sample_rates[f"invdiff_{big}"]),
             "distguide_time_over_baseline": (sample_rates["baseline"], sample_rates["distguide"]),
             "sample_bf16_time_over_fp32": (sample_rates["ours_w1_fp32"], sample_rates["ours_w1_bf16"])}
    paired = {k: [a / b for a, b in zip(*v, strict=True)] for k, v in pairs.items()}
    spread = {k: [min(v), max(v)] for k, v in paired.items()}
    ci95 = {k: ratio_interval(*v, seed=params.seed) for k, v in pairs.items()}
    targets = {"train_ge_1": ratios["train_ours_over_peer"] >= 1.0,
               "sample_ge_1": min(ratios["sample_w1_ours_over_peer"],
                                  ratios[f"sample_w{guidance:g}_ours_over_peer"]) >= 1.0,
               "invdiff_le_1.25": ratios["invdiff_time_over_baseline"] <= 1.25,
               f"invdiff_le_1.25_at_{big}": ratios[f"invdiff_time_over_baseline_at_{big}"] <= 1.25}
    result = {"machine": machine(), "quick": quick, "reps": reps, "config": cfg, "guidance_scale": guidance,
              "units": {"train": "steps/s", "sample": "images/s"},
              "timing": "rates per CPU second of the process (one torch thread); wall-clock rates alongside",
              "rates": {"train": train_rates, "sample": sample_rates},
              "wall_rates": {"train": train_wall, "sample": sample_wall}, "medians": med, "wall_medians": wall_med,
              "ratios": ratios, "ratio_ci95": ci95, "ratio_range_over_repeats": spread,
              "train_reps": train_reps,
              "targets_met": targets, "ours_vs_peer_max_abs_diff": diffs,
              "bf16_vs_fp32_max_abs_diff": bf16_diff,
              "note": "δ and ADP untrained, training images random: cost does not depend on either"}
    log(f"{'arm':<24}{'median':>10}  unit (per CPU s)  runs  [wall-clock median]")
    for name, v in {**{f"train_{k}": v for k, v in train_rates.items()}, **sample_rates}.items():
        unit = "steps/s" if name.startswith("train") else "images/s"
        log(f"{name:<24}{med[name]:>10.3f}  {unit:<15}  {', '.join(f'{r:.3f}' for r in v)}  "
            f"[{wall_med[name]:.3f}]")
    for name, r in ratios.items():
        log(f"{name:<44}{r:.3f}  [95% {ci95[name][0]:.3f}, {ci95[name][1]:.3f}]  (per-repeat range "
            f"{spread[name][0]:.3f}–{spread[name][1]:.3f})")
    log(f"targets met: {targets}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {out}")
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a tiny U-Net and batch (checks the script, seconds)")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repeats (default 3; quick 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, the same for every arm")
    ap.add_argument("--guidance", type=float, default=3.0, help="the guidance scale > 1 of (b)")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--out", type=Path, default=None,
                    help="results JSON (default benchmarks/results/throughput_cpu[_quick].json)")
    args = ap.parse_args(argv)
    out = args.out or ROOT / "benchmarks/results" / f"throughput_cpu{'_quick' if args.quick else ''}.json"
    run(quick=args.quick, reps=args.reps, threads=args.threads, guidance=args.guidance, out=out,
        params_path=args.params)


if __name__ == "__main__":
    main()
