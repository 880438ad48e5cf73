"""Pre-trained diffusion models from a local diffusers directory, and the pipeline's own model directory.

`diffusion.pretrained` names one of (no download is ever attempted; every file must be there):
    latent pipeline   model_index.json (optional), unet/ (UNet2DConditionModel), vae/ (AutoencoderKL),
                      text_encoder/ (CLIPTextModel), tokenizer/ (CLIPTokenizer), scheduler/ (optional)
                      — what StableDiffusionPipeline.save_pretrained writes; conditioned by prompts
    pixel U-Net       unet/ (UNet2DModel with num_class_embeds = classes + 1, the last the null class) and an
                      optional scheduler/, as train_diffusion writes it; or a UNet2DModel directory itself
                      (config.json + weights); conditioned by class labels
train_diffusion adopts it (and optionally fine-tunes it) and writes the model directory every later stage reads:
    data/models/diffusion/  unet/, scheduler/, and for a latent model vae/ and prompts.safetensors (the
                            text-encoder states of each class's prompt and of the empty prompt, encoded once;
                            metadata: the prompts), so no later stage needs the text encoder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.conditioning import Conditioning
from pipeline.errors import UserError

LATENT_LAYOUT = "unet/, vae/, text_encoder/, tokenizer/ [, scheduler/] (StableDiffusionPipeline.save_pretrained)"
PIXEL_LAYOUT = "unet/ [+ scheduler/] holding a UNet2DModel, or a UNet2DModel directory (config.json + weights)"
PROMPTS = "prompts.safetensors"


@dataclass
class DiffusionModel:
    """A loaded diffusion model: the U-Net, its training scheduler's config, and for latent diffusion the VAE and
    the prompt table (text-encoder states [K + 1, seq, dim]; row K the empty prompt, the null class)."""

    unet: torch.nn.Module
    scheduler_config: dict
    vae: torch.nn.Module | None = None
    prompt_embeds: torch.Tensor | None = None
    prompts: tuple[str, ...] | None = None

    @property
    def null_class(self) -> int:
        """The null class ∅ (= the number of classes): the empty prompt's row, or the last class embedding."""
        if self.prompt_embeds is not None:
            return len(self.prompt_embeds) - 1
        n = getattr(self.unet.config, "num_class_embeds", None)
        if not n:
            raise UserError(f"{type(self.unet).__name__} has no class embeddings and no prompts: the pipeline needs "
                            "a class-conditional U-Net or a text-conditioned one with diffusion.prompt_template")
        return int(n) - 1

    @property
    def num_classes(self) -> int:
        return self.null_class

    @property
    def conditioning(self) -> Conditioning:
        """The sampler's conditioning: class labels, or class labels that index the prompt table."""
        return Conditioning(prompt_embeds=self.prompt_embeds)

    @property
    def device(self) -> torch.device:
        """Where the U-Net's weights are (the CPU for one without parameters)."""
        return next((p.device for p in self.unet.parameters()), torch.device("cpu"))

    def encode(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Scaled latents of images in [-1, 1] (encode_latents); a latent model only."""
        if self.vae is None:
            raise UserError("encode: a pixel-space model has no VAE (its images are what the U-Net denoises)")
        return encode_latents(self.vae, images, batch_size)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images float32 [N, 3, H, W] in [-1, 1] on the CPU from scaled latents (decode_latents)."""
        if self.vae is None:
            raise UserError("decode: a pixel-space model has no VAE (its samples are images already)")
        return decode_latents(self.vae, latents)

    def to_model_space(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """What the U-Net denoises: the images themselves, or their scaled VAE latents."""
        return images if self.vae is None else self.encode(images, batch_size)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images float32 [N, 3, H, W] in [-1, 1] on the CPU from scaled latents: D(z / scaling_factor)."""
    z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
    return vae.decode(z).sample.clamp(-1, 1).float().cpu()


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Scaled latents float32 [N, C, h, w] on the CPU of images in [-1, 1]: E(x).mean · scaling_factor (the
    posterior mean, so a dataset's latents are computed once, deterministically)."""
    out = [vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean.float().cpu()
           for x in images.split(batch_size)]
    return torch.cat(out) * vae.config.scaling_factor if out else torch.empty(0)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(exc).__name__


UNSAFE = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")  # weight formats read through pickle


def _require_safetensors(path: Path, what: str) -> None:
    """Weights are read from safetensors only: a directory holding only pickle-format weights (.bin, ...) is
    refused before from_pretrained would unpickle them (docs/bad-input.md says how to convert)."""
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return
    unsafe = sorted(p.name for pattern in UNSAFE for p in path.glob(pattern))
    if unsafe:
        raise UserError(f"{path}: the {what} weights are pickle files ({', '.join(unsafe[:3])}), which are never "
                        "loaded; convert them once with `python scripts/to_safetensors.py "
                        f"{path}` (or from_pretrained + save_pretrained(safe_serialization=True) in a trusted shell)")


def _load(cls, path: Path, what: str, **kw):
    if hasattr(cls, "save_pretrained") and not kw.pop("tokenizer", False):
        _require_safetensors(path, what)
        kw["use_safetensors"] = True
    try:
        return cls.from_pretrained(str(path), local_files_only=True, **kw)
    except Exception as exc:
        raise UserError(f"{path}: cannot load the {what} ({type(exc).__name__}: {_first_line(exc)})") from None


def _class_name(config_path: Path) -> str | None:
    try:
        return json.loads(config_path.read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise UserError(f"{config_path}: not a readable diffusers config ({_first_line(exc)})") from None


def _scheduler_config(path: Path) -> dict | None:
    cfg = path / "scheduler" / "scheduler_config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{cfg}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


@dataclass
class Pretrained:
    """What a pretrained directory holds (text encoder and tokenizer only for a latent pipeline)."""

    unet: torch.nn.Module
    scheduler_config: dict | None
    vae: torch.nn.Module | None = None
    text_encoder: torch.nn.Module | None = None
    tokenizer: object | None = None

    @property
    def latent(self) -> bool:
        return self.vae is not None

    def downsample(self) -> int:
        """Image size / latent size (1 in pixel space)."""
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)


def load_pretrained(path: str | Path) -> Pretrained:
    """Load a local diffusers directory (module docstring); anything missing or unreadable raises one UserError
    naming the path and the layout expected."""
    from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"diffusion.pretrained: {path}: no such directory (expected a diffusers directory: "
                        f"{LATENT_LAYOUT}; or {PIXEL_LAYOUT})")
    if (path / "vae").exists() or (path / "model_index.json").is_file():
        missing = [d for d in ("unet", "vae", "text_encoder", "tokenizer") if not (path / d).is_dir()]
        if missing:
            lacks = ", ".join(m + "/" for m in missing)
            raise UserError(f"diffusion.pretrained: {path}: a latent pipeline lacks {lacks} (expected {LATENT_LAYOUT})")
        try:
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError:
            raise UserError("diffusion.pretrained: a latent pipeline needs the `transformers` package "
                            "(`make setup` installs it)") from None
        name = _class_name(path / "unet" / "config.json") if (path / "unet" / "config.json").is_file() else None
        if name not in (None, "UNet2DConditionModel"):
            raise UserError(f"{path / 'unet'}: a latent pipeline's U-Net must be a UNet2DConditionModel, not {name}")
        unet = _load(UNet2DConditionModel, path / "unet", "U-Net (UNet2DConditionModel)")
        vae = _load(AutoencoderKL, path / "vae", "VAE (AutoencoderKL)")
        text_encoder = _load(CLIPTextModel, path / "text_encoder", "text encoder (CLIPTextModel)")
        tokenizer = _load(CLIPTokenizer, path / "tokenizer", "tokenizer (CLIPTokenizer)", tokenizer=True)
        if unet.config.in_channels != vae.config.latent_channels:
            raise UserError(f"diffusion.pretrained: {path}: the U-Net takes {unet.config.in_channels} channels, the "
                            f"VAE's latents have {vae.config.latent_channels}")
        if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
            raise UserError(f"diffusion.pretrained: {path}: the U-Net's cross_attention_dim "
                            f"{unet.config.cross_attention_dim} ≠ the text encoder's hidden_size "
                            f"{text_encoder.config.hidden_size}")
        return Pretrained(unet.eval(), _scheduler_config(path), vae.eval(), text_encoder.eval(), tokenizer)
    unet_dir = path / "unet" if (path / "unet").is_dir() else path
    config = unet_dir / "config.json"
    if not config.is_file():
        raise UserError(f"diffusion.pretrained: {path}: no unet/ and no config.json (expected a diffusers directory: "
                        f"{LATENT_LAYOUT}; or {PIXEL_LAYOUT})")
    name = _class_name(config)
    if name != "UNet2DModel":
        raise UserError(f"{config}: a {name} without vae/, text_encoder/ and tokenizer/ is not supported (expected "
                        f"{LATENT_LAYOUT}; or {PIXEL_LAYOUT})")
    unet = _load(UNet2DModel, unet_dir, "U-Net (UNet2DModel)")
    return Pretrained(unet.eval(), _scheduler_config(path))


def save_model_extras(out: Path, *, vae=None, prompt_embeds: torch.Tensor | None = None, prompts=None) -> None:
    """Write the VAE and the prompt table beside unet/ and scheduler/ in a model directory."""
    from safetensors.torch import save_file

    if vae is not None:
        vae.save_pretrained(out / "vae")
    if prompt_embeds is not None:
        save_file({"prompt_embeds": prompt_embeds.contiguous()}, str(out / PROMPTS),
                  metadata={"prompts": json.dumps(list(prompts))})


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> DiffusionModel:
    """The model train_diffusion wrote (module docstring); one-line UserError for anything missing or corrupt."""
    import diffusers

    model_dir = Path(model_dir)
    unet_dir, sched_cfg = model_dir / "unet", model_dir / "scheduler" / "scheduler_config.json"
    if not (unet_dir / "config.json").is_file() or not sched_cfg.is_file():
        raise UserError(f"{model_dir}: not a trained diffusion model (expected unet/ and scheduler/; "
                        "run `dvc repro train_diffusion`)")
    config = _scheduler_config(model_dir)
    name = _class_name(unet_dir / "config.json")
    if name not in ("UNet2DModel", "UNet2DConditionModel"):
        raise UserError(f"{unet_dir}: unknown U-Net class {name!r} (expected UNet2DModel or UNet2DConditionModel)")
    _require_safetensors(unet_dir, "diffusion model")
    try:
        unet = getattr(diffusers, name).from_pretrained(str(unet_dir), use_safetensors=True, local_files_only=True)
    except Exception as exc:
        raise UserError(f"{unet_dir}: cannot load the diffusion model ({_first_line(exc)})") from None
    model = DiffusionModel(unet.to(device).eval(), config)
    if (model_dir / "vae").exists():
        model.vae = _load(diffusers.AutoencoderKL, model_dir / "vae", "VAE (AutoencoderKL)").to(device).eval()
    if (model_dir / PROMPTS).exists():
        from safetensors import safe_open

        try:
            with safe_open(str(model_dir / PROMPTS), framework="pt") as f:
                model.prompt_embeds = f.get_tensor("prompt_embeds")
                model.prompts = tuple(json.loads(f.metadata()["prompts"]))
        except Exception as exc:
            raise UserError(f"{model_dir / PROMPTS}: not a valid prompt table ({_first_line(exc)})") from None
    if name == "UNet2DConditionModel" and model.prompt_embeds is None:
        raise UserError(f"{model_dir}: a text-conditioned U-Net without {PROMPTS}; run `dvc repro train_diffusion`")
    return model


@dataclass
class Adopted:
    """A pre-trained model made ready for train_diffusion on a prepared dataset."""

    unet: torch.nn.Module
    scheduler_config: dict | None
    conditioning: Conditioning
    vae: torch.nn.Module | None = None
    prompts: tuple[str, ...] | None = None

    def save_extra(self, out: Path) -> None:
        save_model_extras(out, vae=self.vae, prompt_embeds=self.conditioning.prompt_embeds, prompts=self.prompts)

    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        """What its U-Net is trained on: the images, or their scaled VAE latents."""
        return images if self.vae is None else encode_latents(self.vae, images)


def adopt_pretrained(path: str | Path, *, class_names, prompt_template: str | None, resolution: int,
                     device="cpu") -> Adopted:
    """Load `path` and check it fits the data: K classes (class embeddings K + 1, the last the null class; or one
    prompt per class from the template), image size = U-Net sample size × the VAE's downsampling. Prompts are
    encoded here, once."""
    from pipeline.conditioning import encode_prompts, fill_template

    pre = load_pretrained(path)
    k = len(class_names)
    if pre.latent and prompt_template is None:
        raise UserError(f"diffusion.prompt_template: {path} is a latent pipeline, conditioned by prompts; set a "
                        "template such as 'a photo of a {class}'")
    if not pre.latent and prompt_template is not None:
        raise UserError(f"diffusion.prompt_template: {path} holds a UNet2DModel (class labels, no text encoder); "
                        "set prompt_template: null")
    size = pre.unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    if size * pre.downsample() != resolution:
        extra = f" × VAE downsampling {pre.downsample()}" if pre.latent else ""
        raise UserError(f"diffusion.pretrained: {path}: U-Net sample_size {size}{extra} = {size * pre.downsample()}"
                        f" ≠ the prepared images' {resolution} (set data.resolution)")
    if pre.latent:
        prompts = tuple(fill_template(prompt_template, class_names))
        embeds = encode_prompts(pre.tokenizer, pre.text_encoder.to(device), list(prompts), device)
        return Adopted(pre.unet, pre.scheduler_config, Conditioning(prompt_embeds=embeds), pre.vae.to(device), prompts)
    n = pre.unet.config.get("num_class_embeds")
    if n != k + 1:
        raise UserError(f"diffusion.pretrained: {path}: the UNet2DModel has num_class_embeds {n}; the data has {k} "
                        f"classes, so {k + 1} are needed (the last is the null class of classifier-free guidance)")
    return Adopted(pre.unet, pre.scheduler_config, Conditioning())
