"""A tiny randomly initialised latent-diffusion pipeline (Stable Diffusion's layout), built and saved by the tests:
UNet2DConditionModel + AutoencoderKL + CLIPTextModel + a CLIPTokenizer over a vocabulary written here. No download."""

from __future__ import annotations

import json
from pathlib import Path

import torch

LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"
MAX_LENGTH = 12  # tokens per prompt (Stable Diffusion: 77)
HIDDEN = 32  # text-encoder width = the U-Net's cross_attention_dim


def write_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """vocab.json and merges.txt of a byte-level BPE over single letters (each also as a word end, `a</w>`) and a
    few merges, in CLIP's format."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>", *LETTERS, *(c + "</w>" for c in LETTERS), "ph", "ot", "ot</w>",
              "pho", "photo</w>"]
    merges = ["#version: 0.2", "p h", "o t", "o t</w>", "ph o", "pho t", "phot o</w>"]
    tokens += ["phot", "photo"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")
    return folder / "vocab.json", folder / "merges.txt"


def tiny_components(resolution: int = 16, seed: int = 0, tokenizer_dir: Path | None = None) -> dict:
    """The five parts of a StableDiffusionPipeline at toy size: latents are 4 × resolution/2 × resolution/2."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = write_tokenizer_files(tokenizer_dir or Path(".tokenizer-src"))
    tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=MAX_LENGTH)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=resolution // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=HIDDEN, attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        layers_per_block=1, norm_num_groups=8, sample_size=resolution)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(json.loads(vocab.read_text())), hidden_size=HIDDEN, intermediate_size=37,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_LENGTH, bos_token_id=0,
        eos_token_id=1, pad_token_id=1))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1)  # Stable Diffusion's scheduler config
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval(), "tokenizer": tokenizer,
            "scheduler": scheduler}


def save_tiny_pipeline(path: Path, resolution: int = 16, seed: int = 0) -> Path:
    """Save the tiny pipeline as StableDiffusionPipeline.save_pretrained writes it (model_index.json, unet/, vae/,
    text_encoder/, tokenizer/, scheduler/)."""
    from diffusers import StableDiffusionPipeline

    parts = tiny_components(resolution, seed, tokenizer_dir=path.parent / f".{path.name}-tokenizer-src")
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(path))
    return path


def write_red_sign_judge(path: Path) -> Path:
    """A user-supplied attribute judge (the README's judge format) for a 16×16 image whose label is the sign of the
    red channel averaged around one spot (rows 4–7, columns 0–3). A judge trained on the fixture's flat colours sees
    only noise in what an untrained pipeline decodes and labels it all alike; this one splits such samples about
    evenly (measured on the tiny pipeline: the spot's mean is ≈ 0, its spread across samples ≈ 0.1), so the methods
    that fit on judge labels (an SVM needs two values) have two to fit."""
    from pipeline.judges import Judge, save_judge

    judge = Judge(num_outputs=2, width=4)
    with torch.no_grad():
        for p in judge.parameters():
            p.zero_()
        conv1, conv2, conv3, linear = judge.body[0], judge.body[2], judge.body[4], judge.body[8]
        conv1.weight[0, 0, 1, 1], conv1.weight[1, 0, 1, 1] = 1.0, -1.0  # relu(R), relu(−R)
        for conv in (conv2, conv3):  # 3×3 box averages, stride 2, of both channels
            conv.weight[0, 0], conv.weight[1, 1] = 1 / 9, 1 / 9
        cell = 1 * 4 + 0  # pooled 4×4 map, row 1, column 0
        linear.weight[0, 0 * 16 + cell], linear.weight[1, 1 * 16 + cell] = 1.0, 1.0
        judge.head.weight[1, 0], judge.head.weight[1, 1] = 1.0, -1.0  # logit 1 = mean R there; logit 0 = 0
    save_judge(judge, path, labels=["red below 0", "red above 0"])
    return path
