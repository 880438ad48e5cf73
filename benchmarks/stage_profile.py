"""Where each stage's time goes: representative stages, shortened, at the default profile's sizes, each under
cProfile and split into U-Net forward, backward, optimiser + EMA, scheduler, judges, metrics, data loading and
the rest (Python around them), in CPU seconds; then the fixed start-up costs a stage or a repro pays (imports,
MLflow, DVC).

    python benchmarks/stage_profile.py                 # about 2 minutes on one thread
    python benchmarks/stage_profile.py --threads 2

Models are built untrained (the U-Net, δ, the judges): cost does not depend on the weights. The data is the
prepared default split (stages.prepare_data is run in a temporary directory when `--project` has none). cProfile
adds a little to every Python call, so "other" is an upper bound. Results: benchmarks/results/stage_profile_cpu.json.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_params  # noqa: E402
from pipeline.data import NUM_CLASSES, load_split, to_tensor  # noqa: E402

# category: (path fragment, function names); a function's cumulative time goes to the first category it matches
CATEGORIES = {
    "unet_forward": [("diffusers/models/unets/unet_2d.py", ("forward",)),
                     ("diffusers/models/unets/unet_2d_condition.py", ("forward",))],
    "backward": [("torch/_tensor.py", ("backward",)), ("torch/autograd/__init__.py", ("grad",))],
    "optimiser_ema": [("torch/optim/optimizer.py", ("wrapper",)), ("diffusers/training_utils.py", ("step",)),
                      ("pipeline/methods/invdiff.py", ("ema_update",)),
                      ("accelerate/accelerator.py", ("clip_grad_norm_",))],
    "scheduler": [("diffusers/schedulers/", ("step", "add_noise", "get_velocity", "set_timesteps"))],
    "judges": [("pipeline/judges.py", ("judge_outputs",))],
    "metrics": [("pipeline/metrics.py", ("precision_recall", "frechet_interval", "frechet_distance")),
                ("pipeline/scoring.py", ("bias_measures",))],
    "data": [("pipeline/data.py", ("load_split", "to_tensor")), ("pipeline/io.py", ("load_npz",))],
}


def breakdown(prof: cProfile.Profile) -> dict[str, float]:
    """Seconds per category (cumulative time of the matched functions, which never call one another) and
    `other` = total − the categories."""
    stats = pstats.Stats(prof).stats
    total = sum(tt for (_, _, tt, _, _) in stats.values())
    out = {k: 0.0 for k in CATEGORIES}
    for (path, _, name), (_, _, _, ct, _) in stats.items():
        for cat, rules in CATEGORIES.items():
            if any(frag in path.replace("\\", "/") and name in names for frag, names in rules):
                out[cat] += ct
                break
    out["other"] = max(0.0, total - sum(out.values()))
    out["total"] = total
    return out


def profiled(fn):
    # CPU seconds of this process (one torch thread): on a shared machine wall time also counts other jobs' turns
    prof = cProfile.Profile(time.process_time)
    start = time.perf_counter()
    prof.enable()
    result = fn()
    prof.disable()
    wall = time.perf_counter() - start
    return result, {**breakdown(prof), "wall": wall}


def stage_segments(project: Path, params, log) -> dict:
    from pipeline.conditioning import Conditioning
    from pipeline.diffusion import build_unet, make_noise_scheduler, null_class, optimisers, train_step
    from pipeline.judges import Judge, judge_outputs
    from pipeline.pretrained import DiffusionModel
    from pipeline.sampling import SamplerSettings, make_scheduler, sample, sample_seeds

    d = params.diffusion.model_dump()
    torch.manual_seed(params.seed)
    unet = build_unet(resolution=params.data.resolution, num_classes=NUM_CLASSES,
                      block_out_channels=d["block_out_channels"], layers_per_block=d["layers_per_block"],
                      attention=d["attention"])
    sched = make_noise_scheduler(d["num_train_timesteps"], d["beta_schedule"], d["prediction_type"])
    segments = {}

    # train_diffusion: load the split, then 10 steps of the loop (its own train_step)
    def train():
        from accelerate import Accelerator

        train = load_split(project / "data/prepared", "train", with_bias=False)
        images, classes = to_tensor(train.images), torch.from_numpy(train.classes)
        accelerator = Accelerator(mixed_precision="no", cpu=True)
        ema, opt, lr_sched = optimisers(unet, d)
        model, opt = accelerator.prepare(unet, opt)
        gen, cond = torch.Generator().manual_seed(params.seed), Conditioning()
        model.train()
        for step in range(10):
            loss = train_step(model, opt, lr_sched, ema, sched, images, classes, gen, batch=d["batch_size"],
                              label_dropout=d["label_dropout"], null=null_class(unet), conditioning=cond,
                              accelerator=accelerator, step=step)
            accelerator.gather(loss[None]).mean().item()
        model.eval()
        return images, classes

    log("profiling train_diffusion (10 steps)")
    (images, classes), segments["train_diffusion (10 of 1600 steps)"] = profiled(train)

    ps = params.sample
    n = 50  # of a 250-image batch: per image the same work, a fifth of the wait
    cond = np.repeat(np.arange(NUM_CLASSES), -(-n // NUM_CLASSES))[:n]
    log(f"profiling sample ({n} images, {ps.num_inference_steps} steps)")
    _, segments[f"sample ({n} of 1,100 images, {ps.num_inference_steps} steps)"] = profiled(lambda: sample(
        DiffusionModel(unet=unet, scheduler_config=dict(sched.config)), cond, sample_seeds(params.seed, n),
        SamplerSettings.from_params(ps, batch_size=n), progress=False))

    p = params.invdiff

    def grouper():
        from pipeline.methods.invdiff import denoising_losses, fit_grouper, loss_timesteps, normalised_scores

        m = p.loss_batch_size
        ts = loss_timesteps(*p.loss_timesteps, p.loss_draws)
        c = Conditioning(class_labels=classes[:m])
        ref = Conditioning(class_labels=torch.full_like(classes[:m], null_class(unet)))
        losses, r = denoising_losses(unet, make_scheduler(sched.config, "ddpm"), images[:m], c, ts, reference=ref,
                                     seed=params.seed, batch_size=m, progress=False)
        scores = normalised_scores(losses, classes[:m].numpy(), r)
        # the grouper's own optimisation runs on all 40,000 scores: tile this batch's
        fit_grouper(np.resize(scores, len(classes)), p.num_groups, min_share=0.05, steps=p.grouper_steps,
                    lr=p.grouper_lr, init=p.grouper_init, seed=params.seed)

    log(f"profiling fit_grouper ({p.loss_batch_size} images' losses + the grouper)")
    _, segments[f"fit_grouper ({p.loss_batch_size} of 40,000 images' losses, whole grouper)"] = profiled(grouper)

    def finetune():
        from pipeline.methods.invdiff import finetune_guidance, make_delta

        delta = make_delta(unet, width=p.delta_width)
        W = np.full((len(images), p.num_groups), 1.0 / p.num_groups)
        cfg = {**p.model_dump(), "steps": 5, "checkpoint_every": 1000}
        with tempfile.TemporaryDirectory() as tmp:
            finetune_guidance(unet, delta, sched, images, Conditioning(class_labels=classes), W, cfg=cfg,
                              seed=params.seed, out_dir=Path(tmp) / "out", ckpt_dir=Path(tmp) / "ckpt",
                              null_class=null_class(unet), progress=False)

    log("profiling finetune_guidance (5 steps)")
    _, segments["finetune_guidance (5 of 1500 steps)"] = profiled(finetune)

    from pipeline.metrics import feature_statistics
    from pipeline.scoring import score_samples

    s = params.score
    colour, digit = Judge(NUM_CLASSES, params.classifiers.width).eval(), Judge(NUM_CLASSES, params.classifiers.width)
    _, feats = judge_outputs(digit.eval(), images[: s.max_reference], s.batch_size)  # fid_reference's job
    mu, sigma = feature_statistics(feats)
    ref = {"mu": mu, "sigma": sigma, "features": feats}
    m = 10 * ps.num_per_class
    fake = np.random.default_rng(params.seed).integers(0, 256, (m, params.data.resolution, params.data.resolution, 3),
                                                       dtype=np.uint8)

    def score():
        score_samples(fake, np.arange(m) % NUM_CLASSES, colour, digit, ref, k=s.pr_k, seed=params.seed,
                      batch_size=s.batch_size, balanced_ref=ref, bootstrap=s.bootstrap,
                      bootstrap_fid=s.bootstrap_fid)

    log("profiling score (1,100 samples, untrained judges)")
    _, segments["score (all 1,100 samples)"] = profiled(score)
    return segments


def child_seconds(cmd: list[str], cwd: Path, env=None) -> tuple[float, float]:
    """(CPU seconds, user + system, of the child process; wall seconds) of one run of cmd."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, wall


def median_seconds(cmd: list[str], cwd: Path, runs: int = 3, env=None, setup=None) -> dict[str, float]:
    """Medians over `runs` runs of cmd's CPU seconds (robust to a busy machine) and wall seconds."""
    cpu, wall = [], []
    for _ in range(runs):
        if setup is not None:
            setup()
        c, w = child_seconds(cmd, cwd, env)
        cpu.append(c)
        wall.append(w)
    return {"cpu": statistics.median(cpu), "wall": statistics.median(wall)}


def startup_costs(log) -> dict:
    """Medians of 3 fresh interpreters: the imports a stage pays before any work, `dvc --version`, and one MLflow
    run (SQLite, as a stage opens it) in a new and in an existing database."""
    py = [sys.executable]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    checks = {
        "python -c pass": [*py, "-c", "pass"],
        "import torch": [*py, "-c", "import torch"],
        "import diffusers.UNet2DModel": [*py, "-c", "from diffusers import UNet2DModel"],
        "import mlflow": [*py, "-c", "import mlflow"],
        "import prefect": [*py, "-c", "import prefect"],
        "import a stage (stages.sample)": [*py, "-c", "import stages.sample"],
        "dvc --version": [*py, "-m", "dvc", "--version"],
    }
    out = {}
    for name, cmd in checks.items():
        out[name] = median_seconds(cmd, ROOT, env=env)
        log(f"  {name:44s} {out[name]['cpu']:6.2f} s CPU  {out[name]['wall']:6.2f} s wall")
    code = ("import sys; from stages.common import load_params, mlflow_run\n"
            "with mlflow_run('bench', load_params(sys.argv[1]), ('seed',)) as run: run.metrics({'x': 1.0})")
    with tempfile.TemporaryDirectory() as tmp:
        params, db = Path(tmp) / "params.yaml", Path(tmp) / "mlflow.db"
        params.write_text((ROOT / "params.yaml").read_text())
        cmd = [*py, "-c", code, str(params)]
        out["mlflow run, new mlflow.db"] = median_seconds(cmd, Path(tmp), env=env,
                                                          setup=lambda: db.unlink(missing_ok=True))
        out["mlflow run, existing mlflow.db"] = median_seconds(cmd, Path(tmp), env=env)
    for k in ("mlflow run, new mlflow.db", "mlflow run, existing mlflow.db"):
        log(f"  {k + ' (imports incl.)':44s} {out[k]['cpu']:6.2f} s CPU  {out[k]['wall']:6.2f} s wall")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, default=None, help="a project directory with data/prepared")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/stage_profile_cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    params = load_params(ROOT / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        project = args.project
        if project is None or not (project / "data/prepared").is_dir():
            project = Path(tmp)
            (project / "params.yaml").write_text((ROOT / "params.yaml").read_text())
            print("preparing the default data in a temporary directory")
            subprocess.run([sys.executable, "-m", "stages.prepare_data"], cwd=project, check=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT), "DEBIAS_TRACKING": "off"})
        segments = stage_segments(project, params, print)
    cats = [*CATEGORIES, "other"]
    print(f"\n{'segment':58s} {'total s':>8s} " + " ".join(f"{c[:9]:>9s}" for c in cats))
    for name, b in segments.items():
        print(f"{name:58s} {b['total']:8.2f} " + " ".join(f"{100 * b[c] / b['total']:8.0f}%" for c in cats))
    print("\nstart-up costs (medians of 3 fresh interpreters):")
    startup = startup_costs(print)
    result = {"machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "torch": torch.__version__, "load_average": list(os.getloadavg())},
              "segments_seconds": segments, "startup_seconds": startup,
              "note": "cProfile on; untrained models (cost does not depend on weights); default params.yaml sizes"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
