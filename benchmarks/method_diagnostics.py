"""Why a method misses its target: two measured diagnostics on a built project (docs/results.md "Why Distribution
Guidance and the synthetic amplifier fall short").

    python benchmarks/method_diagnostics.py distguide    # needs data/models/diffusion, data/methods/distguide, judges
    python benchmarks/method_diagnostics.py amplifier    # needs data/prepared and data/methods/ddb_amplifier[_real]
    python benchmarks/method_diagnostics.py distguide-asymmetric --scales 0.1 0.3 0.5 1   # + data/reference
    python benchmarks/method_diagnostics.py amplifier --data /tmp/ddb_table/rho_0.99/data   # a ddb_table work dir
    python benchmarks/method_diagnostics.py distguide-space [--steps 12 25] [--scales-x ...]   # + data/reference
    python benchmarks/method_diagnostics.py knob-validation --method latentdir --set 'sweep_weights=[0.2,0.25,0.3]'
    python benchmarks/method_diagnostics.py amplifier-size --sizes 50 100 200 --data /tmp/ddb_table/rho_0.99/data

distguide: samples sample.num_per_class per class with the Distribution Guidance hook as sample@distguide does, and
at every guided step reads the ADP on h before and after the edit h ← h − s·∇_h L. Printed per step: the share of
samples the ADP calls aligned (its argmax is the class's bias-aligned attribute) before and after the edit, the mean
softmax(ADP/τ) probability of the aligned attribute after it (the target p* gives 1/K), and how often the ADP's
argmax agrees with the colour judge on the *final* image. An edit that moves the ADP but not the image shows as
"aligned after the edit ≈ 0" at every step while the judge still finds the samples aligned, and as "aligned before
the edit" climbing back at the next step (the U-Net restores what the edit changed).

distguide-asymmetric: the same guidance with Asyrp's asymmetric DDIM step (Kwon et al. 2023), which Balancing
Act's released code carries commented out: at a guided step x̂_0 comes from the edited U-Net output and the direction
term ε̂ from an unedited second call, x_{t−1} = √ᾱ_{t−1}·x̂_0(f_edit) + √(1−ᾱ_{t−1})·ε̂(f_plain) (DDIM, η = 0), so
an edit the later steps would undo is carried by x̂_0. Each --scales entry multiplies distguide.scale; both steps,
symmetric (the published, bit for bit sample@distguide's images at 1×) and asymmetric, are scored by the score
stage's Scorer (normalised bias, FID vs the colour-balanced split, fidelity, 95% intervals) and the report's
bias_removed against data/scores/baseline. Settings must be the default's sampler (DDIM, η = 0, guidance scale 1).

distguide-space: both guidance spaces (h, the published edit; x, classifier guidance by ∇_{x_t} L) over scale grids
on validation seeds (seed stream `knob_validation`, never the scored samples), each point scored against the unguided
run on the same seeds, with the count of digit misreads read as the class whose bias-aligned colour the sample now
has; prints the scale the default's choice rule picks (the largest bias removed with FID_balanced ≤ 1.5× and fidelity
≥ 0.9× the unguided run's).

knob-validation: any registry method's sweep grid (its params section's sweep keys, overridable with --set) on the
same validation seeds, scored against the grid's knob-at-0 point, with the same choice rule.

amplifier: how well each bias amplifier flags the real training split's bias-conflicting images (the bias labels
are read here for this diagnostic only; nothing is chosen by it): ROC AUC and average precision of its per-sample
cross-entropy, and for "the amplifier is wrong" (Recipe I's conflicting pseudo-label) the count, the recall of
conflicting images and the precision, with the most frequent (class → predicted) pairs among the aligned images
it gets wrong; and the spread of the stroke colour (each image's bright pixels, divided by their brightness) of the
synthetic images against the real bias-aligned ones, per class, with the median over classes of ‖std_syn‖/‖std_real‖.

amplifier-size: the synthetic amplifier against the size of its training set: for each --sizes n it is trained as
train_bias_amplifier trains it (params.yaml's ddb section, its seed) on the first n synthetic images of every class,
then read on the validation split (aligned and conflicting accuracy: what a choice of n may read) and, as in
`amplifier`, on the training split with its bias labels (recall, precision, aligned images misread).
Writes benchmarks/results/method_diagnostics_<which>.json (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_params  # noqa: E402
from pipeline.data import load_meta, load_split  # noqa: E402

# The h-space diagnostics study the published edit h ← h − s·∇_h L: with distguide.space x (the default since
# 2026-12-01) they use the h-space default of the runs they were measured on, s = 1.5e5 at steps [5, 25) for L
# without the group-size factor: 1,500 per sample now, the same step in groups of 100 (smaller groups got more).
H_SPACE_DEFAULT = {"scale": 1.5e3, "steps": (5, 25)}


def h_space_knobs(p) -> tuple[float, tuple[int, int]]:
    """(scale, steps) of the h-space edit: the params' own when distguide.space is h, else H_SPACE_DEFAULT."""
    if p.space == "h":
        return p.scale, tuple(p.steps)
    return H_SPACE_DEFAULT["scale"], H_SPACE_DEFAULT["steps"]


def distguide(data: Path, params_path: Path) -> dict:
    from pipeline.judges import judge_outputs, load_judge
    from pipeline.methods.distribution_guidance import distribution_guidance_hooks
    from pipeline.pretrained import load_model
    from pipeline.sampling import SamplerSettings, sample, sample_seeds

    params = load_params(params_path)
    p = params.distguide
    model = load_model(data / "models" / "diffusion", "cpu")
    meta = load_meta(data / "prepared")
    cond = np.repeat(np.arange(model.num_classes), params.sample.num_per_class)
    scale, steps = h_space_knobs(p)
    hooks = distribution_guidance_hooks(data / "methods" / "distguide" / "adp.safetensors", scale=scale,
                                        tau=p.tau, steps=steps, group_size=p.batch_size, target=p.target,
                                        beta_power=p.beta_power, space="h")
    edit, records = hooks.mid_block, []

    def recording(h, ctx):  # the hook itself, then the ADP read on h before and after its edit
        out = edit(h, ctx)
        if hooks.active(ctx):
            n, y = len(ctx.sample_ids), ctx.labels[:len(ctx.sample_ids)]
            with torch.no_grad():
                before = hooks.adp(h[:n].float().flatten(1), ctx.step_index, y)
                after = hooks.adp(out[:n].float().flatten(1), ctx.step_index, y)
            records.append((ctx.step_index, ctx.sample_ids.cpu().numpy().copy(), before.argmax(1).cpu().numpy(),
                            after.argmax(1).cpu().numpy(), torch.softmax(after / hooks.tau, 1).cpu().numpy()))
        return out

    hooks.mid_block = recording
    images = sample(model, cond, sample_seeds(params.seed, len(cond)), SamplerSettings.from_params(params.sample),
                    hooks=hooks)  # float NCHW in [-1, 1], the judges' input
    judged, _ = judge_outputs(load_judge(data / "judges" / "colour.safetensors"), images)
    aligned = np.asarray(meta.aligned)[cond]
    per_step = []
    for s in sorted({r[0] for r in records}):
        rows = [r for r in records if r[0] == s]
        order = np.argsort(np.concatenate([r[1] for r in rows]))
        before, after = (np.concatenate([r[k] for r in rows])[order] for k in (2, 3))
        prob = np.concatenate([r[4] for r in rows])[order]
        per_step.append({"step": s, "adp_aligned_before_edit": float((before == aligned).mean()),
                         "adp_aligned_after_edit": float((after == aligned).mean()),
                         "adp_p_aligned_after_edit": float(prob[np.arange(len(cond)), aligned].mean()),
                         "adp_agrees_with_final_judge_before": float((before == judged).mean()),
                         "adp_agrees_with_final_judge_after": float((after == judged).mean())})
    return {"samples": len(cond), "judge_aligned_fraction": float((judged == aligned).mean()),
            "target_p_aligned": float(1.0 / len(meta.attr_names)), "scale": scale, "tau": p.tau,
            "guided_steps": list(steps), "steps": per_step}


def guided_samples(model, hooks, cond: np.ndarray, seeds: np.ndarray, settings, *, asymmetric: bool,
                    group: int) -> torch.Tensor:
    """Distribution Guidance sampling with the DDIM update written out, so the direction term can come from an
    unedited U-Net call (`asymmetric`); symmetric, it is pipeline.sampling.sample's DDIM step (η = 0, w = 1)."""
    if settings.scheduler != "ddim" or settings.eta != 0 or settings.guidance_scale != 1:
        raise SystemExit("distguide-asymmetric: needs sample.scheduler ddim, eta 0, guidance_scale 1")
    unet, state = model.unet, {"edit": True, "ctx": None}
    handle = unet.get_submodule(hooks.h_module).register_forward_hook(
        lambda m, i, o: hooks.mid_block(o, state["ctx"]) if state["edit"] else o)
    try:
        return _guided_loop(model, hooks, cond, seeds, settings, state, asymmetric=asymmetric, group=group)
    finally:
        handle.remove()


def _guided_loop(model, hooks, cond, seeds, settings, state, *, asymmetric: bool, group: int) -> torch.Tensor:
    from diffusers.utils.torch_utils import randn_tensor

    from pipeline.sampling import StepContext, _x0_eps, make_scheduler

    unet = model.unet
    sched = make_scheduler(model.scheduler_config, "ddim", settings.timestep_spacing)
    sched.set_timesteps(settings.num_inference_steps)
    steps, ac, kind = sched.timesteps, sched.alphas_cumprod, sched.config.prediction_type
    size = unet.config.sample_size
    out = []
    for start in range(0, len(cond), group):  # whole guidance groups, as the sampler's batch_multiple keeps them
        ids = torch.arange(start, min(start + group, len(cond)))
        y = torch.as_tensor(cond[ids.numpy()])
        kwargs = model.conditioning.with_labels(y).unet_kwargs()
        gens = [torch.Generator().manual_seed(int(sd)) for sd in seeds[ids.numpy()]]
        x = randn_tensor((len(ids), unet.config.in_channels, size, size), generator=gens,
                         device=torch.device("cpu")) * sched.init_noise_sigma
        with torch.no_grad():
            for i, t in enumerate(steps):
                state["ctx"] = StepContext(i, len(steps), int(t), y, model.null_class, ids, kwargs)
                state["edit"] = True
                f_edit = unet(x, t, **kwargs).sample.float()
                state["edit"] = False
                f_plain = (unet(x, t, **kwargs).sample.float() if asymmetric and hooks.active(state["ctx"])
                           else f_edit)
                a_prev = ac[int(steps[i + 1])] if i + 1 < len(steps) else sched.final_alpha_cumprod
                x0, _ = _x0_eps(f_edit, x, ac[int(t)], kind)
                _, eps = _x0_eps(f_plain, x, ac[int(t)], kind)
                x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        out.append(x.clamp(-1, 1))
    return torch.cat(out)


def distguide_asymmetric(data: Path, params_path: Path, scales: list[float]) -> dict:
    from pipeline.data import to_uint8
    from pipeline.io import load_npz, load_parquet
    from pipeline.methods.distribution_guidance import distribution_guidance_hooks
    from pipeline.pretrained import load_model
    from pipeline.report import add_bias_removed, per_class_counts
    from pipeline.sampling import SamplerSettings, sample_seeds
    from pipeline.scoring import Scorer

    params = load_params(params_path)
    p, ps = params.distguide, params.score
    settings = SamplerSettings.from_params(params.sample)
    scorer = Scorer(data / "judges", data / "reference", device="cpu", k=ps.pr_k, seed=params.seed,
                    batch_size=ps.batch_size, bootstrap=ps.bootstrap, bootstrap_fid=ps.bootstrap_fid)
    model = load_model(data / "models" / "diffusion", "cpu")
    model.unet.eval()
    cond = np.repeat(np.arange(model.num_classes), params.sample.num_per_class)
    seeds = sample_seeds(params.seed, len(cond))
    # the baseline's attribute count table, as score@baseline wrote it and the report reads it
    base = per_class_counts(load_parquet(data / "scores" / "baseline" / "per_class.parquet"))
    rows = []
    h_scale, h_steps = h_space_knobs(p)
    for mult in scales:
        for asymmetric in (False, True):
            hooks = distribution_guidance_hooks(data / "methods" / "distguide" / "adp.safetensors",
                                                scale=h_scale * mult, tau=p.tau, steps=h_steps, space="h",
                                                group_size=p.batch_size, target=p.target, beta_power=p.beta_power)
            start = time.process_time()
            images = to_uint8(guided_samples(model, hooks, cond, seeds, settings, asymmetric=asymmetric,
                                             group=p.batch_size))
            cpu = time.process_time() - start
            metrics, per_class = scorer(images, cond)
            row = {"method": "distguide"}
            add_bias_removed([row], {"baseline": base, "distguide": per_class_counts(per_class)}, seed=params.seed,
                             n_resamples=ps.bootstrap)
            removed, removed_ci, floor = row.pop("bias_removed"), row.pop("bias_removed_ci95"), row.pop("bias_floor")
            row = {"step": "asymmetric" if asymmetric else "symmetric", "scale": h_scale * mult,
                   "bias_removed": removed, "bias_removed_ci95": removed_ci, "sampling_cpu_s": round(cpu, 1)}
            row.update({k: metrics[k] for k in ("bias_score_normalised", "bias_score_normalised_ci95",
                                                "aligned_fraction", "fid_balanced", "fid_balanced_ci95",
                                                "fidelity", "fidelity_ci95")})
            stage_images = data / "samples" / "distguide" / "images.npz"
            if mult == 1 and not asymmetric and p.space == "h" and stage_images.is_file():  # the sampler's images
                row["equals_sample_stage_images"] = bool(np.array_equal(
                    images, load_npz(stage_images, "images")["images"]))
            rows.append(row)
            print(f"{row['step']:>10} s = {row['scale']:.3g}: bias removed {removed:.3f} [{removed_ci[0]:.3f}, "
                  f"{removed_ci[1]:.3f}], normalised bias {row['bias_score_normalised']:.3f}, FID_balanced "
                  f"{row['fid_balanced']:.1f}, fidelity {row['fidelity']:.3f}", flush=True)
    return {"samples": len(cond), "bias_floor": floor, "rows": rows}


# The choice rule of the diffusion methods' knobs (docs/protocol.md), on validation seeds only.
FID_BOUND, FIDELITY_BOUND = 1.5, 0.9


class _Validation:
    """What every validation point shares: the model, the Scorer, the `knob_validation` seeds (never the scored
    samples'), and the knob-at-0 point every later point is scored against (the first one scored)."""

    def __init__(self, data: Path, params, per_class: int):
        from pipeline.pretrained import load_model
        from pipeline.sampling import SamplerSettings, sample_seeds
        from pipeline.scoring import Scorer
        from pipeline.seeds import stream

        ps = params.score
        self.params = params
        self.scorer = Scorer(data / "judges", data / "reference", device="cpu", k=ps.pr_k, seed=params.seed,
                             batch_size=ps.batch_size, bootstrap=ps.bootstrap, bootstrap_fid=ps.bootstrap_fid)
        self.model = load_model(data / "models" / "diffusion", "cpu")
        self.model.unet.eval()
        self.cond = np.repeat(np.arange(self.model.num_classes), per_class)
        self.seeds = sample_seeds(stream(params.seed, "knob_validation"), len(self.cond))
        self.settings = SamplerSettings.from_params(params.sample)
        self.reference = None

    def point(self, hooks, keys: tuple[str, ...]) -> tuple[torch.Tensor, dict]:
        """(the images, their row: sampling CPU-s, bias_removed against the reference, `keys` of the metrics and
        the FID_balanced and fidelity ratios to the reference's)."""
        from pipeline.data import to_uint8
        from pipeline.report import add_bias_removed, per_class_counts
        from pipeline.sampling import sample

        start = time.process_time()
        images = sample(self.model, self.cond, self.seeds, self.settings, hooks=hooks, progress=False)
        row = {"sampling_cpu_s": round(time.process_time() - start, 1)}
        metrics, per_class_table = self.scorer(to_uint8(images), self.cond)
        counts = per_class_counts(per_class_table)
        if self.reference is None:
            self.reference = {"counts": counts, "fid": metrics["fid_balanced"], "fidelity": metrics["fidelity"]}
        else:
            r = {"method": "m"}
            add_bias_removed([r], {"baseline": self.reference["counts"], "m": counts}, seed=self.params.seed,
                             n_resamples=self.params.score.bootstrap)
            row.update(bias_removed=r["bias_removed"], bias_removed_ci95=r["bias_removed_ci95"])
        row.update({k: metrics[k] for k in keys})
        row.update(fid_ratio=metrics["fid_balanced"] / self.reference["fid"],
                   fidelity_ratio=metrics["fidelity"] / self.reference["fidelity"])
        return images, row


def rule_choice(rows: list[dict]) -> dict | None:
    """The row with the largest bias_removed among those with fid_ratio ≤ FID_BOUND and fidelity_ratio ≥
    FIDELITY_BOUND (the knob-at-0 row, which has no bias_removed, never counts); None if none qualifies."""
    ok = [r for r in rows if "bias_removed" in r and r["fid_ratio"] <= FID_BOUND
          and r["fidelity_ratio"] >= FIDELITY_BOUND]
    return max(ok, key=lambda r: r["bias_removed"]) if ok else None


def distguide_space(data: Path, params_path: Path, scales_h: list[float], scales_x: list[float],
                    per_class: int, steps: list[int] | None = None) -> dict:
    """Both guidance spaces over their scale grids on validation seeds (stream `knob_validation`, disjoint from the
    scored samples'), each point scored as the score stage does against the scale-0 run on the same seeds, and the
    choice rule of issue 16's target applied to the validation figures only: the largest bias_removed with
    fid_balanced ≤ 1.5× and fidelity ≥ 0.9× the scale-0 run's."""
    from pipeline.judges import judge_outputs, load_judge
    from pipeline.methods.distribution_guidance import distribution_guidance_hooks

    params = load_params(params_path)
    p = params.distguide
    steps = tuple(steps or p.steps)
    val = _Validation(data, params, per_class)
    cond = val.cond
    digit = load_judge(data / "judges" / "digit.safetensors")
    colour = load_judge(data / "judges" / "colour.safetensors")
    aligned = np.asarray(load_meta(data / "prepared").aligned)
    owner = {int(a): c for c, a in enumerate(aligned)}  # the class whose bias-aligned colour is a
    adp = data / "methods" / "distguide" / "adp.safetensors"
    rows = []
    grid = [("h", 0.0)] + [("h", s) for s in scales_h] + [("x", s) for s in scales_x]
    for space, scale in grid:
        hooks = distribution_guidance_hooks(adp, scale=scale, tau=p.tau, steps=steps, group_size=p.batch_size,
                                            target=p.target, beta_power=p.beta_power, space=space,
                                            guidance_scale=p.guidance_scale)
        images, point = val.point(hooks, ("bias_score_normalised", "aligned_fraction", "fid_balanced",
                                          "fid_balanced_ci95", "fidelity", "fidelity_ci95"))
        row = {"space": space, "scale": scale, **point}
        # the digit judge's misreads: how many read as the class that owns the sample's (judged) colour
        d_pred, _ = judge_outputs(digit, images)
        c_pred, _ = judge_outputs(colour, images)
        wrong = d_pred != cond
        to_owner = np.array([owner.get(int(c), -1) == int(d) for c, d in zip(c_pred, d_pred, strict=True)])
        row.update(misread=int(wrong.sum()), misread_as_colour_owner=int((wrong & to_owner).sum()))
        rows.append(row)
        print(f"{space} s = {scale:g}: removed {row.get('bias_removed', 0):.3f}, FID_bal ×{row['fid_ratio']:.2f}, "
              f"fidelity ×{row['fidelity_ratio']:.3f}, misread {row['misread']} ({row['misread_as_colour_owner']} "
              f"as the colour's own class), {row['sampling_cpu_s']:.0f} CPU-s", flush=True)
    chosen = {}
    for space in ("h", "x"):
        best = rule_choice([r for r in rows if r["space"] == space])
        chosen[space] = best["scale"] if best else None
    return {"samples": len(cond), "seeds": "stream knob_validation (not the scored samples)", "steps": list(steps),
            "rule": "largest bias_removed with fid_balanced <= 1.5x and fidelity >= 0.9x the scale-0 run's",
            "chosen_scale": chosen, "rows": rows}


def knob_validation(data: Path, params_path: Path, method_name: str, overrides: dict, per_class: int) -> dict:
    """Any method's sweep grid (pipeline/methods/registry.py; `overrides` replace keys of its params section, e.g.
    latentdir's sweep_weights) sampled on validation seeds (stream `knob_validation`) and scored against the grid's
    knob-at-0 point on the same seeds, with the same choice rule as distguide-space."""
    import tempfile

    from pipeline.methods.registry import get_method

    params = load_params(params_path)
    method = get_method(method_name)
    section = getattr(params, method.section).model_copy(update=overrides)
    params = params.model_copy(update={method.section: section})
    data = data.resolve()
    val = _Validation(data, params, per_class)
    here = Path.cwd()
    with tempfile.TemporaryDirectory() as tmp:  # the registry reads fits at params' relative data/ paths
        (Path(tmp) / "data").symlink_to(data)
        os.chdir(tmp)
        try:
            rows = []
            for knobs, hooks in method.sweep_grid(params, val.cond, "cpu"):  # the first point: the knob at 0
                _, point = val.point(hooks, ("bias_score_normalised", "aligned_fraction", "fid_balanced",
                                             "fidelity"))
                row = {**knobs, **point}
                rows.append(row)
                shown = " ".join(f"{k} {v:g}" for k, v in knobs.items() if k != "swept")
                print(f"{shown}: removed {row.get('bias_removed', 0):.3f}, FID_bal ×{row['fid_ratio']:.3f}, "
                      f"fidelity ×{row['fidelity_ratio']:.4f}, {row['sampling_cpu_s']:.0f} CPU-s", flush=True)
        finally:
            os.chdir(here)
    chosen = rule_choice(rows)
    return {"method": method_name, "overrides": overrides, "samples": len(val.cond),
            "seeds": "stream knob_validation (not the scored samples)",
            "rule": "largest bias_removed with fid_balanced <= 1.5x and fidelity >= 0.9x the knob-at-0 run's",
            "chosen": {k: v for k, v in chosen.items() if k not in ("bias_removed_ci95",)} if chosen else None,
            "rows": rows}


def stroke_chromaticity(images: np.ndarray) -> np.ndarray:
    """Per image: the mean RGB of its pixels brighter than 0.6 × its brightest, divided by their mean brightness
    (max over RGB), so the stroke's colour independent of its intensity. images uint8 [N, H, W, 3] → [N, 3]."""
    rgb = images.astype(np.float64)
    bright = rgb.max(-1)
    mask = bright > 0.6 * bright.max(axis=(1, 2), keepdims=True)
    weight = mask.sum(axis=(1, 2)).clip(min=1)
    colour = (rgb * mask[..., None]).sum(axis=(1, 2)) / weight[:, None]
    return colour / ((bright * mask).sum(axis=(1, 2)) / weight + 1e-9)[:, None]


def stroke_typicality(images: np.ndarray, classes: np.ndarray, synthetic: np.ndarray, s_classes: np.ndarray
                      ) -> np.ndarray:
    """Per image: Σ_p w_p·occ_y(p), w its stroke brightness (max over RGB) normalised to sum 1, occ_y(p) the share of
    its class's synthetic images with a stroke (brightness > 0.3) at pixel p: low where the image puts its strokes
    where the amplifier's training images of that class rarely do. uint8 [N, H, W, 3] → [N]."""
    bright = images.astype(np.float64).max(-1) / 255.0
    occ = np.stack([(synthetic[s_classes == c].max(-1) / 255.0 > 0.3).mean(0) for c in range(int(s_classes.max()) + 1)])
    w = bright / bright.sum(axis=(1, 2), keepdims=True).clip(min=1e-9)
    return (w * occ[classes]).sum(axis=(1, 2))


def percentile_among(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each value's percentile (share of `reference` strictly below it, × 100)."""
    ref = np.sort(reference)
    return 100.0 * np.searchsorted(ref, values, side="left") / len(ref)


def amplifier(data: Path) -> dict:
    from sklearn.metrics import average_precision_score, roc_auc_score

    from pipeline.methods.diffusing_debias import amplifier_ce, flatten_images, load_classifier, predict

    meta = load_meta(data / "prepared")
    train = load_split(data / "prepared", "train", with_bias=True)
    x, y = flatten_images(train.images), torch.from_numpy(train.classes)
    conflicting = train.bias != np.asarray(meta.aligned)[train.classes]
    out = {"train_images": len(y), "train_conflicting": int(conflicting.sum())}
    synthetic = data / "methods" / "ddb_synthetic" / "images.npz"
    if synthetic.is_file() and train.images.shape[-1] == 3:
        with np.load(synthetic) as z:
            s_images, s_classes = z["images"], z["classes"]
        spread = []
        for c in range(len(meta.class_names)):
            real = train.images[(train.classes == c) & ~conflicting]
            spread.append({"class": c, "real_std": stroke_chromaticity(real).std(0).round(4).tolist(),
                           "synthetic_std": stroke_chromaticity(s_images[s_classes == c]).std(0).round(4).tolist()})
        ratio = [np.linalg.norm(r["synthetic_std"]) / max(np.linalg.norm(r["real_std"]), 1e-9) for r in spread]
        out["stroke_colour_spread"] = {"synthetic_over_real_median": float(np.median(ratio)), "per_class": spread}
        # what the misread aligned images are ranked on below, once for both amplifiers: their strokes' position
        # (typicality for their class's synthetic images) and their brightness (the brightest pixel)
        typical = stroke_typicality(train.images, train.classes, s_images, s_classes)
        peak = train.images.max(axis=(1, 2, 3)).astype(np.float64)
    for name in ("ddb_amplifier", "ddb_amplifier_real"):
        path = data / "methods" / name / "model.safetensors"
        if not path.is_file():
            continue
        pred, logits = predict(load_classifier(path), x)
        ce = amplifier_ce(logits, y).numpy()
        out[name] = {"ce_auc": float(roc_auc_score(conflicting, ce)),
                     "ce_average_precision": float(average_precision_score(conflicting, ce)),
                     **flag_stats(pred, train.classes, conflicting)}
        misread = (pred != train.classes) & ~conflicting
        if "stroke_colour_spread" in out and misread.any():  # where they stand among all aligned images
            pct_t = percentile_among(typical[misread], typical[~conflicting])
            pct_b = percentile_among(peak[misread], peak[~conflicting])
            out[name]["misread_aligned_percentiles"] = {
                "stroke_typicality_median": float(np.median(pct_t)),
                "stroke_typicality_share_below_10": float((pct_t < 10).mean()),
                "peak_brightness_median": float(np.median(pct_b))}
    return out


def flag_stats(pred: np.ndarray, classes: np.ndarray, conflicting: np.ndarray) -> dict:
    """Recipe I's conflicting pseudo-label (the amplifier is wrong) against the true one: counts, recall, precision,
    and the most frequent (class → predicted) pairs among the aligned images it gets wrong."""
    wrong = pred != classes
    hit, aligned_wrong = int((wrong & conflicting).sum()), wrong & ~conflicting
    errors = Counter(zip(classes[aligned_wrong].tolist(), pred[aligned_wrong].tolist(), strict=True))
    return {"wrong": int(wrong.sum()), "wrong_conflicting": hit, "wrong_aligned": int(aligned_wrong.sum()),
            "recall": hit / max(1, int(conflicting.sum())), "precision": hit / max(1, int(wrong.sum())),
            "aligned_errors_top": [[c, q, k] for (c, q), k in errors.most_common(5)]}


def amplifier_size(data: Path, params_path: Path, sizes: list[int]) -> dict:
    from pipeline.config import load_params
    from pipeline.methods.diffusing_debias import (
        VALIDATION_SPLIT,
        SyntheticImages,
        TrainConfig,
        evaluate,
        flatten_images,
        load_synthetic,
        predict,
        train_bias_amplifier,
    )

    p = load_params(params_path).ddb
    cfg = TrainConfig.for_amplifiers(p)
    meta = load_meta(data / "prepared")
    aligned = np.asarray(meta.aligned)
    train = load_split(data / "prepared", "train", with_bias=True)
    val = load_split(data / "prepared", VALIDATION_SPLIT, with_bias=True)
    conflicting = train.bias != aligned[train.classes]
    synthetic = load_synthetic(data / "methods" / "ddb_synthetic" / "images.npz")
    images, classes = synthetic.images, synthetic.classes
    per_class = np.bincount(classes).min()
    out = {"synthetic_per_class": int(per_class), "amplifier_epochs": p.amplifier_epochs,
           "amplifier_loss": p.amplifier_loss, "seed": p.seed, "train_conflicting": int(conflicting.sum()), "rows": []}
    for n in sizes:
        if n > per_class:
            raise SystemExit(f"--sizes {n}: the synthetic set has {per_class} images per class")
        keep = np.concatenate([np.flatnonzero(classes == c)[:n] for c in range(meta.num_classes)])
        subset = SyntheticImages(images[keep], classes[keep], synthetic.guidance_scale)
        model = train_bias_amplifier(subset, meta.num_classes, cfg)
        v = evaluate(model, val.images, val.classes, val.bias, aligned)
        pred, _ = predict(model, flatten_images(train.images))
        row = {"per_class": n, "val_aligned_accuracy": v["aligned_accuracy"],
               "val_conflicting_accuracy": v["conflicting_accuracy"], **flag_stats(pred, train.classes, conflicting)}
        out["rows"].append(row)
        print(json.dumps({k: row[k] for k in ("per_class", "val_aligned_accuracy", "val_conflicting_accuracy",
                                              "wrong_aligned", "recall", "precision")}), flush=True)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=("distguide", "distguide-asymmetric", "distguide-space", "knob-validation",
                                      "amplifier", "amplifier-size"))
    ap.add_argument("--method", default="latentdir", help="knob-validation: the registry method whose sweep runs")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=YAML",
                    help="knob-validation: override a key of the method's params section, e.g. sweep_weights=[0.2,0.3]")
    ap.add_argument("--scales", type=float, nargs="+", default=[0.1, 0.3, 0.5, 1.0],
                    help="distguide-asymmetric: multiples of distguide.scale")
    ap.add_argument("--scales-h", type=float, nargs="+", default=[600, 2000, 3000, 6000],
                    help="distguide-space: h-space scales")
    ap.add_argument("--scales-x", type=float, nargs="+", default=[2, 4, 6, 10, 20, 40],
                    help="distguide-space: x-space scales")
    ap.add_argument("--per-class", type=int, default=50, help="distguide-space, knob-validation: validation samples "
                    "per class")
    ap.add_argument("--steps", type=int, nargs=2, default=None, help="distguide-space: guided steps [start, end)")
    ap.add_argument("--data", type=Path, default=ROOT / "data", help="the project's data/ folder")
    ap.add_argument("--params", type=Path, default=None, help="params.yaml (default: next to --data)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200],
                    help="amplifier-size: synthetic images per class")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    start = time.process_time()
    params = args.params or args.data.resolve().parent / "params.yaml"
    if args.which == "distguide":
        result = distguide(args.data, params)
    elif args.which == "distguide-asymmetric":
        result = distguide_asymmetric(args.data, params, args.scales)
    elif args.which == "knob-validation":
        import yaml

        overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
        result = knob_validation(args.data, params, args.method, overrides, args.per_class)
    elif args.which == "distguide-space":
        result = distguide_space(args.data, params, args.scales_h, args.scales_x, args.per_class, args.steps)
    elif args.which == "amplifier-size":
        result = amplifier_size(args.data, params, args.sizes)
    else:
        result = amplifier(args.data)
    result.update(data=str(args.data), cpu_s=round(time.process_time() - start, 1))
    text = json.dumps(result, indent=1)
    out = args.out or ROOT / "benchmarks" / "results" / f"method_diagnostics_{args.which.replace('-', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
