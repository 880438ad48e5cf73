"""The judges (attribute and target classifiers) and the class-conditional U-Net.

Judge: 3 conv layers → 4×4 pooled map → 128-d penultimate features → logits. The features serve the
in-domain FID and precision/recall. A judge file is one safetensors file whose metadata holds its config.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.errors import UserError

FEATURE_DIM = 128


class Judge(nn.Module):
    def __init__(self, num_outputs: int, width: int = 32, in_channels: int = 3):
        super().__init__()
        self.config = {"num_outputs": num_outputs, "width": width, "in_channels": in_channels}
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(4 * w * 16, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_outputs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [N, 128] for x in [-1, 1] NCHW."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def save_judge(judge: Judge, path: str | Path, extra: dict | None = None, labels: list[str] | None = None) -> None:
    """One safetensors file; metadata "judge" = {"config", "extra"[, "labels"]} (format: pipeline/judges.py)."""
    from pipeline.io import save_state

    header = {"config": judge.config, "extra": extra or {}, **({"labels": list(labels)} if labels else {})}
    save_state(path, judge.state_dict(), "judge", header)


def load_judge(path: str | Path, device: str | torch.device = "cpu") -> Judge:
    """Load a judge (any architecture of pipeline.judges, with its declared input convention, if any);
    a missing, truncated or foreign file raises UserError naming the path."""
    from pipeline.io import read_state
    from pipeline.judges import judge_from_header

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: judge checkpoint not found (run `dvc repro train_classifiers`)")
    try:
        judge = judge_from_header(*read_state(path, "judge"))
    except Exception as exc:
        msg = " ".join(str(exc).split())
        raise UserError(f"{path}: not a valid judge checkpoint ({type(exc).__name__}: {msg})") from None
    return judge.to(device).eval()


def train_judge(images: torch.Tensor, targets: torch.Tensor, num_outputs: int, *, width: int, epochs: int,
                batch_size: int, lr: float, seed: int, device: str = "cpu", desc: str = "judge",
                ckpt_dir: Path | None = None, arch: str = "cnn", blocks=(1, 1, 1)) -> Judge:
    """Cross-entropy training with Adam and a one-cycle schedule; batches drawn from a generator seeded by
    `seed`. With `ckpt_dir`, a checkpoint after every epoch, and a re-run resumes from the latest.
    `arch`: "cnn" (Judge) or "resnet" (pipeline.judges.ResNetJudge with `blocks` per stage)."""
    from pipeline.checkpoints import (
        check_finite,
        config_fingerprint,
        latest_checkpoint,
        load_checkpoint,
    restoring,
        save_checkpoint,
        tensor_digest,
    )
    from pipeline.judges import ResNetJudge

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    judge = (Judge(num_outputs, width) if arch == "cnn" else ResNetJudge(num_outputs, width, blocks)).to(device)
    opt = torch.optim.Adam(judge.parameters(), lr=lr)
    per_epoch = (len(images) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * per_epoch)
    fingerprint = config_fingerprint({"outputs": num_outputs, "width": width, "batch_size": batch_size, "lr": lr,
                                      "seed": seed, "schedule": epochs * per_epoch,
                                      "data": tensor_digest(images, targets),
                                      **({} if arch == "cnn" else {"arch": judge.config})})
    start = 0
    if ckpt_dir is not None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)  # exists even when no epoch is checkpointed (a DVC output)
    ckpt = latest_checkpoint(ckpt_dir, fingerprint, max_step=epochs) if ckpt_dir else None
    if ckpt is not None:
        weights, state, start = load_checkpoint(ckpt, ("model",))
        with restoring(ckpt):
            judge.load_state_dict(weights["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["lr_scheduler"])
            gen.set_state(state["data_rng"])
    bar = tqdm(total=epochs * per_epoch, initial=start * per_epoch, desc=desc, leave=False)
    for epoch in range(start, epochs):
        for idx in torch.randperm(len(images), generator=gen).split(batch_size):
            x, y = images[idx].to(device), targets[idx].to(device)
            loss = nn.functional.cross_entropy(judge(x), y)
            check_finite(loss, desc, bar.n, "lower classifiers.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if ckpt_dir is not None and epoch + 1 < epochs:
            save_checkpoint(ckpt_dir, epoch + 1, fingerprint, weights={"model": judge.state_dict()},
                            state={"optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
                                   "data_rng": gen.get_state()})
    bar.close()
    return judge.eval()


@torch.no_grad()
def judge_outputs(judge: Judge, images: torch.Tensor, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(predicted label [N], penultimate features [N,128] float64) for images in [-1,1] NCHW."""
    device = next(judge.parameters()).device
    preds, feats = [], []
    for x in images.split(batch_size):
        f = judge.features(x.to(device))
        preds.append(judge.head(f).argmax(1).cpu())
        feats.append(f.double().cpu())
    return torch.cat(preds).numpy(), torch.cat(feats).numpy()


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
