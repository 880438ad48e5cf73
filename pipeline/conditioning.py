"""What a U-Net is conditioned on, and the prompts of a text-conditioned model.

Two kinds of condition reach a diffusers U-Net:
    class labels          unet(x, t, class_labels=y)              UNet2DModel with num_class_embeds (∅ = last class)
    prompts               unet(x, t, encoder_hidden_states=E[y])  UNet2DConditionModel + a text encoder
For prompts, the class y indexes a table E [K + 1, seq, dim] of text-encoder states encoded once: row y is the
prompt template filled with class y's name ("a photo of a {class}"), row K (the null class ∅) the empty prompt,
the unconditional branch of classifier-free guidance. Either way the sampler, the methods and their hooks speak
class indices (∅ = K); `Conditioning.unet_kwargs` turns them into the U-Net's keyword arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.errors import UserError


@dataclass
class Conditioning:
    """Per-sample conditions: class labels, text-encoder states, or both; or class labels that index a prompt
    table (`prompt_embeds` [K + 1, seq, dim], row K the empty prompt), given to the U-Net as text states."""

    class_labels: torch.Tensor | None = None  # int64 [N]
    encoder_hidden_states: torch.Tensor | None = None  # float [N, seq, dim]
    prompt_embeds: torch.Tensor | None = None  # float [K + 1, seq, dim], indexed by class_labels

    def __len__(self) -> int:
        t = self.class_labels if self.class_labels is not None else self.encoder_hidden_states
        return 0 if t is None else len(t)

    def select(self, idx, device=None) -> Conditioning:
        def pick(t):
            return None if t is None else t[idx].to(device) if device is not None else t[idx]

        table = self.prompt_embeds
        return Conditioning(pick(self.class_labels), pick(self.encoder_hidden_states),
                            table if table is None or device is None else table.to(device))

    def with_labels(self, labels: torch.Tensor) -> Conditioning:
        """The same kind of condition for other class labels (the sampler: [y; ∅] per batch)."""
        return Conditioning(class_labels=labels, prompt_embeds=self.prompt_embeds)

    def unet_kwargs(self) -> dict:
        """Keyword arguments for unet(x, t, **kwargs)."""
        if self.prompt_embeds is not None:
            table = self.prompt_embeds.to(self.class_labels.device)
            return {"encoder_hidden_states": table[self.class_labels]}
        kwargs = {}
        if self.class_labels is not None:
            kwargs["class_labels"] = self.class_labels
        if self.encoder_hidden_states is not None:
            kwargs["encoder_hidden_states"] = self.encoder_hidden_states
        return kwargs


def takes_text(unet) -> bool:
    """Whether the U-Net's forward needs encoder_hidden_states (UNet2DConditionModel and its kin); a U-Net
    wrapped for several processes (DistributedDataParallel) is read through its .module."""
    return "cross_attention_dim" in getattr(unet, "module", unet).config


def call_unet(unet, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """unet(x, t, ...).sample for either diffusers U-Net class."""
    kwargs = cond.unet_kwargs()
    if takes_text(unet) and "encoder_hidden_states" not in kwargs:
        raise UserError(f"{type(unet).__name__} needs text conditioning (encoder_hidden_states): set "
                        "diffusion.prompt_template")
    if not takes_text(unet) and "encoder_hidden_states" in kwargs:
        raise UserError(f"{type(unet).__name__} takes no encoder_hidden_states (text conditioning)")
    return unet(x, t, **kwargs).sample


def fill_template(template: str, class_names) -> list[str]:
    """One prompt per class: `template` with {class} replaced by the class's name."""
    if "{class}" not in template:
        raise UserError(f"diffusion.prompt_template: {template!r} has no {{class}} placeholder")
    return [template.replace("{class}", str(name)) for name in class_names]


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], device="cpu") -> torch.Tensor:
    """Text-encoder states [P + 1, seq, dim] (float32, CPU) of the prompts and, last, the empty prompt (∅):
    padded to the tokenizer's max length, as Stable Diffusion encodes them."""
    tokens = tokenizer([*prompts, ""], padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt")
    out = text_encoder(tokens.input_ids.to(device))[0]
    return out.float().cpu()
