"""DDPM training of the class-conditional U-Net through accelerate, with EMA, checkpoints and resume.

Per step (Ho et al. 2020, with classifier-free label dropout, Ho & Salimans 2022):
    (1) x_0 ~ data, y ~ labels; y ← ∅ with probability p_drop
    (2) t ~ U{0..T−1}, ε ~ N(0, I)
    (3) x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε
    (4) target = ε (epsilon) | v = √ᾱ_t ε − √(1−ᾱ_t) x_0 (v_prediction) | x_0 (sample)
    (5) L = ‖f_θ(x_t, t, y) − target‖²
Every random draw comes from one CPU generator seeded by the run seed and saved in each checkpoint, so a
resumed run continues exactly where an uninterrupted one would have been.
Checkpoints (pipeline/checkpoints.py) hold model.safetensors, ema.safetensors and state.pt (optimizer + RNG).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipeline.checkpoints import Checkpointer, LossHistory, check_finite, config_fingerprint, tensor_digest
from pipeline.conditioning import Conditioning
from pipeline.errors import UserError
from pipeline.io import atomic_path


def build_unet(*, resolution: int, num_classes: int, block_out_channels, layers_per_block: int, attention: bool):
    """Class-conditional diffusers UNet2DModel; class index `num_classes` is the null (unconditional) class."""
    from diffusers import UNet2DModel

    n = len(block_out_channels)
    if resolution % (2 ** (n - 1)):
        raise UserError(f"diffusion.block_out_channels: {n} levels need data.resolution divisible by {2 ** (n - 1)}")
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=resolution, in_channels=3, out_channels=3,
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        down_block_types=tuple(down), up_block_types=tuple(up),
        num_class_embeds=num_classes + 1, norm_num_groups=8, attention_head_dim=8,
    )


def null_class(unet) -> int:
    """The null-class index of a model built by build_unet (the last class embedding)."""
    return int(unet.config.num_class_embeds) - 1


def resolve_mixed_precision(setting: str) -> str:
    """'auto' → bf16 autocast on CUDA, fp32 on CPU."""
    if setting == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return setting


def make_noise_scheduler(num_train_timesteps: int, beta_schedule: str, prediction_type: str):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                         prediction_type=prediction_type, clip_sample=False)


def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Step (4): the regression target for the scheduler's prediction type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return x0


def foreach_ema(parameters, **kwargs):
    """diffusers' EMAModel whose step s ← s − (1 − d)·(s − θ) runs as three foreach ops over all parameters.
    Bit for bit the arithmetic of EMAModel's per-parameter loop (the same three element-wise ops, each rounded
    alike; `tests/test_diffusion.py`), without that loop's Python work per parameter (≈ 0.7 ms of a CPU step).
    diffusers' own `foreach=True` fuses the last two ops and so differs in the last bit. (Without EMAModel's
    DeepSpeed ZeRO-3 gathering, which this project does not use.)"""
    from diffusers.training_utils import EMAModel

    class ForeachEMA(EMAModel):
        @torch.no_grad()
        def step(self, parameters):
            parameters = list(parameters)
            self.optimization_step += 1
            decay = self.get_decay(self.optimization_step)
            self.cur_decay_value = decay
            pairs = [(s, p) for s, p in zip(self.shadow_params, parameters, strict=True) if p.requires_grad]
            for s, p in zip(self.shadow_params, parameters, strict=True):
                if not p.requires_grad:
                    s.copy_(p)
            if pairs:
                shadow = [s for s, _ in pairs]
                diff = torch._foreach_sub(shadow, [p for _, p in pairs])
                torch._foreach_mul_(diff, 1 - decay)
                torch._foreach_sub_(shadow, diff)

    return ForeachEMA(parameters, **kwargs)


def adamw(parameters, lr: float):
    """AdamW (weight decay 0) with its multi-tensor (foreach) implementation: on CUDA the default already, on
    the CPU bit for bit the per-parameter one (`tests/test_diffusion.py`) at ≈ 0.8× its optimiser-step time.
    Not the fused kernel: faster still, but it changes the last bits and with them every published figure."""
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0, foreach=True)


def optimisers(unet, cfg: dict):
    """(EMA of the weights, AdamW, linear LR warm-up over cfg["warmup_steps"]) for the `diffusion` params."""
    ema = foreach_ema(unet.parameters(), decay=cfg["ema_decay"], use_ema_warmup=True)
    opt = adamw(unet.parameters(), cfg["lr"])
    warmup = max(1, cfg["warmup_steps"])
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    return ema, opt, lr_sched


def train_step(unet, opt, lr_sched, ema, scheduler, images: torch.Tensor, classes: torch.Tensor,
               gen: torch.Generator, *, batch: int, label_dropout: float, null: int, conditioning: Conditioning,
               accelerator, step: int) -> torch.Tensor:
    """One optimisation step, (1)–(5) of the module docstring, then AdamW, the LR schedule and the EMA;
    returns the detached loss (benchmarks/throughput.py times exactly this against a plain diffusers loop)."""
    # Every process draws the same global batch and keeps its own slice: the result does not depend on
    # the number of processes (gradients are averaged across them by accelerate).
    idx = torch.randint(0, len(images), (batch,), generator=gen)
    noise = torch.randn((batch, *images.shape[1:]), generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
    drop = torch.rand(batch, generator=gen) < label_dropout
    sl = slice(accelerator.process_index, None, accelerator.num_processes)
    x0 = images[idx][sl].to(accelerator.device)
    noise, t = noise[sl].to(accelerator.device), t[sl].to(accelerator.device)
    y = torch.where(drop, torch.full_like(classes[idx], null), classes[idx])[sl].to(accelerator.device)
    x_t = scheduler.add_noise(x0, noise, t)
    target = training_target(scheduler, x0, noise, t)
    with accelerator.autocast():
        pred = unet(x_t, t, **conditioning.with_labels(y).unet_kwargs()).sample
    loss = F.mse_loss(pred.float(), target.float())
    check_finite(loss, "train_diffusion", step, "lower diffusion.lr")
    opt.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    lr_sched.step()
    ema.step(accelerator.unwrap_model(unet).parameters())
    return loss.detach()


@dataclass
class TrainResult:
    steps: int
    resumed_from: int
    final_loss: float | None
    num_params: int
    losses: list[tuple[int, float]] = field(default_factory=list)


def train_diffusion(images: torch.Tensor, classes: torch.Tensor, *, num_classes: int, cfg: dict, seed: int,
                    out_dir: Path, ckpt_dir: Path, accelerator=None, log=None, unet=None,
                    conditioning: Conditioning | None = None, scheduler_config: dict | None = None,
                    save_extra=None) -> TrainResult:
    """Train and write the EMA model to out_dir/{unet,scheduler} via save_pretrained.

    images: float [N,C,H,W] (images in [-1,1], or a VAE's scaled latents); classes: int64 [N].
    cfg: the `diffusion` params as a dict. `log(step, {"loss": ...})` is called every 50 steps (the stage
    forwards it to MLflow). Fine-tuning a pre-trained model: `unet` (used instead of a new build_unet; 0 steps
    adopt it as it is), `scheduler_config` (its training scheduler; None: from cfg), `conditioning` (how class
    labels reach it: class_labels, or a prompt table whose row num_classes is the empty prompt = the null class of
    label dropout); `save_extra(dir)` writes whatever else the model directory needs (the VAE, the prompts).
    """
    from accelerate import Accelerator
    accelerator = accelerator or Accelerator(mixed_precision=resolve_mixed_precision(cfg["mixed_precision"]))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    conditioning = Conditioning() if conditioning is None else conditioning
    if unet is None:
        unet = build_unet(resolution=images.shape[-1], num_classes=num_classes,
                          block_out_channels=cfg["block_out_channels"], layers_per_block=cfg["layers_per_block"],
                          attention=cfg["attention"])
    ema, opt, lr_sched = optimisers(unet, cfg)
    if scheduler_config is None:
        scheduler = make_noise_scheduler(cfg["num_train_timesteps"], cfg["beta_schedule"], cfg["prediction_type"])
    else:
        from diffusers import DDPMScheduler

        sched = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
        scheduler = DDPMScheduler.from_config(sched)
    null = num_classes if conditioning.prompt_embeds is not None else null_class(unet)

    extra = {} if conditioning.prompt_embeds is None else {"prompts": tensor_digest(conditioning.prompt_embeds)}
    # unset pre-training knobs are left out, so checkpoints made before they existed still resume
    cfg_fp = {k: v for k, v in cfg.items() if not (k in ("pretrained", "prompt_template") and v is None)}
    fingerprint = config_fingerprint({**cfg_fp, "seed": seed, "num_classes": num_classes,
                                      "data": tensor_digest(images, classes), **extra})
    ckpt = Checkpointer(ckpt_dir, fingerprint, total=cfg["train_steps"], every=cfg["checkpoint_every"],
                        names=("model", "ema"), is_main=accelerator.is_main_process)

    history = LossHistory()

    def restore(weights, state):
        nonlocal history
        unet.load_state_dict(weights["model"])
        for i, p in enumerate(ema.shadow_params):
            p.data.copy_(weights["ema"][f"p{i}"])
        ema.optimization_step = int(state["ema_step"])
        opt.load_state_dict(state["optimizer"])
        lr_sched.load_state_dict(state["lr_scheduler"])
        gen.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        history = LossHistory.from_state(state)

    start = ckpt.resume(restore)
    if ckpt.path is not None:
        accelerator.print(f"resuming from {ckpt.path} (step {start})")
    if log is not None and accelerator.is_main_process:
        history.replay(log)  # a resumed run's metric history equals the uninterrupted run's
    unet, opt = accelerator.prepare(unet, opt)
    ema.to(accelerator.device)

    total, batch = cfg["train_steps"], cfg["batch_size"]
    bar = tqdm(range(start, total), initial=start, total=total, desc="train_diffusion",
               disable=not accelerator.is_local_main_process)
    unet.train()
    for step in bar:
        loss = train_step(unet, opt, lr_sched, ema, scheduler, images, classes, gen, batch=batch,
                          label_dropout=cfg["label_dropout"], null=null, conditioning=conditioning,
                          accelerator=accelerator, step=step)
        history.add(accelerator.gather(loss[None]).mean().item())
        if (step + 1) % 50 == 0 or step + 1 == total:
            metrics = history.close_window(step + 1)
            bar.set_postfix(loss=f"{metrics['train_loss']:.4f}")
            if log is not None and accelerator.is_main_process:
                log(step + 1, metrics)
        if ckpt.due(step + 1):
            ckpt.save(step + 1, weights={
                "model": accelerator.unwrap_model(unet).state_dict(),
                "ema": {f"p{i}": p for i, p in enumerate(ema.shadow_params)},
            }, state={"optimizer": opt.state_dict(), "lr_scheduler": lr_sched.state_dict(),
                      "data_rng": gen.get_state(), "torch_rng": torch.get_rng_state(),
                      "ema_step": torch.tensor(ema.optimization_step), **history.state()})
    bar.close()

    final = accelerator.unwrap_model(unet)
    if accelerator.is_main_process:
        ema.copy_to(final.parameters())
        with atomic_path(out_dir) as tmp:
            final.save_pretrained(tmp / "unet")
            scheduler.save_pretrained(tmp / "scheduler")
            if save_extra is not None:
                save_extra(tmp)
    accelerator.wait_for_everyone()
    last = history.points[-1][1] if history.points else None  # None: 0 steps (a pre-trained model adopted as is)
    n_params = sum(p.numel() for p in final.parameters())
    return TrainResult(steps=total, resumed_from=start, final_loss=last, num_params=n_params, losses=history.points)


def load_diffusion(model_dir: str | Path, device: str | torch.device = "cpu"):
    """(unet in eval mode, scheduler config dict) from a train_diffusion output directory
    (pipeline.pretrained.load_model gives the whole model: VAE and prompts too)."""
    from pipeline.pretrained import load_model

    model = load_model(model_dir, device)
    return model.unet, model.scheduler_config
