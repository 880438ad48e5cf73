"""Latent Directions: linear attribute directions in the sampler's latent space, applied to the initial noise.

Fit (`fit_directions`), on one of two kinds of latents (latentdir.fit_on):
    balanced (default, the published recipe's analogue): DDIM inversion (pipeline/sampling.py `invert`) of the
             attribute-balanced labelled split, each image under its own class, recording x_t at a few steps and
             z_T; the labels are the split's attribute labels (the paper: labelled sets of latents);
    samples:  sample the biased model while recording x_t, labelled by the attribute judge on the final image;
then fit a linear SVM per recorded step (one-vs-rest for K > 2 values). The direction of value a at step s is
the unit normal of its separating hyperplane:
    d_{s,a} = w_{s,a} / ‖w_{s,a}‖
Apply (`LatentDirectionHooks`): each sample i is assigned an attribute value a(i) so that every class's
samples meet the target distribution p* (uniform by default), and
    z_T ← z_T + w·‖z_T‖ · d_{s*,a(i)}
with the source step s* and the weight w — a fraction of the sample's own ‖z_T‖, so it carries across models and
latent sizes (the published SDXL setting, 10 on ‖z_T‖ ≈ 256, is w ≈ 0.04) — as knobs.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.sampling import SamplerHooks, StepContext
from pipeline.targets import target_distribution

INITIAL = -1  # step index under which z_T is recorded


class RecordLatents(SamplerHooks):
    """Records z_T (step −1) and x_t before the given denoising steps, conditional half only."""

    def __init__(self, steps):
        self.steps = {int(s) for s in steps}
        self.shape: tuple[int, int, int] | None = None  # (C, H, W) of the latent
        self.records: dict[int, list[torch.Tensor]] = {s: [] for s in sorted(self.steps)}

    def initial_noise(self, z, ctx: StepContext):
        self.shape = tuple(z.shape[1:])
        if INITIAL in self.steps:
            self.records[INITIAL].append(z.detach().flatten(1).cpu().clone())
        return z

    def model_output(self, out, x_t, ctx: StepContext):
        if ctx.step_index in self.steps:
            self.records[ctx.step_index].append(x_t[: len(ctx.sample_ids)].detach().flatten(1).float().cpu().clone())
        return out

    def stacked(self) -> dict[int, np.ndarray]:
        return {s: torch.cat(v).numpy() for s, v in self.records.items() if v}


def fit_directions(latents: dict[int, np.ndarray], labels: np.ndarray, num_attr: int, *, C: float = 0.1,
                   holdout: float = 0.2, seed: int = 0, allow_missing: bool = False):
    """Per step: LinearSVC (one-vs-rest) on a (1 − holdout) split; returns (steps [S], directions [S,K,D]
    unit rows, held-out accuracy [S], attribute values never seen). Every value must occur in `labels`
    unless allow_missing, where an unseen value gets a zero direction (and is reported by the caller)."""
    from sklearn.svm import LinearSVC

    labels = np.asarray(labels)
    missing = sorted(set(range(num_attr)) - set(labels.tolist()))
    if missing and not allow_missing:
        raise UserError(f"latentdir: attribute values {missing} never occur in the fitting samples; "
                        "raise latentdir.fit_per_class")
    if num_attr - len(missing) < 2:
        raise UserError(f"latentdir: the fitting samples show only attribute values "
                        f"{sorted(set(labels.tolist()))}; an SVM needs two")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    n_held = round(holdout * len(labels))
    held, train = order[:n_held], order[n_held:]
    steps = sorted(latents)
    dirs, accs = [], []
    for s in steps:
        x = latents[s]
        svm = LinearSVC(C=C, max_iter=5000, random_state=seed).fit(x[train], labels[train])
        coef = svm.coef_ if len(svm.classes_) > 2 else np.stack([-svm.coef_[0], svm.coef_[0]])
        w = np.zeros((num_attr, x.shape[1]))
        w[svm.classes_] = coef / np.linalg.norm(coef, axis=1, keepdims=True)
        dirs.append(w)
        accs.append(float(svm.score(x[held], labels[held])) if n_held else float("nan"))
    return np.array(steps), np.stack(dirs).astype(np.float32), np.array(accs), missing


def validate_target(target, num_attr: int) -> np.ndarray:
    """p* as an array: None → uniform; otherwise K entries, each > 0, summing to 1 (pipeline/targets.py)."""
    return target_distribution(target, num_attr, "target distribution")


def assign_attributes(cond: np.ndarray, target: np.ndarray, seed: int) -> np.ndarray:
    """a(i) for every sample: within each class y with n_y samples, value k gets n_y·p*_k samples rounded by
    largest remainder (so counts sum to n_y and are within 1 of exact), in a seeded random order."""
    cond = np.asarray(cond)
    out = np.empty(len(cond), dtype=np.int64)
    for y in np.unique(cond):
        idx = np.flatnonzero(cond == y)
        exact = len(idx) * target
        counts = np.floor(exact).astype(int)
        short = len(idx) - counts.sum()
        counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
        values = np.repeat(np.arange(len(target)), counts)
        out[idx] = np.random.default_rng([seed, int(y)]).permutation(values)
    return out


class LatentDirectionHooks(SamplerHooks):
    """z_T ← z_T + w·‖z_T‖ · d_{a(i)} for each sample i of the run (a(i) from assign_attributes; w a fraction of
    the sample's own norm); with `renormalise`, the shifted noise is scaled back to ‖z_T‖ so it stays on the
    Gaussian shell the model was trained on."""

    def __init__(self, directions: np.ndarray, assigned: np.ndarray, weight: float, renormalise: bool = False,
                 origin: str = "latentdir directions"):
        self.directions = torch.as_tensor(directions, dtype=torch.float32)  # [K, D]
        self.assigned = torch.as_tensor(assigned, dtype=torch.long)
        self.weight = float(weight)
        self.renormalise = renormalise
        self.origin = origin

    def initial_noise(self, z, ctx: StepContext):
        if self.weight == 0:
            return z
        if self.directions.shape[-1] != z[0].numel():
            raise UserError(f"{self.origin}: directions have {self.directions.shape[-1]} values, the model's noise "
                            f"{z[0].numel()} (fitted for another model; run `dvc repro fit_directions`)")
        d = self.directions[self.assigned[ctx.sample_ids]].to(z.device, z.dtype)
        norm = z.flatten(1).norm(dim=1).view(-1, *([1] * (z.dim() - 1)))
        shifted = z + self.weight * norm * d.view_as(z)
        if self.renormalise:
            scale = z.flatten(1).norm(dim=1) / shifted.flatten(1).norm(dim=1)
            shifted = shifted * scale.view(-1, *([1] * (z.dim() - 1)))
        return shifted



def pool_latents(latents: dict[int, np.ndarray], shape: tuple[int, int, int], size: int) -> dict[int, np.ndarray]:
    """Average-pool flattened latents [N, C·H·W] to [N, C·size·size] (size 0 = keep full resolution).

    Why: in a biased model colour and class move together, so an SVM on full-resolution x_t separates
    "colour a" by the digit shape of class a, and adding that direction to z_T changes the digit
    (measured: fidelity 0.94 → 0.2 at the weight that moves the colour). Colour is a low-frequency
    attribute; at size 1 (per-channel means) no digit shape is left for the SVM to use."""
    if size == 0:
        return latents
    c, h, w = shape
    if h % size or w % size:
        raise UserError(f"latentdir.pool: {size} must divide the latent size {h}x{w}")
    return {s: x.reshape(len(x), c, size, h // size, size, w // size).mean(axis=(3, 5)).reshape(len(x), -1)
            for s, x in latents.items()}


def unpool_directions(directions: np.ndarray, shape: tuple[int, int, int], size: int) -> np.ndarray:
    """Map directions fitted on pooled latents back to the full latent (nearest upsampling, the adjoint of
    average pooling up to scale) and renormalise to unit length: [..., C·size·size] → [..., C·H·W]."""
    if size == 0:
        return directions
    c, h, w = shape
    lead = directions.shape[:-1]
    d = directions.reshape(*lead, c, size, 1, size, 1)
    d = np.broadcast_to(d, (*lead, c, size, h // size, size, w // size)).reshape(*lead, c * h * w)
    norm = np.linalg.norm(d, axis=-1, keepdims=True)
    return (d / np.where(norm > 0, norm, 1.0)).astype(np.float32)  # unseen values keep a zero direction


def latent_direction_hooks(path, cond: np.ndarray, *, step: int, weight: float, target, seed: int,
                           renormalise: bool = False):
    """Hooks for a run conditioned on `cond`, from a fit_directions output file (weight: a fraction of ‖z_T‖)."""
    from pipeline.io import load_npz

    fitted = load_npz(path, "steps", "directions")
    d = fitted["directions"]
    if fitted["steps"].ndim != 1 or d.ndim != 3 or len(d) != len(fitted["steps"]) or d.shape[1] < 2:
        raise UserError(f"{path}: expected steps [S] and directions [S, attributes >= 2, values], got "
                        f"{list(fitted['steps'].shape)} and {list(d.shape)} (run `dvc repro fit_directions`)")
    if not np.issubdtype(d.dtype, np.floating) or not np.isfinite(d).all():
        raise UserError(f"{path}: directions must be finite floats (run `dvc repro fit_directions`)")
    steps = fitted["steps"].tolist()
    if step not in steps:
        raise UserError(f"latentdir.source_step: {step} was not recorded in {path} (recorded: {steps})")
    directions = fitted["directions"][steps.index(step)]
    assigned = assign_attributes(cond, validate_target(target, directions.shape[0]), seed)
    return LatentDirectionHooks(directions, assigned, weight, renormalise, origin=str(path))
