"""The one sampler: DDIM/DDPM over diffusers schedulers, classifier-free guidance, per-sample seeds, hooks.

Methods never copy this loop; they subclass `SamplerHooks` (guided-diffusion's cond_fn habit) and
override what they need:
    initial_noise(z_T, ctx)          z_T ← f(z_T)            e.g. Latent Directions: z_T + w·d_a
    mid_block(h, ctx)                h ← f(h)                e.g. Distribution Guidance: h − s·∇_h L
                                     (h: output of the U-Net submodule `h_module`, the mid block by default)
    model_output(out, x_t, ctx)      f_θ ← f(f_θ)            e.g. InvDiff: mix of f_θ and δ
    needs_input_grad(ctx)            True: that step's U-Net call runs with autograd on, so model_output may take
                                     ∇_{x_t} of anything read inside it (Distribution Guidance in x-space)
`model_output` sees the U-Net's raw output in its own parameterisation (ε or v), on the full batch fed
to the U-Net (conditional and, with guidance, unconditional halves; ctx.labels tells which is which),
before the guidance combination.

The call takes the model, in the diffusers habit: `sample(model, cond, seeds, settings, hooks=…)` with `model` a
pipeline.pretrained.DiffusionModel (U-Net, training scheduler config, null class, conditioning, VAE) and
`settings` a SamplerSettings (scheduler kind and spacing, steps, guidance scale, η, batch size).
Conditioning: hooks speak class indices (ctx.labels, ∅ = model.null_class). `model.conditioning`
(pipeline/conditioning.py) turns them into the U-Net's keyword arguments (ctx.unet_kwargs): class_labels=y by
default, or the text-encoder states of class y's prompt (∅ = the empty prompt) for a text-conditioned U-Net. A module
that evaluates a U-Net of the same kind (InvDiff's δ) calls it with **ctx.unet_kwargs.
Latent diffusion: with a VAE, x_t lives in the VAE's latent space (scaled by vae.config.scaling_factor) and
every hook sees latents; only the final x_0 is decoded to images, model.decode: D(x_0 / scaling_factor).

One step, with w the guidance scale (the hooks' own `guidance_scale` when a method sets one, else the settings')
and ∅ the null class:
    (1) f = f_θ(x_t, t, [y; ∅])                    (hooks: mid_block inside, model_output after)
    (2) f̃ = f_∅ + w·(f_y − f_∅)                    (skipped when w = 1)
    (3) x_{t−1} = scheduler.step(f̃, t, x_t)        (DDIM with η, or DDPM ancestral)
Seeding: sample i draws its initial noise and every per-step noise from its own generator seeded with
seeds[i], so sample i is the same whatever the batch size or position.
DDIM inversion (`invert`, docs/methods.md "DDIM inversion"): the same steps run backwards with η = 0, same
conditioning, guidance and hooks (one shared model call, `_model_call`). Sampling step i maps level τ_i to τ_{i+1}
(τ_S = the clean image, ᾱ = final_alpha_cumprod) with f(x_{τ_i}, τ_i); inversion step i maps x_{τ_{i+1}} to
    x_{τ_i} = √ᾱ_{τ_i}·x̂_0 + √(1 − ᾱ_{τ_i})·ε̂,   (x̂_0, ε̂) from f(x_{τ_{i+1}}, τ_i)
i.e. the one approximation of DDIM inversion, ε(x_{τ_i}) ≈ ε(x_{τ_{i+1}}); steps run i = S−1 … 0.
A hook whose edit couples samples (Distribution Guidance: a batch statistic) sets `batch_multiple`; batches are
then a multiple of it (the batch size is rounded down, to at least one multiple), so no group is ever split.
"""

from __future__ import annotations

import inspect
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.errors import UserError


@dataclass
class StepContext:
    """What a hook knows about the current call. labels: the classes fed to the U-Net (null = ∅)."""

    step_index: int  # 0 .. num_steps − 1; −1 for initial_noise
    num_steps: int
    timestep: int
    labels: torch.Tensor
    null_class: int
    sample_ids: torch.Tensor  # index of each conditional sample in the run
    unet_kwargs: dict = field(default_factory=dict)  # what the U-Net is called with besides (x_t, t)
    alpha_bar: float | None = None  # ᾱ of the training schedule at `timestep` (None: not told)
    prediction_type: str = "epsilon"  # the U-Net output's parameterisation: epsilon | v_prediction | sample


class SamplerHooks:
    """Identity hooks. Subclasses override any subset."""

    batch_multiple: int = 1  # batches hold whole blocks of this many consecutive samples
    h_module: str = "mid_block"  # the U-Net submodule whose output mid_block() sees and edits (h-space)
    guidance_scale: float | None = None  # a method's own classifier-free guidance w (None: the settings')

    def initial_noise(self, z: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return z

    def mid_block(self, h: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return h

    def model_output(self, out: torch.Tensor, x_t: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return out

    def guidance_for(self, settings_scale: float) -> float:
        """The classifier-free guidance scale w a run with these hooks samples at: their own, else the settings'."""
        return settings_scale if self.guidance_scale is None else self.guidance_scale

    def needs_input_grad(self, ctx: StepContext) -> bool:
        """True at a step whose model_output takes a gradient with respect to the U-Net's input x_t: the sampler
        then runs that U-Net call with autograd on (x_t requiring grad) and hands model_output the same x_t."""
        return False

    def _overrides(self, name: str) -> bool:
        return getattr(type(self), name) is not getattr(SamplerHooks, name)


def sample_seeds(base_seed: int, n: int, offset: int = 0) -> np.ndarray:
    """Seed of sample i = first word of SeedSequence([base_seed, i]) (independent streams, no overlap
    between runs with neighbouring base seeds)."""
    return np.array([np.random.SeedSequence([base_seed, i]).generate_state(1, np.uint64)[0] >> np.uint64(1)
                     for i in range(offset, offset + n)], dtype=np.int64)


def make_scheduler(train_config: dict, kind: str = "ddim", timestep_spacing: str = "trailing"):
    """A sampling scheduler built from the training scheduler's config."""
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = DDIMScheduler if kind == "ddim" else DDPMScheduler
    cfg = {k: v for k, v in train_config.items() if not k.startswith("_")}
    return cls.from_config(cfg, timestep_spacing=timestep_spacing, clip_sample=False)


def available_memory() -> int:
    """Bytes the OS could hand out now (MemAvailable; all physical memory where /proc is absent)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(n: int, bytes_each: int, what: str) -> None:
    """Refuse, before allocating, `n` items of `bytes_each` bytes that cannot fit in the memory available."""
    need, have = n * bytes_each, available_memory()
    if need > have:
        raise UserError(f"{what}: {n} samples need {need / 2**30:.1f} GiB, more than the {have / 2**30:.1f} GiB of "
                        "memory available; lower it")


@dataclass(frozen=True)
class SamplerSettings:
    """How to sample (what diffusers spreads over a pipeline's __call__ arguments): the scheduler (`scheduler`:
    ddim | ddpm, with `timestep_spacing`) built from the model's training scheduler config, S steps, guidance
    scale w, DDIM's η, images per batch; autocast None = bf16 on CUDA only."""

    num_inference_steps: int = 25
    guidance_scale: float = 1.0
    eta: float = 0.0
    batch_size: int = 256
    scheduler: str = "ddim"
    timestep_spacing: str = "trailing"
    autocast: bool | None = None

    @classmethod
    def from_params(cls, p, **overrides) -> SamplerSettings:
        """From the `sample` params section; `overrides` replace single fields (e.g. Diffusing DeBias's w)."""
        fields = {k: getattr(p, k) for k in ("num_inference_steps", "guidance_scale", "eta", "batch_size",
                                             "scheduler", "timestep_spacing")}
        return cls(**{**fields, **overrides})

    def make_scheduler(self, model):
        """A fresh sampling scheduler for `model` (its training scheduler's config)."""
        return make_scheduler(model.scheduler_config, self.scheduler, self.timestep_spacing)


@dataclass
class _Pass:
    """One sampler or inversion pass: what every batch and step shares."""

    model: object  # pipeline.pretrained.DiffusionModel (unet, scheduler_config, null_class, conditioning, vae)
    scheduler: object
    settings: SamplerSettings
    hooks: SamplerHooks
    device: torch.device
    autocast: bool
    state: dict = field(default_factory=dict)  # the current StepContext, for the h-space forward hook

    @property
    def guidance(self) -> float:
        return self.hooks.guidance_for(self.settings.guidance_scale)


def _start(model, settings, hooks, device) -> _Pass:
    settings = SamplerSettings() if settings is None else settings
    device = torch.device(model.device if device is None else device)
    autocast = device.type == "cuda" if settings.autocast is None else settings.autocast
    return _Pass(model, settings.make_scheduler(model), settings, hooks or SamplerHooks(), device, autocast)


@torch.no_grad()
def sample(model, cond: np.ndarray, seeds: np.ndarray, settings: SamplerSettings | None = None, *,
           hooks: SamplerHooks | None = None, device: str | torch.device | None = None, progress: bool = True,
           noise: torch.Tensor | None = None) -> torch.Tensor:
    """Generate len(cond) images of `model` (pipeline.pretrained.DiffusionModel: U-Net, scheduler config, null
    class, conditioning, VAE); returns float32 [N,C,H,W] in [-1, 1] on the CPU (decoded by the VAE of a latent
    model). device: None = the model's. noise: z_T [N, C, H, W] to start from instead of the seeded draw (e.g.
    `invert`'s output, to regenerate; hooks.initial_noise still applies)."""
    run = _start(model, settings, hooks, device)
    unet, vae, hooks = model.unet, model.vae, run.hooks
    size, channels = unet.config.sample_size, unet.config.in_channels
    size = (size, size) if isinstance(size, int) else tuple(size)  # (H, W)
    up = 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
    # float32 images, held twice (the batches and their concatenation)
    check_memory(len(cond), 2 * 4 * (channels if vae is None else 3) * size[0] * size[1] * up * up, "sampling")
    cond_t = torch.as_tensor(np.asarray(cond), dtype=torch.long)
    if noise is not None and tuple(noise.shape) != (len(cond_t), channels, *size):
        raise UserError(f"noise: expected shape {(len(cond_t), channels, *size)}, got {tuple(noise.shape)}")
    out = []
    with _h_hook(unet, hooks, run.state):
        bs = run.settings.batch_size
        batch_size = max(hooks.batch_multiple, bs // hooks.batch_multiple * hooks.batch_multiple)
        batches = range(0, len(cond_t), batch_size)
        total = len(batches) * run.settings.num_inference_steps
        with tqdm(total=total, desc="sample", disable=not progress, leave=False) as bar:
            for start in batches:
                ids = torch.arange(start, min(start + batch_size, len(cond_t)))
                gens = [torch.Generator().manual_seed(int(s)) for s in seeds[ids.numpy()]]
                z = None if noise is None else noise[ids]
                x = _sample_batch(run, cond_t[ids], ids, gens, z, bar)
                out.append(x.clamp(-1, 1).float().cpu() if vae is None else model.decode(x))
    if not out:
        return torch.empty(0, channels if vae is None else 3, *size)
    return torch.cat(out)


@contextmanager
def _h_hook(unet, hooks: SamplerHooks, state: dict):
    """Route the output of the U-Net submodule hooks.h_module through hooks.mid_block while inside."""
    handle = None
    if hooks._overrides("mid_block"):
        try:
            module = unet.get_submodule(hooks.h_module)
        except AttributeError:
            raise UserError(f"h_module {hooks.h_module!r}: the U-Net has no such submodule") from None
        handle = module.register_forward_hook(lambda m, i, o: hooks.mid_block(o, state["ctx"]))
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def _model_call(run: _Pass, x, t, ctx: StepContext):
    """Steps (1)–(2) of the module docstring: the guided model output f̃ at (x, t), hooks applied."""
    run.state["ctx"] = ctx
    w = run.guidance
    x_in = torch.cat([x, x]) if w != 1.0 else x
    grad = run.hooks.needs_input_grad(ctx)
    if grad:
        x_in = x_in.detach().requires_grad_(True)
    with torch.set_grad_enabled(grad):
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.autocast):
            f = run.model.unet(x_in, t.to(run.device), **ctx.unet_kwargs).sample.float()
        f = run.hooks.model_output(f, x_in, ctx)
    f = f.detach()
    if w != 1.0:  # (2)
        f_cond, f_null = f.chunk(2)
        f = f_null + w * (f_cond - f_null)
    return f


def _labels(run: _Pass, y):
    """The U-Net's labels for a batch ([y; ∅] under guidance) and its keyword arguments for them."""
    null = run.model.null_class
    labels = (torch.cat([y, torch.full_like(y, null)]) if run.guidance != 1.0 else y).to(run.device)
    return labels, run.model.conditioning.with_labels(labels).unet_kwargs()


def _sample_batch(run: _Pass, y, ids, gens, noise, bar):
    from diffusers.utils.torch_utils import randn_tensor

    scheduler, num_steps, null = run.scheduler, run.settings.num_inference_steps, run.model.null_class
    n, c = len(y), run.model.unet.config.in_channels
    size = run.model.unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    scheduler.set_timesteps(num_steps)
    labels, kwargs = _labels(run, y)
    kind = scheduler.config.get("prediction_type", "epsilon")
    acp = scheduler.alphas_cumprod
    ctx = StepContext(-1, num_steps, int(scheduler.timesteps[0]), labels, null, ids, kwargs,
                      float(acp[int(scheduler.timesteps[0])]), kind)
    if noise is None:
        # CPU draws keep the noise identical across devices; list of generators = one stream per sample.
        x = randn_tensor((n, c, *size), generator=gens, device=torch.device("cpu")).to(run.device)
        x = x * scheduler.init_noise_sigma
    else:
        x = noise.to(run.device, torch.float32)
    x = run.hooks.initial_noise(x, ctx)
    step_kwargs = {"eta": run.settings.eta} if "eta" in inspect.signature(scheduler.step).parameters else {}
    for i, t in enumerate(scheduler.timesteps):
        ctx = StepContext(i, num_steps, int(t), labels, null, ids, kwargs, float(acp[int(t)]), kind)
        f = _model_call(run, scheduler.scale_model_input(x, t), t, ctx)
        # (3) stochastic steps (DDPM, DDIM with η > 0) draw from the per-sample generators.
        x = scheduler.step(f, t, x, generator=gens, **step_kwargs).prev_sample
        bar.update()
    return x


def shift_noise(f: torch.Tensor, delta: torch.Tensor, alpha_bar: float, kind: str) -> torch.Tensor:
    """The model output whose ε̂ at the same x_t is ε̂ + Δ, in the output's parameterisation (ᾱ = alpha_bar):
    epsilon: f + Δ;  v_prediction (ε̂ = √ᾱ·v + √(1−ᾱ)·x_t): f + Δ/√ᾱ;  sample (x̂_0): f − √(1−ᾱ)·Δ/√ᾱ.
    x̂_0 moves by −√(1−ᾱ)·Δ/√ᾱ in every case, as (x_t − √(1−ᾱ)·ε̂)/√ᾱ requires."""
    a = torch.as_tensor(alpha_bar, dtype=f.dtype, device=f.device)
    if kind == "epsilon":
        return f + delta
    if kind == "v_prediction":
        return f + delta / a.sqrt()
    if kind == "sample":
        return f - (1 - a).sqrt() * delta / a.sqrt()
    raise UserError(f"unsupported prediction_type {kind!r} (expected epsilon, v_prediction or sample)")


def _x0_eps(f: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, kind: str):
    """(x̂_0, ε̂) from the model output f at x with ᾱ = alpha, in the model's parameterisation:
    epsilon: ε̂ = f, x̂_0 = (x − √(1−ᾱ)·f)/√ᾱ;  v_prediction: x̂_0 = √ᾱ·x − √(1−ᾱ)·f, ε̂ = √ᾱ·f + √(1−ᾱ)·x;
    sample: x̂_0 = f, ε̂ = (x − √ᾱ·f)/√(1−ᾱ)."""
    a, b = alpha.sqrt(), (1 - alpha).sqrt()
    if kind == "epsilon":
        return (x - b * f) / a, f
    if kind == "v_prediction":
        return a * x - b * f, a * f + b * x
    if kind == "sample":
        return f, (x - a * f) / b
    raise UserError(f"invert: unsupported prediction_type {kind!r} (expected epsilon, v_prediction or sample)")


@torch.no_grad()
def invert(model, images: torch.Tensor, cond: np.ndarray, settings: SamplerSettings | None = None, *,
           hooks: SamplerHooks | None = None, device: str | torch.device | None = None, progress: bool = True,
           keep_steps=()) -> tuple[torch.Tensor, dict]:
    """Deterministic DDIM inversion (η = 0) of images [N, C, H, W] in [-1, 1] under their classes `cond`: the
    sampler's own steps (the settings' scheduler timesteps, guidance; the model's conditioning; hooks) run backwards
    (module docstring). A latent model encodes the images first (model.encode) and inversion runs on the latents.
    Returns (z_T [N, C, h, w] float32 on the CPU — `sample(..., noise=z_T)` regenerates the images —, and
    {s: x at level τ_s [N, C·h·w]} for s in keep_steps, the x_t the sampler would see before step s; s = −1 is
    z_T). Hooks see step index i and timestep τ_i for the model call of inversion step i (mid_block records h
    along the inversion trajectory); initial_noise is not called."""
    run = _start(model, settings, hooks, device)
    scheduler, num_inference_steps, null_class = run.scheduler, run.settings.num_inference_steps, model.null_class
    x_all = model.encode(images) if model.vae is not None else images.float()
    cond_t = torch.as_tensor(np.asarray(cond), dtype=torch.long)
    if len(cond_t) != len(x_all):
        raise UserError(f"invert: {len(x_all)} images but {len(cond_t)} conditions")
    kind = scheduler.config.get("prediction_type", "epsilon")
    scheduler.set_timesteps(num_inference_steps)
    timesteps = list(scheduler.timesteps)
    acp = scheduler.alphas_cumprod.float()
    final = torch.as_tensor(float(getattr(scheduler, "final_alpha_cumprod", acp[0])))
    keep = {int(s) for s in keep_steps}
    z_out, kept = [], {s: [] for s in sorted(keep)}
    dev = run.device
    with _h_hook(model.unet, run.hooks, run.state):
        batches = range(0, len(cond_t), run.settings.batch_size)
        with tqdm(total=len(batches) * len(timesteps), desc="invert", disable=not progress, leave=False) as bar:
            for start in batches:
                ids = torch.arange(start, min(start + run.settings.batch_size, len(cond_t)))
                labels, kwargs = _labels(run, cond_t[ids])
                x = x_all[ids].to(dev)
                for i in reversed(range(len(timesteps))):
                    t = timesteps[i]
                    ctx = StepContext(i, len(timesteps), int(t), labels, null_class, ids, kwargs, float(acp[int(t)]),
                                      kind)
                    f = _model_call(run, scheduler.scale_model_input(x, t), t, ctx)
                    # x is at level τ_{i+1}: DDIMScheduler.step's previous timestep (ᾱ = final_alpha_cumprod below 0)
                    prev = int(t) - scheduler.config.num_train_timesteps // num_inference_steps
                    a_from = acp[prev] if prev >= 0 else final
                    x0, eps = _x0_eps(f, x, a_from.to(dev), kind)
                    a_to = acp[int(t)].to(dev)
                    x = a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps
                    if i in keep:
                        kept[i].append(x.flatten(1).float().cpu())
                    bar.update()
                z_out.append(x.float().cpu())
                if -1 in keep:
                    kept[-1].append(x.flatten(1).float().cpu())
    z = torch.cat(z_out) if z_out else torch.empty(0)
    return z, {s: torch.cat(v) for s, v in kept.items() if v}
