"""InvDiff (docs/methods.md): infer bias groups from the frozen model's per-sample losses (max step), then train a
small guidance network δ on a group-balanced, group-invariant loss (min step); sample with f_θ + r·δ.

Max step (no bias labels; class labels only)
    l_{i,d} = ‖ε̂_θ(x_t, t_d, c_i) − ε_{i,d}‖²  (pixel mean), draws d = 1..D at fixed timesteps t_d evenly spread
              over [t_min, t_max], fresh noise per draw; ε̂ converted from the model's parameterisation (ε, v, x_0)
    r_{i,d} = the same draw's loss under a reference condition (the null class ∅): ‖ε̂_θ(x_t, t_d, ∅) − ε_{i,d}‖²
    s_i = mean_d (l_{i,d} − r_{i,d}) / mean_j r_{j,d}   with the reference (`contrast`), else
    s_i = mean_d  l_{i,d} / mean_j l_{j,d}
          Each draw is divided by its timestep's mean loss, so every t counts alike (raw losses at small t are ~50×
          those at large t). The contrast l − r is the loss the class label adds on this very (x_t, ε) — minus the
          log-likelihood ratio log p(c|x_t) of the model's implicit classifier: it cancels the noise draw and the
          image's own difficulty, and is large where the image contradicts what the model learned for its class.
    z_i = (s_i − mean_{c_j=c_i} s_j) / std_{c_j=c_i} s_j     within-class z-score (digits differ in difficulty)
    W   = argmax_W  std_k m_k − ρ·Σ_k relu(π − n_k/N)²,   m_k = Σ_i z_i W_ik / Σ_i W_ik,   n_k = Σ_i W_ik
          by Adam; after each step W ← clamp(W, 0), rows renormalised (rows stay on the simplex).
    π (min_group_share) bounds the smallest group's share: without it the spread is maximised by a single
    extreme sample, and Adam from a random start stalls at the near-mean split instead (measured, see docs).
    π = "auto" estimates it from the scores alone: the share of z beyond median + 3 robust SDs
    (`estimate_minority_share`).
    `init="ranked"` starts from the quantile split of z (top π share in the last group); "random" is the
    published start.
Min step (f_θ frozen; δ of the same class and inputs, ≤ 25% of the parameters, zero-initialised output layer)
    f̂_i = f_θ(x_t, t, c_i) + δ(x_t, t, c_i)
    l_i = ‖f̂_i − target_i‖²   (pixel mean; target in the model's own parameterisation: ε, v or x_0)
    Target-weighted (default, `target` uniform or p*): batches drawn from the re-weighted data in which cell
    (class y, group g) has mass p(y)·T[y, g] (`group_targets`, `TargetSampler`; 1/K and (K−1)/K for the
    aligned-like / conflicting-like pair and a uniform p*), so its optimum is the target attribute distribution;
    loss = mean_i l_i + λ·var_g L_g, L_g the mean loss of the draws made for group g (`drawn_group_loss`).
    `target: equal` (every group alike, the published weighting; optimum an aligned share of 1/G):
    L_k = Σ_{i∈B} l_i W_ik / Σ_{i∈B} W_ik,     loss = mean_k L_k + λ·var_k L_k   (population variance over k)
    with B/K indices per group k drawn ∝ W_:k (a 5% group barely moves a weighted mean of a uniform batch).
    With `paired`, the j-th sample of every group shares its (t, ε) draw, so the variance term compares groups
    on the same draws rather than on the t-dependence of the loss.
    δ's lr: linear warm-up then cosine (`lr_factor`); δ saved as the EMA of its weights (`ema_update`).
Sampling: f = f_θ + r·δ. r = 1 is the trained combination; r > 1 extrapolates along δ like a guidance scale.

Differences from the published code (on purpose; docs/methods.md "InvDiff"): its grouper compares the prediction
with the clean image instead of the noise; its training ignores the mixing ratio; its δ is by default a full copy
of the base U-Net; its groups are weighted alike, not to a target.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.checkpoints import Checkpointer, LossHistory, check_finite, config_fingerprint, tensor_digest
from pipeline.conditioning import Conditioning, call_unet
from pipeline.diffusion import adamw, training_target
from pipeline.errors import UserError
from pipeline.io import atomic_path
from pipeline.sampling import SamplerHooks, StepContext, make_scheduler
from pipeline.targets import target_distribution

# ----------------------------------------------------------------------------------------------------------------
# any diffusers U-Net: UNet2DModel (class labels) or UNet2DConditionModel (class labels and/or text embeddings)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_delta(base, *, width: float, max_param_ratio: float = 0.25):
    """δ: the base's own class, built from its config with every channel width scaled by `width` (rounded down to
    a multiple of the GroupNorm group count, which is scaled too), output layer zeroed so f_θ + δ = f_θ at
    initialisation. Raises if δ has more than max_param_ratio × the base's parameters."""
    import math

    cfg = {k: v for k, v in dict(base.config).items() if not k.startswith("_")}
    groups = max(1, int(cfg.get("norm_num_groups") or 32))
    # GroupNorm groups scale with the width; every width is a multiple of the new group count
    new_groups = math.gcd(groups, max(1, round(groups * width)))
    widths = [max(new_groups, int(c * width) // new_groups * new_groups) for c in cfg["block_out_channels"]]
    cfg.update(block_out_channels=tuple(widths), norm_num_groups=new_groups)
    head = cfg.get("attention_head_dim")
    if isinstance(head, int) and any(w % head for w in widths):
        cfg["attention_head_dim"] = math.gcd(head, *widths)
    delta = type(base).from_config(cfg)
    torch.nn.init.zeros_(delta.conv_out.weight)
    torch.nn.init.zeros_(delta.conv_out.bias)
    ratio = count_params(delta) / count_params(base)
    if ratio > max_param_ratio:
        raise UserError(f"invdiff.delta_width: {width} gives δ {ratio:.0%} of the base's parameters "
                        f"(at most {max_param_ratio:.0%}); lower it")
    return delta


def load_delta(path: str | Path, device="cpu"):
    """A δ saved by finetune_guidance (save_pretrained), whatever its diffusers class."""
    import diffusers

    path = Path(path)
    try:
        name = json.loads((path / "config.json").read_text())["_class_name"]
        cls = getattr(diffusers, name)
        model = cls.from_pretrained(str(path), use_safetensors=True)
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: cannot load the InvDiff guidance module ({msg}; run `dvc repro "
                        "finetune_guidance`)") from None
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------------------------
# max step: per-sample losses and the grouper


def predicted_noise(scheduler, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ε̂ from a model output in any parameterisation: ε as is; v: √ᾱ·v + √(1−ᾱ)·x_t; x_0: (x_t − √ᾱ·x_0)/√(1−ᾱ)."""
    a = scheduler.alphas_cumprod.to(out.device, torch.float32)[t].view(-1, 1, 1, 1)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return out
    if kind == "v_prediction":
        return a.sqrt() * out + (1 - a).sqrt() * x_t
    return (x_t - a.sqrt() * out) / (1 - a).sqrt()


def loss_timesteps(t_min: int, t_max: int, draws: int) -> np.ndarray:
    """The D timesteps of the max step, evenly spread over [t_min, t_max]."""
    return np.unique(np.linspace(t_min, t_max, draws).round().astype(np.int64))


@torch.no_grad()
def denoising_losses(unet, scheduler, images: torch.Tensor, cond: Conditioning, timesteps: np.ndarray, *,
                     reference: Conditioning | None = None, seed: int, batch_size: int = 500, device="cpu",
                     autocast: bool | None = None, progress: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """(l, r): l[i, d] = pixel-mean ‖ε̂_θ(x_t, t_d, c_i) − ε‖² of the frozen model, one fresh noise per (i, d); r the
    same draws under `reference` (None without one). [N, D] each."""
    device = torch.device(device)
    autocast = device.type == "cuda" if autocast is None else autocast
    gen = torch.Generator().manual_seed(seed)
    out = np.empty((len(images), len(timesteps)), np.float32)
    ref = None if reference is None else np.empty_like(out)
    starts = range(0, len(images), batch_size)

    def loss(x_t, t, c, noise):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            f = call_unet(unet, x_t, t, c).float()
        return (predicted_noise(scheduler, f, x_t, t) - noise).pow(2).mean(dim=(1, 2, 3)).cpu().numpy()

    with tqdm(total=len(starts) * len(timesteps), desc="denoising losses", disable=not progress, leave=False) as bar:
        for s in starts:
            idx = torch.arange(s, min(s + batch_size, len(images)))
            x0 = images[idx].to(device)
            for d, t_val in enumerate(timesteps):
                noise = torch.randn(x0.shape, generator=gen).to(device)
                t = torch.full((len(idx),), int(t_val), dtype=torch.long, device=device)
                x_t = scheduler.add_noise(x0, noise, t)
                out[s:s + len(idx), d] = loss(x_t, t, cond.select(idx, device), noise)
                if reference is not None:
                    ref[s:s + len(idx), d] = loss(x_t, t, reference.select(idx, device), noise)
                bar.update()
    return out, ref


def normalised_scores(losses: np.ndarray, classes: np.ndarray | None, reference: np.ndarray | None = None
                      ) -> np.ndarray:
    """z_i (module docstring): per-timestep scaling, the optional reference contrast, within-class z-score."""
    if reference is None:
        s = (losses / losses.mean(0, keepdims=True)).mean(1)
    else:
        s = ((losses - reference) / reference.mean(0, keepdims=True)).mean(1)
    if classes is None:
        return (s - s.mean()) / max(s.std(), 1e-12)
    z = np.empty_like(s)
    for y in np.unique(classes):
        m = classes == y
        z[m] = (s[m] - s[m].mean()) / max(s[m].std(), 1e-12)
    return z


def estimate_minority_share(scores: np.ndarray, k: float = 3.0) -> float:
    """Share of scores more than k robust standard deviations above the median (σ̂ = 1.4826·MAD; label-free).
    Measured here: 0.048 for a true 0.050, where a 2-component Gaussian mixture said 0.076 (its wide upper
    component swallows the majority's tail)."""
    z = np.asarray(scores, np.float64)
    med = np.median(z)
    sigma = 1.4826 * np.median(np.abs(z - med))
    return float(np.clip((z > med + k * max(sigma, 1e-12)).mean(), 1.0 / len(z), 0.5))


def check_groups(W: np.ndarray, origin: str, rows: int | None) -> np.ndarray:
    """A soft group matrix read from a file: [rows, K >= 2] finite floats, each row on the simplex (w ≥ 0, Σ_k w = 1),
    and every group non-empty (Σ_i W_ik > 0); else one UserError naming the file."""
    if W.ndim != 2 or (rows is not None and W.shape[0] != rows) or W.shape[1] < 2:
        raise UserError(f"{origin}: W must be [{rows or 'N'} training images, groups >= 2], got {list(W.shape)} "
                        "(run `dvc repro fit_grouper`)")
    if not np.issubdtype(W.dtype, np.floating) or not np.isfinite(W).all():
        raise UserError(f"{origin}: W must hold finite floats (run `dvc repro fit_grouper`)")
    if (W < 0).any() or not np.allclose(W.sum(1), 1.0, atol=1e-4) or (W.sum(0) <= 0).any():
        raise UserError(f"{origin}: each row of W must be non-negative and sum to 1, each group non-empty")
    return W


def project_rows(W: torch.Tensor) -> torch.Tensor:
    """Clamp at 0 and renormalise each row to sum 1 (an all-zero row becomes uniform)."""
    W = W.clamp(min=0)
    s = W.sum(1, keepdim=True)
    return torch.where(s > 0, W / s.clamp(min=1e-12), torch.full_like(W, 1.0 / W.shape[1]))


def group_means(z: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """m_k = Σ_i z_i W_ik / Σ_i W_ik."""
    return (z[:, None] * W).sum(0) / W.sum(0).clamp(min=1e-12)


def grouper_objective(z: torch.Tensor, W: torch.Tensor, min_share: float, penalty: float) -> torch.Tensor:
    """std_k m_k − ρ·Σ_k relu(π − n_k/N)² (to be maximised)."""
    share = W.sum(0) / W.shape[0]
    return group_means(z, W).std(unbiased=False) - penalty * torch.relu(min_share - share).pow(2).sum()


@dataclass
class GrouperResult:
    W: np.ndarray  # [N, K] float32, rows on the simplex
    objective: list[float] = field(default_factory=list)


def fit_grouper(scores: np.ndarray, num_groups: int = 2, *, min_share: float = 0.05, steps: int = 300,
                lr: float = 0.05, penalty: float = 100.0, init: str = "ranked", seed: int = 0) -> GrouperResult:
    """Soft groups W [N, K] maximising the spread of group-mean scores (module docstring). Groups are ordered by
    mean score, so the last group is the highest-loss one."""
    if num_groups < 2:
        raise UserError(f"invdiff.num_groups: expected >= 2, got {num_groups}")
    if not 0 < min_share * num_groups <= 1:
        raise UserError(f"invdiff.min_group_share: {min_share} × {num_groups} groups must lie in (0, 1]")
    z = torch.as_tensor(scores, dtype=torch.float64)
    n, K = len(z), num_groups
    gen = torch.Generator().manual_seed(seed)
    if init == "ranked":
        # quantile split: the top π share in the last group, the rest split evenly by rank
        rank = torch.empty(n, dtype=torch.float64)
        rank[torch.argsort(z)] = torch.arange(n, dtype=torch.float64) / n
        edges = torch.linspace(0, 1 - min_share, K)[1:].to(torch.float64)
        W = torch.nn.functional.one_hot(torch.bucketize(rank, edges, right=True), K).to(torch.float64)
        W = project_rows(0.9 * W + 0.1 / K)  # soft, so boundary samples can still move
    elif init == "random":
        W = project_rows(torch.rand(n, K, generator=gen, dtype=torch.float64))
    else:
        raise UserError(f"invdiff.grouper_init: expected 'ranked' or 'random', got {init!r}")
    W.requires_grad_(True)
    opt = torch.optim.Adam([W], lr=lr)
    history = []
    for _ in range(steps):
        obj = grouper_objective(z, W, min_share, penalty)
        opt.zero_grad()
        (-obj).backward()
        opt.step()
        with torch.no_grad():
            W.copy_(project_rows(W))
        history.append(float(obj.detach()))
    W = W.detach()
    order = torch.argsort(group_means(z, W))
    return GrouperResult(W=W[:, order].numpy().astype(np.float32), objective=history)


def oracle_groups(aligned: np.ndarray) -> np.ndarray:
    """One-hot W from the true labels: group 0 bias-aligned, group 1 bias-conflicting (an ablation that uses labels)."""
    return np.stack([aligned, ~aligned], 1).astype(np.float32)


def attribute_groups(bias: np.ndarray, num_attributes: int) -> np.ndarray:
    """One-hot W [N, K] on the true attribute value. With the class as condition, the cells (class, attribute) are
    the published oracle's groups (class × attribute; an ablation that uses the hidden labels)."""
    return np.eye(num_attributes, dtype=np.float32)[np.asarray(bias, np.int64)]


def harden(W: np.ndarray) -> np.ndarray:
    """One-hot rows at argmax_k W_ik (hard groups: no image counts in two groups)."""
    return np.eye(W.shape[1], dtype=np.float32)[W.argmax(1)]


def group_targets(target, num_groups: int, aligned: tuple[int, ...], num_attributes: int, *,
                  attribute_groups: bool = False, present: np.ndarray | None = None) -> np.ndarray:
    """T [C, G]: the share group g should have within class y in the re-weighted training data.

    target: "equal" → T = 1/G (every group alike: the published weighting, 50/50 for two groups);
            "uniform" or p* (K floats) → the attribute distribution p*. With attribute groups (the oracle)
            T[y, b] = p*(b). With inferred groups (0 the aligned-like, the others conflicting-like)
            T[y, 0] = p*(a_y), a_y the class's bias-aligned value, and the rest 1 − p*(a_y) spread evenly over
            groups 1..G−1 (the data spreads the conflicting values evenly, so for two groups and a uniform p*
            the weights are 1/K and (K−1)/K). With `present` [C, G] (bool: class y has images in group g), the
            1 − p*(a_y) is spread over the conflicting-like groups present in class y only: with groups 1..G−1
            the clusters of a split conflicting-like group (`split_conflicting`), each one an attribute value
            where the split found the values, every value present in a class gets an equal share."""
    C = len(aligned)
    if isinstance(target, str) and target == "equal":
        return np.full((C, num_groups), 1.0 / num_groups)
    if isinstance(target, str) and target == "uniform":
        p = np.full(num_attributes, 1.0 / num_attributes)
    else:
        p = target_distribution(target, num_attributes, "invdiff.target ('uniform', 'equal' or one share per "
                                "attribute value)")
    if attribute_groups:
        if num_groups != num_attributes:
            raise UserError(f"attribute groups: W has {num_groups} columns for {num_attributes} attribute values")
        return np.tile(p, (C, 1))
    a = p[np.asarray(aligned)]
    on = np.ones((C, num_groups - 1), bool) if present is None else np.asarray(present, bool)[:, 1:]
    rest = np.where(on, ((1 - a) / np.maximum(on.sum(1), 1))[:, None], 0.0)
    return np.concatenate([a[:, None], rest], 1)


class TargetSampler:
    """Draws training batches from the target-weighted data: each cell (class y, group g) gets the mass
    π_{y,g} = p(y)·T[y,g] (p(y) the data's class share; T renormalised over the cells that hold any W mass), and
    within a cell image i is drawn ∝ W_ig. So image i is drawn with probability
        q_i = Σ_g π_{y_i,g}·W_ig / n_{y_i,g},   n_{y,g} = Σ_{j: y_j = y} W_jg.
    Stratified: cell c gets ⌊B·π_c⌋ draws, the remaining ones go to cells drawn ∝ the fractional parts (without
    replacement), so the realised mix is within one draw per cell of π. Each draw keeps the group g it was drawn
    for: W is used once (to draw), not again to weight the loss."""

    def __init__(self, W: np.ndarray, classes: np.ndarray, T: np.ndarray):
        W = np.asarray(W, np.float64)
        classes = np.asarray(classes)
        self.cells, pis, self.members = [], [], []
        ys = np.unique(classes)
        for y in ys:
            rows = np.flatnonzero(classes == y)
            mass = W[rows].sum(0)
            t = np.where(mass > 0, T[y], 0.0)
            if t.sum() <= 0:
                raise UserError(f"invdiff: class {y} has no image in any group with a positive target share")
            t = t / t.sum() * len(rows) / len(classes)
            for g in np.flatnonzero(t > 0):
                self.cells.append((int(y), int(g)))
                pis.append(t[g])
                self.members.append((torch.as_tensor(rows), torch.as_tensor(W[rows, g] / mass[g])))
        self.pi = torch.as_tensor(np.asarray(pis) / np.sum(pis))
        self.groups = torch.as_tensor([g for _, g in self.cells])

    def probabilities(self, n: int) -> np.ndarray:
        """q_i (class docstring), [n]."""
        q = np.zeros(n)
        for pi, (rows, w) in zip(self.pi.numpy(), self.members, strict=True):
            q[rows.numpy()] += pi * w.numpy()
        return q

    def counts(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        exact = batch * self.pi
        base = exact.floor().long()
        rest = batch - int(base.sum())
        if rest > 0:
            frac = (exact - base).clamp(min=0) + 1e-12
            base += torch.bincount(torch.multinomial(frac, rest, replacement=rest > len(frac), generator=gen),
                                   minlength=len(frac))
        return base

    def draw(self, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices [B], group of each draw [B])."""
        idx, grp = [], []
        for c, n in enumerate(self.counts(batch, gen).tolist()):
            if n:
                rows, w = self.members[c]
                idx.append(rows[torch.multinomial(w, n, replacement=True, generator=gen)])
                grp.append(self.groups[c].repeat(n))
        return torch.cat(idx), torch.cat(grp)


def drawn_group_loss(per_sample: torch.Tensor, groups: torch.Tensor, num_groups: int, lam: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean_i l_i + λ·var_g L_g, L): the batch mean estimates Σ_g π_g L_g under the target-weighted draw
    (`TargetSampler`); L_g = mean of l_i over the draws made for group g; the variance (population) is over the
    groups present in the batch."""
    W = torch.nn.functional.one_hot(groups, num_groups).to(per_sample.dtype)
    mass = W.sum(0)
    present = mass > 0
    L = (per_sample[:, None] * W).sum(0)[present] / mass[present]
    var = L.var(unbiased=False) if len(L) > 1 else per_sample.new_zeros(())
    return per_sample.mean() + lam * var, L


def lr_factor(step: int, total: int, schedule: str, warmup: int) -> float:
    """Learning-rate multiplier at `step` (0-based): linear warm-up (step+1)/warmup over the first `warmup` steps,
    then 1 (constant) or ½(1 + cos(π·s/S)) with s = step − warmup, S = total − warmup (cosine, as the published
    training: diffusers' get_cosine_schedule_with_warmup)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    import math

    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def ema_update(ema: list[torch.Tensor], params, decay: float) -> None:
    """θ̄ ← decay·θ̄ + (1 − decay)·θ for every parameter (one foreach lerp: the per-parameter lerp_'s bits)."""
    torch._foreach_lerp_(ema, [p.detach().float() for p in params], 1.0 - decay)


def grouping_quality(W: np.ndarray, conflicting: np.ndarray, scores: np.ndarray | None = None) -> dict:
    """How well the highest-loss group (last column) recovers the bias-conflicting samples: precision, recall,
    NMI of argmax groups vs the conflicting flag, group shares, and the AUROC of the scores. Uses hidden labels:
    for scoring only."""
    from sklearn.metrics import normalized_mutual_info_score, roc_auc_score

    groups = W.argmax(1)
    top = groups == W.shape[1] - 1
    tp = float((top & conflicting).sum())
    # purity of the soft conflicting-like group: Σ_{i aligned} W_i,K−1 / Σ_i W_i,K−1 (the share of its draws that
    # are aligned images when batches are drawn ∝ W)
    soft_aligned = float(W[~conflicting, -1].sum() / max(W[:, -1].sum(), 1e-12))
    out = {"precision_top_group": tp / max(top.sum(), 1), "recall_top_group": tp / max(conflicting.sum(), 1),
           "aligned_mass_top_group": soft_aligned, "aligned_share_top_group_hard": 1.0 - tp / max(top.sum(), 1),
           "nmi_conflicting": float(normalized_mutual_info_score(conflicting, groups)),
           "conflicting_rate": float(conflicting.mean()),
           **{f"share_group{k}": float((groups == k).mean()) for k in range(W.shape[1])}}
    if scores is not None and 0 < conflicting.sum() < len(conflicting):
        out["auroc_scores"] = float(roc_auc_score(conflicting, scores))
    return out


# ----------------------------------------------------------------------------------------------------------------
# max step, level 2: split the conflicting-like group by the frozen model's features (no bias labels)


@torch.no_grad()
def unet_features(unet, scheduler, images: torch.Tensor, cond: Conditioning, t: int, module: str, *, seed: int,
                  batch_size: int = 500, device="cpu") -> np.ndarray:
    """h_i = spatial mean per channel of `module`'s output on x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε (one seeded ε per image)
    under the image's own condition c_i. [N, channels]."""
    device = torch.device(device)
    try:
        target = unet.get_submodule(module)
    except AttributeError:
        raise UserError(f"invdiff.split_module: the U-Net has no module {module!r}") from None
    gen = torch.Generator().manual_seed(seed)
    store = {}
    handle = target.register_forward_hook(lambda m, i, o: store.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    chunks = []
    try:
        for s in range(0, len(images), batch_size):
            idx = torch.arange(s, min(s + batch_size, len(images)))
            x0 = images[idx].to(device)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            tt = torch.full((len(idx),), int(t), dtype=torch.long, device=device)
            call_unet(unet, scheduler.add_noise(x0, noise, tt), tt, cond.select(idx, device))
            chunks.append(store["h"].float().mean(dim=(2, 3)).cpu().numpy())
    finally:
        handle.remove()
    return np.concatenate(chunks).astype(np.float64)


def centre_within_class(F: np.ndarray, classes: np.ndarray, ref: np.ndarray | None = None,
                        ref_classes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(F̃, R̃): F̃_i = (F_i − μ_{c_i}) / σ, μ_y the mean of class y's rows of F (the class — the condition, a known
    label — moves the features more than the attribute does), σ the root-mean-square of the centred features (one
    scalar: a per-feature scale would blow quiet, attribute-free channels up to the size of the informative ones);
    the reference rows R are mapped with the same μ and σ."""
    F = np.asarray(F, np.float64)
    mu = {y: F[classes == y].mean(0) for y in np.unique(classes)}
    Fc = F - np.stack([mu[y] for y in classes]) if len(F) else F
    sd = max(float(np.sqrt((Fc**2).mean())), 1e-12) if len(F) else 1.0
    R = None
    if ref is not None:
        R = (np.asarray(ref, np.float64) - np.stack([mu.get(y, np.zeros(F.shape[1])) for y in ref_classes])) / sd
    return Fc / sd, R


def choose_num_clusters(F: np.ndarray, k_max: int, *, seed: int, min_silhouette: float = 0.25
                        ) -> tuple[int, dict[int, float]]:
    """(k, {k: s_k}): k-means on a random half of the rows for each k in 2..k_max, s_k = silhouette of the other
    (held-out) half under the fitted centres' assignment; k = argmax s_k, or 1 (no split) where max s_k <
    min_silhouette (Kaufman & Rousseeuw: below 0.25 no substantial structure) or too few rows."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    n = len(F)
    perm = np.random.default_rng(seed).permutation(n)
    fit, val = F[perm[: n // 2]], F[perm[n // 2:]]
    scores = {}
    for k in range(2, k_max + 1):
        if k >= len(fit) or k >= len(val):
            break
        km = KMeans(k, n_init=4, random_state=seed).fit(fit)
        lab = km.predict(val)
        scores[k] = float(silhouette_score(val, lab)) if 1 < len(np.unique(lab)) < len(val) else -1.0
    if not scores or max(scores.values()) < min_silhouette:
        return 1, scores
    return max(scores, key=scores.get), scores


def split_last_group(W: np.ndarray, rows: np.ndarray, labels: np.ndarray, k: int,
                     to_first: np.ndarray | None = None) -> np.ndarray:
    """W' [N, G−1+k']: groups 0..G−2 as in W; the last group's mass W_i,G−1 of row rows[j] goes to sub-group
    labels[j], or to group 0 where to_first[j] (it sits in its class's aligned-like cluster). `rows` must cover every
    row with W_i,G−1 > 0. Empty sub-groups are dropped, so every column holds mass."""
    W = np.asarray(W, np.float64)
    last = W[:, -1]
    if (last[np.setdiff1d(np.arange(len(W)), rows)] > 0).any():
        raise ValueError("split_last_group: rows must cover every image with mass in the last group")
    sub = np.zeros((len(W), k))
    move = np.zeros(len(rows), bool) if to_first is None else np.asarray(to_first, bool)
    sub[rows[~move], labels[~move]] = last[rows[~move]]
    out = np.concatenate([W[:, :-1], sub], 1)
    out[rows[move], 0] += last[rows[move]]
    keep = np.concatenate([np.ones(W.shape[1] - 1, bool), sub.sum(0) > 0])
    return out[:, keep].astype(np.float32)


def split_conflicting(W: np.ndarray, classes: np.ndarray, features, p, seed: int) -> tuple[np.ndarray, dict]:
    """The level-2 split of the last (conflicting-like) group of W, without bias labels.

    rows = {i: W_i,G−1 > 0}; references = up to `split_reference` images per class drawn (seeded) from the rows
    whose argmax is group 0 (aligned-like). `features(indices)` gives their frozen-model features (`unet_features`),
    centred within class on the rows' class means (`centre_within_class`). k = p.conflict_clusters, or with "auto"
    `choose_num_clusters` over 2..p.conflict_clusters_max; k-means (k clusters, centres c_m) on the rows. The
    cluster h_y that most of class y's references fall in is y's home cluster; a class-y row i there goes back to
    group 0 where ‖F_i − r_y‖ ≤ the median of ‖R_j − r_y‖ over the references, r_y their mean (it looks like
    the class's majority). Returns (W' [N, G−1+k'], info)."""
    from sklearn.cluster import KMeans

    rows = np.flatnonzero(W[:, -1] > 0)
    rng = np.random.default_rng(seed)
    aligned_like = W.argmax(1) == 0
    ref = np.concatenate([rng.permutation(np.flatnonzero(aligned_like & (classes == y)))[: p.split_reference]
                          for y in np.unique(classes)]).astype(np.int64)
    feats = features(np.concatenate([rows, ref]))
    F, R = centre_within_class(feats[: len(rows)], classes[rows], feats[len(rows):], classes[ref])
    if p.conflict_clusters == "auto":
        k, sil = choose_num_clusters(F, p.conflict_clusters_max, seed=seed)
    else:
        k, sil = min(int(p.conflict_clusters), len(rows)), {}
    info = {"conflict_clusters": k, "silhouette": sil, "moved_to_group0": 0}
    if k <= 1:
        return W, info
    km = KMeans(k, n_init=10, random_state=seed).fit(F)
    labels = km.labels_
    to_first = np.zeros(len(rows), bool)
    if len(ref):
        ref_lab = km.predict(R)
        for y in np.unique(classes[ref]):
            home = np.bincount(ref_lab[classes[ref] == y], minlength=k).argmax()
            Ry = R[classes[ref] == y]
            r_y = Ry.mean(0)
            reach = np.median(np.linalg.norm(Ry - r_y, axis=1))
            m = (classes[rows] == y) & (labels == home)
            # as close to the references' mean as half the references: an aligned image that the score level
            # let through (a cluster may hold several nearby values: the others stay; a looser reach moved more
            # conflicting images than aligned ones on the default model, docs/methods.md)
            to_first |= m & (np.linalg.norm(F - r_y, axis=1) <= reach)
    info["moved_to_group0"] = int(to_first.sum())
    W2 = split_last_group(W, rows, labels, k, to_first)
    info["conflict_clusters"] = W2.shape[1] - (W.shape[1] - 1)
    return W2, info


def split_quality(W: np.ndarray, first: int, bias: np.ndarray, conflicting: np.ndarray) -> dict:
    """Level 2 of the grouping, scored against the hidden attribute (scoring only): among the images whose argmax
    group is a sub-group (≥ `first`), NMI and purity (Σ_clusters max_b count / n) of sub-group vs attribute value;
    the same among those that are truly bias-conflicting; and NMI of all groups vs the attribute (every image)."""
    from sklearn.metrics import normalized_mutual_info_score as nmi

    g = W.argmax(1)
    m = g >= first

    def purity(a, b):
        return float(sum(np.bincount(b[a == c]).max() for c in np.unique(a)) / max(len(a), 1)) if len(a) else 0.0

    mc = m & conflicting
    return {"groups_total": int(W.shape[1]), "conflict_clusters": int(W.shape[1] - first),
            "nmi_attribute_level2": float(nmi(bias[m], g[m])) if m.any() else 0.0,
            "purity_attribute_level2": purity(g[m], bias[m]),
            "nmi_attribute_level2_conflicting": float(nmi(bias[mc], g[mc])) if mc.any() else 0.0,
            "nmi_attribute_all": float(nmi(bias, g))}


def infer_groups(train, model, p, seed: int, device) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """The whole max step on a dataset view that must not carry the bias attribute (`train`: images, classes only),
    for a pipeline.pretrained.DiffusionModel and the `invdiff` params section `p`: the frozen model's losses
    l[i, d] = pixel-mean ‖ε̂_θ(x_t, t_d, y_i) − ε‖² at the loss_timesteps draws (denoising_losses; with
    p.loss_contrast also r[i, d] under ∅), the normalised scores s_i (normalised_scores), then the soft groups W
    (fit_grouper); with p.conflict_clusters ≠ 1 the last group is then split (`split_conflicting`, features from
    `unet_features` at t = loss_timesteps[0]). Returns (W [N, G], scores [N], losses [N, D] or with the null-class
    reference [N, D, 2], {timesteps, objective, min_group_share, score_groups[, conflict_clusters, silhouette,
    moved_to_group0]})."""
    if hasattr(train, "bias") or hasattr(train, "aligned"):
        raise UserError("infer_groups: the training view carries the bias attribute; the grouper must infer groups "
                        "without it (load_split(..., with_bias=False))")
    from pipeline.data import to_tensor

    if p.conflict_clusters != 1:  # a wrong module name fails now, not after the loss draws
        try:
            model.unet.get_submodule(p.split_module)
        except AttributeError:
            raise UserError(f"invdiff.split_module: the U-Net has no module {p.split_module!r}") from None
    scheduler = make_scheduler(model.scheduler_config, "ddpm")
    ts = loss_timesteps(*p.loss_timesteps, p.loss_draws)
    classes, table = torch.from_numpy(train.classes), model.prompt_embeds
    reference = (Conditioning(class_labels=torch.full_like(classes, model.null_class), prompt_embeds=table)
                 if p.loss_contrast else None)
    losses, ref = denoising_losses(model.unet, scheduler, model.to_model_space(to_tensor(train.images)),
                                   Conditioning(class_labels=classes, prompt_embeds=table), ts,
                                   reference=reference, seed=seed, batch_size=p.loss_batch_size, device=device)
    scores = normalised_scores(losses, train.classes, ref)
    share = estimate_minority_share(scores) if p.min_group_share == "auto" else p.min_group_share
    fit = fit_grouper(scores, p.num_groups, min_share=min(share, 1 / p.num_groups), steps=p.grouper_steps,
                      lr=p.grouper_lr, init=p.grouper_init, seed=seed)
    losses = losses if ref is None else np.stack([losses, ref], -1)
    info = {"timesteps": ts, "objective": fit.objective, "min_group_share": share, "score_groups": p.num_groups}
    W = fit.W
    if p.conflict_clusters != 1:  # level 2: split the conflicting-like group by the frozen model's features
        images = model.to_model_space(to_tensor(train.images))
        cond = Conditioning(class_labels=classes, prompt_embeds=table)

        def features(idx):
            idx = torch.as_tensor(idx)
            return unet_features(model.unet, scheduler, images[idx], cond.select(idx, "cpu"), int(ts[0]),
                                 p.split_module, seed=seed, batch_size=p.loss_batch_size, device=device)

        W, split = split_conflicting(W, train.classes, features, p, seed)
        info.update(split)
    return W, scores, losses, info


# ----------------------------------------------------------------------------------------------------------------
# min step


def group_loss(per_sample: torch.Tensor, W: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean_k L_k + λ·var_k L_k, L) with L_k = Σ_i l_i W_ik / Σ_i W_ik; groups absent from the batch are left out."""
    mass = W.sum(0)
    present = mass > 0
    L = (per_sample[:, None] * W).sum(0)[present] / mass[present]
    return L.mean() + lam * L.var(unbiased=False), L


def balanced_indices(W: torch.Tensor, batch: int, gen: torch.Generator) -> torch.Tensor:
    """batch/K indices per group k, drawn with replacement ∝ W_:k (remainder spread over the first groups)."""
    sizes = _group_sizes(batch, W.shape[1])
    return torch.cat([torch.multinomial(W[:, k], s, replacement=True, generator=gen) for k, s in enumerate(sizes)])


def _group_sizes(batch: int, K: int) -> list[int]:
    """batch/K per group, the remainder spread over the first groups (the layout of a balanced batch)."""
    return [batch // K + (k < batch % K) for k in range(K)]


def paired_draws(K: int, batch: int, shape, T: int | tuple[int, int], gen: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε, t) for a group-balanced batch (layout of `balanced_indices`) where the j-th sample of every group gets
    the same timestep and noise. L_k − L_k' then compares the groups on identical (t, ε) draws: the spread of
    the loss over t (large) cancels from var_k L_k instead of swamping it; E[L_k] is unchanged."""
    sizes = _group_sizes(batch, K)
    lo, hi = (0, T) if isinstance(T, int) else T
    noise = torch.randn((sizes[0], *shape), generator=gen)
    t = torch.randint(lo, hi, (sizes[0],), generator=gen)
    return torch.cat([noise[:s] for s in sizes]), torch.cat([t[:s] for s in sizes])


@dataclass
class FinetuneResult:
    steps: int
    resumed_from: int
    final_loss: float
    delta_params: int
    base_params: int
    losses: list[tuple[int, float]] = field(default_factory=list)
    group_losses: list[list[float]] = field(default_factory=list)


def finetune_guidance(base, delta, scheduler, images: torch.Tensor, cond: Conditioning, W: np.ndarray, *,
                      cfg: dict, seed: int, out_dir: Path, ckpt_dir: Path, null_class: int | None = None,
                      targets: np.ndarray | None = None, accelerator=None, log=None,
                      progress: bool = True) -> FinetuneResult:
    """Train δ with the base frozen (module docstring) and write it to out_dir via save_pretrained.

    images: float [N,C,H,W] in [-1,1]; W: [N,K]. cfg keys: steps, batch_size, lr, lam, balanced, paired (optional,
    `paired_draws`), label_dropout, checkpoint_every; optional lr_schedule ("constant" | "cosine", `lr_factor`),
    warmup_steps, ema_decay (0 = none; else δ's weights are the EMA θ̄, `ema_update`). With null_class set, class
    labels are replaced by it with probability label_dropout, so δ also learns the unconditional branch used by
    classifier-free guidance. With `targets` T [C, K] (`group_targets`) and balanced, batches are drawn from the
    target-weighted data (`TargetSampler`, needs class labels) and the loss is `drawn_group_loss`; without, B/K
    per group drawn ∝ W and `group_loss` (every group weighted alike).
    """
    from accelerate import Accelerator

    accelerator = accelerator or Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    if W.shape[0] != len(images) or len(cond) != len(images):
        raise UserError(f"group matrix has {W.shape[0]} rows, conditioning {len(cond)}, images {len(images)}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    W_t = torch.as_tensor(W, dtype=torch.float32)
    sampler = None
    if targets is not None and cfg["balanced"]:
        if cond.class_labels is None:
            raise UserError("invdiff.target: target weighting needs class labels (cells are class × group)")
        sampler = TargetSampler(W, cond.class_labels.cpu().numpy(), targets)
    schedule, warmup = cfg.get("lr_schedule", "constant"), int(cfg.get("warmup_steps", 0))
    ema_decay = float(cfg.get("ema_decay", 0.0))
    base.requires_grad_(False).eval()
    opt = adamw(delta.parameters(), cfg["lr"])
    fingerprint = config_fingerprint({**cfg, "seed": seed, "W": tensor_digest(W_t), "data": tensor_digest(images),
                                      "base": tensor_digest(*[p.detach().cpu() for p in base.parameters()]),
                                      "delta": dict(delta.config), "null": null_class,
                                      "targets": None if targets is None else np.asarray(targets).tolist()})
    ckpt = Checkpointer(ckpt_dir, fingerprint, total=cfg["steps"], every=cfg["checkpoint_every"],
                        names=("delta", "ema") if ema_decay else ("delta",), is_main=accelerator.is_main_process)
    # the EMA starts at δ's (zero-output) initialisation, or at the checkpoint's
    ema = [p.detach().float().clone() for p in delta.parameters()] if ema_decay else None

    history = LossHistory()

    def restore(weights, state):
        nonlocal ema, history
        delta.load_state_dict(weights["delta"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        if ema is not None:
            ema = [weights["ema"][name].float().clone() for name, _ in delta.named_parameters()]
        history = LossHistory.from_state(state)

    start = ckpt.resume(restore)
    if ckpt.path is not None:
        accelerator.print(f"resuming from {ckpt.path} (step {start})")
    if log is not None and accelerator.is_main_process:
        history.replay(log)  # a resumed run's metric history equals the uninterrupted run's
    delta, opt = accelerator.prepare(delta, opt)
    base.to(accelerator.device)
    total, batch = cfg["steps"], cfg["batch_size"]
    rank, world = accelerator.process_index, accelerator.num_processes
    T = scheduler.config.num_train_timesteps
    t_lo, t_hi = cfg.get("train_timesteps") or (0, T)  # δ trained where the attribute is decided (docs/methods.md)
    if not 0 <= t_lo < t_hi <= T:
        raise UserError(f"invdiff.train_timesteps: expected [lo, hi) within [0, {T}] (the model's training "
                        f"timesteps), got {[t_lo, t_hi]}")
    bar = tqdm(range(start, total), initial=start, total=total, desc="finetune_guidance",
               disable=not (progress and accelerator.is_local_main_process))
    delta.train()
    for step in bar:
        # the same global batch on every process, each keeps its slice (as in train_diffusion)
        drawn = None
        if sampler is not None:
            idx, drawn = sampler.draw(batch, gen)
        elif cfg["balanced"]:
            idx = balanced_indices(W_t, batch, gen)
        else:
            idx = torch.randint(0, len(images), (batch,), generator=gen)
        if cfg["balanced"] and cfg.get("paired", False):
            noise, t = paired_draws(W.shape[1], batch, images.shape[1:], (t_lo, t_hi), gen)
        else:
            noise = torch.randn((batch, *images.shape[1:]), generator=gen)
            t = torch.randint(t_lo, t_hi, (batch,), generator=gen)
        drop = torch.rand(batch, generator=gen) < cfg["label_dropout"]
        sl = slice(rank, None, world)
        idx, noise, t, drop = idx[sl], noise[sl], t[sl], drop[sl]
        drawn = None if drawn is None else drawn[sl]
        dev = accelerator.device
        x0, noise, t = images[idx].to(dev), noise.to(dev), t.to(dev)
        c = cond.select(idx, dev)
        if null_class is not None and c.class_labels is not None:
            c.class_labels = torch.where(drop.to(dev), torch.full_like(c.class_labels, null_class), c.class_labels)
        x_t = scheduler.add_noise(x0, noise, t)
        target = training_target(scheduler, x0, noise, t)
        with accelerator.autocast():
            with torch.no_grad():
                f_base = call_unet(base, x_t, t, c).float()
            pred = f_base + call_unet(delta, x_t, t, c).float()
        per_sample = (pred - target.float()).pow(2).mean(dim=(1, 2, 3))
        if drawn is None:
            loss, L = group_loss(per_sample, W_t[idx].to(dev), cfg["lam"])
        else:
            loss, L = drawn_group_loss(per_sample, drawn.to(dev), W.shape[1], cfg["lam"])
        check_finite(loss, "finetune_guidance", step, "lower invdiff.lr or invdiff.lam")
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(delta.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = cfg["lr"] * lr_factor(step, total, schedule, warmup)
        opt.step()
        if ema is not None:
            ema_update(ema, accelerator.unwrap_model(delta).parameters(), ema_decay)
        history.add(accelerator.gather(loss.detach()[None]).mean().item(),
                    L.detach().cpu().numpy() if len(L) == W.shape[1] else None)
        if (step + 1) % 50 == 0 or step + 1 == total:
            metrics = history.close_window(step + 1)
            bar.set_postfix(loss=f"{metrics['train_loss']:.4f}")
            if log is not None and accelerator.is_main_process:
                log(step + 1, metrics)
        if ckpt.due(step + 1):
            inner = accelerator.unwrap_model(delta)
            extra = {} if ema is None else {"ema": {n: e for (n, _), e in zip(inner.named_parameters(), ema,
                                                                             strict=True)}}
            ckpt.save(step + 1, weights={"delta": inner.state_dict(), **extra},
                      state={"optimizer": opt.state_dict(), "data_rng": gen.get_state(),
                             "torch_rng": torch.get_rng_state(), **history.state()})
    bar.close()
    final = accelerator.unwrap_model(delta).eval()
    if ema is not None:  # the saved δ is the EMA
        with torch.no_grad():
            for p, e in zip(final.parameters(), ema, strict=True):
                p.copy_(e.to(p.dtype))
    if accelerator.is_main_process:
        with atomic_path(out_dir) as tmp:
            final.save_pretrained(tmp)
    accelerator.wait_for_everyone()
    final_loss = history.points[-1][1] if history.points else float("nan")
    return FinetuneResult(steps=total, resumed_from=start, final_loss=final_loss,
                          delta_params=count_params(final), base_params=count_params(base), losses=history.points,
                          group_losses=history.group_points)


# ----------------------------------------------------------------------------------------------------------------
# sampling


class InvDiffHooks(SamplerHooks):
    """model_output: f ← f_θ + r·δ on the whole U-Net batch (conditional and null halves alike), at the steps whose
    timestep lies in `timesteps` = [lo, hi) (δ's training range; None: every step)."""

    def __init__(self, delta, strength: float, timesteps: tuple[int, int] | None = None):
        self.delta, self.strength = delta, float(strength)
        self.timesteps = None if timesteps is None else (int(timesteps[0]), int(timesteps[1]))

    def model_output(self, out: torch.Tensor, x_t: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if self.strength == 0.0:
            return out
        if self.timesteps is not None and not self.timesteps[0] <= ctx.timestep < self.timesteps[1]:
            return out
        t = torch.full((len(x_t),), ctx.timestep, dtype=torch.long, device=x_t.device)
        with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=x_t.device.type == "cuda"):
            d = self.delta(x_t, t, **ctx.unet_kwargs).sample.float()
        return out + self.strength * d
