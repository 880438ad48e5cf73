"""Distribution Guidance ("Balancing Act", Parihar et al. 2024): steer the U-Net's h-space so that every batch
meets a target attribute distribution.

h_t is the output of the U-Net mid block at sampling step t (a forward hook; the decoder continues from it).

Fit (`fit_adp` stage): record h_t at every step, either along the DDIM inversion (pipeline/sampling.py `invert`)
of the attribute-balanced labelled split, each image under its own class, with the split's attribute labels
(distguide.fit_on: balanced — the published recipe: labelled, balanced image folders), or while sampling the biased
model, labelled by the attribute judge on the final image (samples: pseudo-labels); then train the
Attribute Distribution Predictor ADP_t(h) → attribute logits, one of
    linear:  ADP_t(h) = W_t·norm_t(h) + b_t + c_{t,y}            one probe per step
    mlp:     ADP_t(h) = V·SiLU(U·[norm_t(h); e_t]) + c_{t,y}       one small MLP conditioned on the step
with norm_t the per-step standardisation of the recorded h and c_{t,y} an optional per-class offset (y the class
condition). The offset absorbs the class prior: on a biased model class and attribute move together, and a probe
without it can predict "colour a" from the *digit shape* of class a — a direction that, followed at sampling,
changes the digit instead of the colour.

Guide (`DistributionGuidanceHooks`), at every step index in [start, end), for every guidance group B — the
samples of one class among a block of G consecutive samples of the run:
    (1) p̂ = (1/|B|) Σ_{i∈B} softmax(ADP_t(h_i) / τ)
    (2) L = |B|·Σ_k (p̂_k − p*_k)² / p*_k                      (p* the target, uniform by default)
    (3) h_i ← h_i − s·β_t^p·∇_{h_i} L                          (each h_i moves only by its own group's L)
with β_t the training noise schedule's beta at the step's timestep (published: 1.5·β_t^0.05, the 1.5 in s).
The factor |B| in (2) is ours: the published code guides fixed batches of one prompt, where it is a constant
(s_published = |B|·s); here a class's samples fall into blocks of unequal size (110 per class in blocks of 100
gives groups of 10 to 100), and without it a sample's step ∝ 2(p̂_k − p*_k)/(p*_k·|B|) would grow tenfold in the
small groups and differ between the validation, sweep and scored runs. With it the step of sample i,
2·Σ_k (p̂_k − p*_k)/p*_k·∇ softmax_k(ADP_t(h_i)/τ), does not depend on the group's size.
With classifier-free guidance the null-class half of the U-Net batch is left alone (the ADP is fitted on
conditional h), so the edit reaches the output scaled by the guidance scale w. `guidance_scale` sets the method's
own w (distguide.guidance_scale; None: sample.guidance_scale): the model's implicit classifier ∇ log p(y|x_t)
holds the digit while ∇L moves the colour (docs/methods.md). With s = 0 the hooks are off, w included: the
baseline sampler.

x-space (distguide.space: x, ours; docs/methods.md "Distribution Guidance in x-space"): the same ADP and loss, but
the gradient is taken with respect to the U-Net's input x_t, through the layers up to h, and applied as classifier
guidance (Dhariwal & Nichol 2021, −L in the role of log p):
    (3x) ε̃_i = ε̂_i + s·β_t^p·√(1−ᾱ_t)·∇_{x_t,i} L,  the sampler's step then runs from ε̃ (x̂_0 moves with it)
h itself is not edited. Measured on this project's model: an edit of h is mostly undone by the layers after it
within the step (benchmarks/method_diagnostics.py distguide), while a change of x_t is kept by the steps after it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.errors import UserError, one_line
from pipeline.sampling import SamplerHooks, StepContext, shift_noise
from pipeline.targets import target_distribution


def pool_h(h: torch.Tensor, pool: int, weights: str = "uniform") -> torch.Tensor:
    """h [N, C, H, W] → [N, C·pool·pool]: pooled to pool×pool cells per channel (pool 0: flattened as is).

    uniform:   f_{c,cell} = mean_{xy ∈ cell} h_{cxy}
    activity:  f_{c,cell} = Σ_{xy ∈ cell} m_{xy} h_{cxy} / Σ_{xy ∈ cell} m_{xy},  m_{xy} = ‖h_{:xy}‖₂ (held constant)
    With `activity` the guidance gradient ∂f/∂h_{cxy} ∝ m_{xy} lands where the features are active (the stroke,
    here) rather than spread evenly over the background too — measured: less background noise per unit of colour
    change (README, Distribution Guidance)."""
    if weights not in ("uniform", "activity"):
        raise UserError(f"distguide.pool_weights: unknown {weights!r} (expected uniform or activity)")
    if not pool:
        return h.flatten(1)
    n, c, hh, ww = h.shape
    if hh % pool or ww % pool:
        raise UserError(f"distguide.pool: {pool} must divide h's spatial size {hh}x{ww}")
    cells = (n, c, pool, hh // pool, pool, ww // pool)
    if weights == "uniform":
        return h.reshape(cells).mean(dim=(3, 5)).flatten(1)
    m = h.detach().norm(dim=1, keepdim=True).reshape(n, 1, *cells[2:])
    return ((h.reshape(cells) * m).sum(dim=(3, 5)) / m.sum(dim=(3, 5)).clamp_min(1e-12)).flatten(1)


class RecordH(SamplerHooks):
    """Records h_t (output of `module`, conditional half) at every sampling step as the probe's input features
    (pool_h), and the timesteps."""

    def __init__(self, module: str = "mid_block", pool: int = 0, pool_weights: str = "uniform"):
        self.h_module, self.pool, self.pool_weights = module, pool, pool_weights
        self.records: dict[int, list[torch.Tensor]] = {}
        self.timesteps: dict[int, int] = {}
        self.shape: tuple[int, ...] | None = None

    def mid_block(self, h, ctx: StepContext):
        self.shape = tuple(h.shape[1:])
        self.timesteps[ctx.step_index] = ctx.timestep
        self.records.setdefault(ctx.step_index, []).append(
            pool_h(h[: len(ctx.sample_ids)].detach().float(), self.pool, self.pool_weights).cpu().clone())
        return h

    def stacked(self) -> np.ndarray:
        """[S, N, D] float32, steps in sampling order."""
        return np.stack([torch.cat(self.records[s]).numpy() for s in sorted(self.records)])


class ADP(nn.Module):
    """Attribute Distribution Predictor over S sampling steps: logits [N, K] = forward(h [N, D], step, y [N])."""

    def __init__(self, kind: str, shape, num_attr: int, num_steps: int, num_classes: int, *,
                 hidden: int = 64, class_offset: bool = True, pool: int = 0, pool_weights: str = "uniform",
                 timesteps=(), module: str = "mid_block", betas=()):
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise UserError(f"distguide.adp: unknown kind {kind!r} (expected linear or mlp)")
        shape = tuple(int(v) for v in shape)  # h's [C, H, W]
        if pool and (shape[1] % pool or shape[2] % pool):
            raise UserError(f"distguide.pool: {pool} must divide h's spatial size {shape[1]}x{shape[2]}")
        in_dim = shape[0] * pool * pool if pool else int(np.prod(shape))
        self.config = {"kind": kind, "shape": list(shape), "num_attr": num_attr, "num_steps": num_steps,
                       "num_classes": num_classes, "hidden": hidden, "class_offset": class_offset, "pool": pool,
                       "pool_weights": pool_weights,
                       "timesteps": [int(t) for t in timesteps], "module": module,
                       "betas": [float(b) for b in betas]}  # β_t of the noise schedule at each step's timestep
        self.register_buffer("mean", torch.zeros(num_steps, in_dim))  # per-step standardisation of the features
        self.register_buffer("std", torch.ones(num_steps, in_dim))
        if kind == "linear":
            self.weight = nn.Parameter(torch.zeros(num_steps, num_attr, in_dim))
            self.bias = nn.Parameter(torch.zeros(num_steps, num_attr))
        else:
            self.step_embed = nn.Embedding(num_steps, 16)
            self.net = nn.Sequential(nn.Linear(in_dim + 16, hidden), nn.SiLU(), nn.Linear(hidden, num_attr))
        self.offset = nn.Parameter(torch.zeros(num_steps, num_classes, num_attr), requires_grad=class_offset)

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """Flattened h [N, C·H·W] → the probe's input: as is, or pooled to pool×pool per channel (pool_h)."""
        return pool_h(h.view(len(h), *self.config["shape"]), self.config["pool"], self.config["pool_weights"])

    def forward(self, h: torch.Tensor, step: int, y: torch.Tensor, pooled: bool = False) -> torch.Tensor:
        x = ((h if pooled else self.features(h)) - self.mean[step]) / self.std[step]
        if self.config["kind"] == "linear":
            logits = x @ self.weight[step].T + self.bias[step]
        else:
            e = self.step_embed.weight[step].expand(len(x), -1)
            logits = self.net(torch.cat([x, e], dim=1))
        if self.config["class_offset"]:
            logits = logits + self.offset[step][y]
        return logits

    def all_steps(self, h: torch.Tensor, y: torch.Tensor, pooled: bool = False) -> torch.Tensor:
        """Logits [S, N, K] for h [S, N, C·H·W] recorded at every step (or its `features`, with pooled)."""
        return torch.stack([self(h[s], s, y, pooled) for s in range(len(h))])


def train_adp(h: np.ndarray, attr: np.ndarray, cond: np.ndarray, *, kind: str, shape, num_attr: int,
              num_classes: int, timesteps, betas=(), module: str = "mid_block", hidden: int = 64,
              class_offset: bool = True,
              pool: int = 0, pool_weights: str = "uniform", epochs: int = 200, lr: float = 0.01,
              weight_decay: float = 1e-3, batch_size: int = 512, holdout: float = 0.2, seed: int = 0,
              progress: bool = True) -> tuple[ADP, dict]:
    """Fit the ADP by cross-entropy (AdamW, minibatches of samples, every step at once) on a (1 − holdout) split.

    h [S, N, F]: the probe's input features at every step (RecordH with the same `pool`; shape = h's [C, H, W]),
    attr [N] the judge's labels, cond [N] the classes. Returns the model and
    {accuracy [S], minority_accuracy [S]} on the held-out split; `minority` = samples whose label is not the most
    frequent label of their class (read from the pseudo-labels alone), where a class-prior guess scores 0."""
    attr, cond = np.asarray(attr), np.asarray(cond)
    num_steps, n, _ = h.shape
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_held = round(holdout * n)
    held, train = order[:n_held], order[n_held:]
    torch.manual_seed(seed)
    model = ADP(kind, shape, num_attr, num_steps, num_classes, hidden=hidden, class_offset=class_offset, pool=pool,
                pool_weights=pool_weights, timesteps=timesteps, module=module, betas=betas)
    x = torch.as_tensor(h, dtype=torch.float32)
    a, y = torch.as_tensor(attr, dtype=torch.long), torch.as_tensor(cond, dtype=torch.long)
    model.mean.copy_(x[:, train].mean(1))
    model.std.copy_(x[:, train].std(1).clamp_min(1e-4))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    train_t = torch.as_tensor(train)
    for _ in tqdm(range(epochs), desc=f"adp ({kind})", disable=not progress, leave=False):
        for idx in train_t[torch.randperm(len(train_t), generator=gen)].split(batch_size):
            logits = model.all_steps(x[:, idx], y[idx], pooled=True)
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), a[idx].repeat(num_steps))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return model, adp_accuracy(model, h[:, held], attr[held], cond[held], num_classes)


@torch.no_grad()
def adp_accuracy(model: ADP, h: np.ndarray, attr: np.ndarray, cond: np.ndarray, num_classes: int) -> dict:
    """Per-step accuracy from features h [S, N, F], and accuracy on the minority samples (label ≠ their class's
    most frequent label)."""
    if len(attr) == 0:
        nan = np.full(len(h), np.nan)
        return {"accuracy": nan, "minority_accuracy": nan}
    pred = model.all_steps(torch.as_tensor(h, dtype=torch.float32), torch.as_tensor(cond, dtype=torch.long),
                           pooled=True).argmax(-1).numpy()
    majority = np.array([np.bincount(attr[cond == c]).argmax() if (cond == c).any() else -1
                         for c in range(num_classes)])
    minority = attr != majority[cond]
    correct = pred == attr[None]
    return {"accuracy": correct.mean(1),
            "minority_accuracy": correct[:, minority].mean(1) if minority.any() else np.full(len(h), np.nan)}


def save_adp(model: ADP, path: str | Path, extra: dict | None = None) -> None:
    """One safetensors file; its metadata (one key, so the bytes are deterministic) holds the config."""
    from pipeline.io import save_state

    save_state(path, model.state_dict(), "adp", {"config": model.config, "extra": extra or {}})


def load_adp(path: str | Path, device: str | torch.device = "cpu") -> ADP:
    """Load an ADP; a missing, truncated or foreign file raises UserError naming the path."""
    from pipeline.io import read_state

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: ADP not found (run `dvc repro fit_adp`)")
    try:
        header, state = read_state(path, "adp")
        config = dict(header["config"])
        model = ADP(config.pop("kind"), config.pop("shape"), config.pop("num_attr"), config.pop("num_steps"),
                    config.pop("num_classes"), **config)
        model.load_state_dict(state)
    except Exception as exc:
        raise UserError(f"{path}: not a valid ADP file ({one_line(exc)})") from None
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval()


def guidance_loss(probs: torch.Tensor, groups: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Σ_groups n_g·Σ_k (p̂_gk − p*_k)² / p*_k with p̂_g the mean of `probs` [N, K] over the n_g rows of group g
    (module docstring (2): a row's gradient does not depend on its group's size)."""
    uniq, inv = torch.unique(groups, return_inverse=True)
    sums = torch.zeros(len(uniq), probs.shape[1], dtype=probs.dtype, device=probs.device).index_add(0, inv, probs)
    counts = torch.bincount(inv, minlength=len(uniq)).to(probs.dtype)
    p_hat = sums / counts[:, None]
    return (counts[:, None] * (p_hat - target) ** 2 / target).sum()


class DistributionGuidanceHooks(SamplerHooks):
    """At step indices in [start, end): h ← h − s·∇_h L (space h, module docstring (1)–(3)), or ε̂ moved by
    s·β_t^p·√(1−ᾱ_t)·∇_{x_t} L (space x, (3x)).

    Groups are blocks of `group_size` consecutive samples of the run, split by class; the sampler's batches
    are made a multiple of `group_size` (`batch_multiple`), so a block is never split and sample i is the
    same whatever the batch size. With s = 0 the hook returns h untouched (bit for bit the baseline)."""

    def __init__(self, adp: ADP, target, *, scale: float, tau: float = 1.0, steps=(0, None), group_size: int = 100,
                 beta_power: float = 0.0, space: str = "h", guidance_scale: float | None = None):
        if space not in ("h", "x"):
            raise UserError(f"distguide.space: unknown {space!r} (expected h or x)")
        self.guidance_scale = guidance_scale if scale else None  # s = 0: the baseline sampler, its w too
        self.adp, self.space = adp, space
        self._h: torch.Tensor | None = None  # x-space: h of the current call, still attached to x_t
        betas = adp.config.get("betas") or []
        if beta_power and len(betas) != adp.config["num_steps"]:
            raise UserError("distguide.beta_power: the ADP file holds no β_t per step (re-run fit_adp)")
        self.step_size = [float(scale) * (b ** beta_power if beta_power else 1.0)
                          for b in (betas or [1.0] * adp.config["num_steps"])]
        self.target = torch.as_tensor(validate_target(target, adp.config["num_attr"]), dtype=torch.float32)
        self.scale, self.tau = float(scale), float(tau)
        self.start, self.end = steps[0], steps[1]
        self.batch_multiple = int(group_size)
        self.h_module = adp.config["module"]  # edit h where the ADP read it

    def active(self, ctx: StepContext) -> bool:
        end = ctx.num_steps if self.end is None else self.end
        return self.scale != 0 and self.start <= ctx.step_index < end

    def needs_input_grad(self, ctx: StepContext) -> bool:
        return self.space == "x" and self.active(ctx)

    def _check_step(self, ctx: StepContext) -> None:
        timesteps = self.adp.config["timesteps"]
        if ctx.num_steps != len(timesteps) or timesteps[ctx.step_index] != ctx.timestep:
            raise UserError(f"distguide: the ADP was fitted on sampling timesteps {timesteps}, this run uses "
                            f"{ctx.num_steps} steps (timestep {ctx.timestep} at step {ctx.step_index}); "
                            "re-run fit_adp with the same sample.* settings")

    def _loss(self, h_cond: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """L of (1)–(2) for the conditional h [n, …] of the batch, each class's block of samples its own group."""
        n = len(ctx.sample_ids)
        y = ctx.labels[:n]
        groups = y.cpu() * (int(ctx.sample_ids.max()) + 1) + ctx.sample_ids // self.batch_multiple
        probs = torch.softmax(self.adp(h_cond.float().flatten(1), ctx.step_index, y) / self.tau, dim=1)
        return guidance_loss(probs, groups.to(h_cond.device), self.target.to(h_cond.device))

    def mid_block(self, h, ctx: StepContext):
        if not self.active(ctx):
            return h
        self._check_step(ctx)
        n = len(ctx.sample_ids)
        if self.space == "x":  # read only; model_output takes ∇_{x_t} through it
            self._h = h[:n]
            return h
        with torch.enable_grad():
            x = h[:n].detach().float().requires_grad_(True)
            (grad,) = torch.autograd.grad(self._loss(x, ctx), x)
        out = h.clone()
        out[:n] = (x.detach() - self.step_size[ctx.step_index] * grad).to(h.dtype)
        return out

    def model_output(self, out, x_t, ctx: StepContext):
        """x-space, (3x): ε̂ of the conditional half moved by s·β_t^p·√(1−ᾱ_t)·∇_{x_t} L."""
        if self.space != "x" or not self.active(ctx):
            return out
        h, self._h = self._h, None
        if h is None or not x_t.requires_grad:
            raise RuntimeError("distguide x-space: the sampler ran the U-Net without the input gradient")
        if ctx.alpha_bar is None:
            raise RuntimeError("distguide x-space: the sampler did not pass ᾱ_t")
        n = len(ctx.sample_ids)
        (grad,) = torch.autograd.grad(self._loss(h, ctx), x_t)
        delta = self.step_size[ctx.step_index] * (1.0 - ctx.alpha_bar) ** 0.5 * grad[:n].float()
        shifted = out.detach().clone()
        shifted[:n] = shift_noise(shifted[:n], delta, ctx.alpha_bar, ctx.prediction_type)
        return shifted


def validate_target(target, num_attr: int) -> np.ndarray:
    """p* as an array: None → uniform; otherwise K entries, each > 0, summing to 1 (pipeline/targets.py)."""
    return target_distribution(target, num_attr, "distguide.target")


def distribution_guidance_hooks(path, *, scale: float, tau: float, steps, group_size: int, target,
                                device: str | torch.device = "cpu", beta_power: float = 0.0, space: str = "h",
                                guidance_scale: float | None = None) -> DistributionGuidanceHooks:
    """Hooks from a fit_adp output file and the distguide knobs."""
    adp = load_adp(path, device)
    start, end = steps
    if end > adp.config["num_steps"]:
        raise UserError(f"distguide.steps: end {end} is past the {adp.config['num_steps']} sampling steps the ADP "
                        "was fitted on")
    return DistributionGuidanceHooks(adp, target, scale=scale, tau=tau, steps=(start, end), group_size=group_size,
                                     beta_power=beta_power, space=space, guidance_scale=guidance_scale)
