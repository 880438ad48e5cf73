"""The inference-time methods, one entry each: everything the stages need to sample, sweep and report a method
(docs/architecture.md "Method registry").

    sample@<name>  hooks(params, fitted, conditions, device) → (SamplerHooks, knobs for samples.parquet);
                   conditions() gives the run's classes (asked for after the method's own files are read)
    sweep@<name>   sweep(params, fitted, cond, device) → [(knob values, hooks)]: `knob` over its grid, 0 included
                   (the baseline at the sweep's size); <section>.sweep_per_class samples per class
    report         label (beside the name in the methods table); note(params, fitted, out) → the markdown lines
                   under its sample grid (it copies its figures into `out`)

`section` is the params section the method reads. `fitted` is the folder its fit stage writes, from params.yaml
`methods.<name>.fitted`: that map (and `sweeps`) is the DAG half of an entry, read by dvc.yaml's sample/score/sweep
`foreach` (tests/test_registry.py checks the two halves agree). The method modules are imported inside the builders,
so the report reads labels and notes without loading torch.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError


@dataclass(frozen=True)
class Method:
    name: str
    section: str | None  # the params section it reads (None: the baseline)
    hooks: Callable
    knob: str | None = None  # the swept knob (rows of data/sweeps/<name>.json carry it as `swept`)
    sweep: Callable | None = None
    label: str | None = None
    note: Callable | None = None

    def fitted(self, params) -> Path:
        """Its fit's output folder (params.yaml methods.<name>.fitted)."""
        if self.name not in params.methods:
            raise UserError(f"methods.{self.name}: not in params.yaml (methods there: {', '.join(params.methods)})")
        return Path(params.methods[self.name].fitted)

    def sampler(self, params, conditions: Callable, device="cpu") -> tuple:
        """(the sampler hooks, their knobs for the samples table)."""
        return self.hooks(params, self.fitted(params), conditions, device)

    def sweep_grid(self, params, cond, device="cpu") -> list[tuple[dict, object]]:
        """[(knobs, hooks)] over the sweep's grid; knobs start with `swept`: the knob's name."""
        if self.sweep is None:
            swept = ", ".join(n for n, m in REGISTRY.items() if m.sweep is not None)
            raise UserError(f"--method {self.name!r}: no sweep defined (expected one of: {swept})")
        return [({"swept": self.knob, **values}, hooks)
                for values, hooks in self.sweep(params, self.fitted(params), cond, device)]

    def sweep_per_class(self, params) -> int:
        return getattr(params, self.section).sweep_per_class

    def report_note(self, params, out: Path) -> list[str]:
        """Its lines under its sample grid in the report ([] without a note or without its fitted files)."""
        if self.note is None or self.name not in params.methods:
            return []
        return self.note(params, self.fitted(params), out)


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method; a name already taken is refused."""
    if method.name in REGISTRY:
        raise ValueError(f"method {method.name!r} is registered already")
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise UserError(f"--method {name!r}: no such method in pipeline/methods/registry.py (expected one of: "
                        f"{', '.join(REGISTRY)})")
    return REGISTRY[name]


# ------------------------------------------------------------------------------------------------ baseline

def _baseline_hooks(params, fitted, conditions, device):
    from pipeline.sampling import SamplerHooks

    return SamplerHooks(), {}  # the model itself: nothing changes


register(Method("baseline", None, _baseline_hooks))


# ---------------------------------------------------------------------- Latent Directions: z_T ← z_T + w·‖z_T‖·d

def _latentdir(params, fitted, cond, step, weight):
    from pipeline.methods.latent_directions import latent_direction_hooks

    p = params.latentdir
    return latent_direction_hooks(fitted / "directions.npz", cond, step=step, weight=weight, target=p.target,
                                  seed=params.seed, renormalise=p.renormalise)


def _latentdir_hooks(params, fitted, conditions, device):
    p = params.latentdir
    return _latentdir(params, fitted, conditions(), p.source_step, p.weight), {"source_step": p.source_step,
                                                                                "weight": p.weight}


def _latentdir_sweep(params, fitted, cond, device):
    """The weight w at each of sweep_steps (w = 0 once, at the first step)."""
    p = params.latentdir
    grid = [(p.sweep_steps[0], 0.0), *itertools.product(p.sweep_steps, p.sweep_weights)]
    return [({"source_step": s, "weight": w}, _latentdir(params, fitted, cond, s, w)) for s, w in grid]


def _latentdir_note(params, fitted, out):
    accuracy_png = fitted / "svm_accuracy.png"
    if not accuracy_png.is_file():
        return []
    shutil.copy(accuracy_png, out / "latentdir_svm_accuracy.png")
    p = params.latentdir
    return [f"Latent Directions: z_T + w·d with w = {p.weight:g}, directions fitted on x_t at step "
            f"{p.source_step} (SVM on {p.pool}×{p.pool}-pooled latents). Held-out SVM accuracy per step:", "",
            "![SVM accuracy per step](latentdir_svm_accuracy.png)", ""]


register(Method("latentdir", "latentdir", _latentdir_hooks, "weight", _latentdir_sweep, note=_latentdir_note))


# ------------------------------------------------------------------------------------ InvDiff: f_θ + r·δ

def _invdiff_fit(fitted, device):
    """(δ, the fit's summary.json): δ loaded first, so a missing fit is named by its δ."""
    from pipeline.io import load_json
    from pipeline.methods.invdiff import load_delta

    delta = load_delta(fitted / "delta", device)
    return delta, load_json(fitted / "summary.json")


def _invdiff_hooks(params, fitted, conditions, device):
    from pipeline.methods.invdiff import InvDiffHooks

    r, (delta, summary) = params.invdiff.strength, _invdiff_fit(fitted, device)
    return InvDiffHooks(delta, r, summary.get("train_timesteps")), {"strength": r}  # δ acts where it was trained


def _invdiff_sweep(params, fitted, cond, device):
    """The strength r (λ from the variant's own fit: the variants differ in λ and groups)."""
    from pipeline.methods.invdiff import InvDiffHooks

    delta, summary = _invdiff_fit(fitted, device)
    strengths = sorted({0.0, *params.invdiff.sweep_strengths})
    return [({"lam": summary["lam"], "strength": r}, InvDiffHooks(delta, r, summary.get("train_timesteps")))
            for r in strengths]


GROUPER, GROUPER_METRICS = Path("data/methods/invdiff_groups"), Path("data/metrics/fit_grouper.json")


def _invdiff_note(params, fitted, out):
    """The method and its ablations, and the bias discovery of the max step (fit_grouper)."""
    from pipeline.io import load_json

    if not GROUPER_METRICS.is_file():
        return []
    shutil.copy(GROUPER / "discovery.png", out / "invdiff_discovery.png")
    q, p = load_json(GROUPER_METRICS), params.invdiff
    shares = ", ".join(f"{v:.3f}" for k, v in q.items() if k.startswith("share_group"))
    return [
        f"InvDiff: f_θ + r·δ with r = {p.strength:g}; δ trained {p.steps} steps on mean_k L_k + λ·var_k L_k "
        f"(λ = {p.lam:g}) over {q.get('groups_total', p.num_groups)} groups inferred without bias labels. "
        "The ablations: "
        "`invdiff_lambda0` (λ = 0) and `invdiff_oracle` (the true aligned/conflicting split in place of the "
        "inferred groups — uses the labels, an upper reference).", "",
        f"Bias discovery (scored afterwards against the hidden labels): the highest-loss group holds "
        f"{q['share_group' + str(p.num_groups - 1)]:.1%} of the training set; precision "
        f"{q['precision_top_group']:.3f} and recall {q['recall_top_group']:.3f} for the bias-conflicting "
        f"images (base rate {q['conflicting_rate']:.3f}); NMI {q['nmi_conflicting']:.3f}; AUROC of the "
        f"normalised loss {q.get('auroc_scores', float('nan')):.3f}; group shares {shares}. "
        + (f"Level 2 (the conflicting-like group split into {q['conflict_clusters']} clusters of the frozen "
           f"model's features, `invdiff.conflict_clusters`): NMI with the hidden attribute "
           f"{q['nmi_attribute_level2']:.3f}, "
           f"purity {q['purity_attribute_level2']:.3f}. " if q.get("conflict_clusters", 1) > 1 else "")
        + "Rows below: training images most firmly in each group (lowest loss first).", "",
        "![InvDiff bias discovery](invdiff_discovery.png)", ""]


# The method, then its ablations (finetune_guidance@<variant> fits each: λ = 0; oracle groups from the labels).
register(Method("invdiff", "invdiff", _invdiff_hooks, "strength", _invdiff_sweep, note=_invdiff_note))
register(Method("invdiff_lambda0", "invdiff", _invdiff_hooks, "strength", _invdiff_sweep, label="ablation: λ = 0"))
register(Method("invdiff_oracle", "invdiff", _invdiff_hooks, "strength", _invdiff_sweep,
                label="ablation: true groups, uses bias labels"))


# ------------------------------------- Distribution Guidance: h ← h − s·∇_h L, or ε̂ + s·√(1−ᾱ)·∇_{x_t} L (x-space)

def _distguide(params, fitted, device, scale):
    from pipeline.methods.distribution_guidance import distribution_guidance_hooks

    p = params.distguide
    return distribution_guidance_hooks(fitted / "adp.safetensors", scale=scale, tau=p.tau, steps=p.steps,
                                       group_size=p.batch_size, target=p.target, device=device,
                                       beta_power=p.beta_power, space=p.space, guidance_scale=p.guidance_scale)


def _distguide_hooks(params, fitted, conditions, device):
    p = params.distguide
    return _distguide(params, fitted, device, p.scale), {"scale": p.scale, "tau": p.tau, "space": p.space,
                                                         "guidance_batch": p.batch_size}


def _distguide_sweep(params, fitted, cond, device):
    """The scale s."""
    scales = sorted({0.0, *params.distguide.sweep_scales})
    return [({"scale": s}, _distguide(params, fitted, device, s)) for s in scales]


def _distguide_note(params, fitted, out):
    from pipeline.io import load_json

    adp_png = fitted / "adp_accuracy.png"
    if not adp_png.is_file():
        return []
    shutil.copy(adp_png, out / "distguide_adp_accuracy.png")
    p, summary = params.distguide, load_json(fitted / "summary.json")
    edit = ("h ← h − s·β_t^p·∇_h L (h-space, published)" if p.space == "h" else
            "ε̂ ← ε̂ + s·β_t^p·√(1−ᾱ_t)·∇_{x_t} L (x-space classifier guidance through the ADP on h, ours)")
    fitted_on = ("h along the DDIM inversion of the attribute-balanced split, with its labels" if p.fit_on == "balanced"
                 else "the biased model's samples, labelled by the colour judge")
    w = params.sample.guidance_scale if p.guidance_scale is None else p.guidance_scale
    return [
        f"Distribution Guidance: {edit} at steps [{p.steps[0]}, {p.steps[1]}) with s = {p.scale:g}, p = "
        f"{p.beta_power:g}, τ = {p.tau:g}, L = |B|·Σ_k (p̂_k − p*_k)² / p*_k over each class's samples B in guidance "
        f"batches of {p.batch_size}; p* {'uniform' if p.target is None else list(p.target)}; classifier-free "
        f"guidance w = {w:g}. ADP at "
        f"`{p.h_module}`: {summary['chosen']} (mean held-out accuracy "
        f"{summary[summary['chosen'] + '_mean_accuracy']:.3f}), fitted on {fitted_on}. Held-out accuracy per step:",
        "",
        "![ADP accuracy per step](distguide_adp_accuracy.png)", ""]


register(Method("distguide", "distguide", _distguide_hooks, "scale", _distguide_sweep, note=_distguide_note))
