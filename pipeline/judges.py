"""The judges (attribute and target classifiers): architectures, training, files, user-supplied judges.

Every judge maps x in [-1, 1] NCHW to logits and exposes `features(x)` (penultimate activations) and `head`
(the last linear layer), which is what `judge_outputs` and the scorers use. The default, `Judge`: 3 conv layers →
4×4 pooled map → 128-d penultimate features → logits; the features serve the in-domain FID and precision/recall.

Judge file (safetensors, one metadata key "judge" holding JSON):
    {"config": {"arch": "cnn" | "resnet" | "resnet18" | "resnet34", "num_outputs": K, ...arch arguments},
     "input":  {"size": S or [H, W], "mean": [m_r, m_g, m_b], "std": [s_r, s_g, s_b]},      optional
     "labels": ["name of output 0", ...],                                                 optional, K names
     "extra":  {...}}                                                                     optional, free-form
Tensors: the architecture's state_dict. Without "arch", the config is the small CNN's (`Judge`).
"resnet18"/"resnet34" use torchvision's parameter names (conv1, bn1, layer1.0.conv1, ..., fc), so a torchvision
ResNet state_dict saved with `safetensors.torch.save_file(model.state_dict(), path, metadata=...)` loads as is.
With "input", images are mapped to [0, 1], resized (bilinear, antialiased) to the declared size and normalised
by (x − mean) / std before the network; without it the network sees [-1, 1] images at the data resolution.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pipeline.errors import UserError

FEATURE_DIM = 128
TORCHVISION_DEPTHS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}


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
    """One safetensors file; metadata "judge" = {"config", "extra"[, "labels"]} (format: the module docstring)."""
    from pipeline.io import save_state

    header = {"config": judge.config, "extra": extra or {}, **({"labels": list(labels)} if labels else {})}
    save_state(path, judge.state_dict(), "judge", header)


def load_judge(path: str | Path, device: str | torch.device = "cpu") -> Judge:
    """Load a judge (any architecture here, with its declared input convention, if any);
    a missing, truncated or foreign file raises UserError naming the path."""
    from pipeline.io import read_state

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
    `arch`: "cnn" (Judge) or "resnet" (ResNetJudge with `blocks` per stage)."""
    from pipeline.checkpoints import Checkpointer, check_finite, config_fingerprint, tensor_digest

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
    ckpt = Checkpointer(ckpt_dir, fingerprint, total=epochs, every=1, names=("model",))

    def restore(weights, state):
        judge.load_state_dict(weights["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["lr_scheduler"])
        gen.set_state(state["data_rng"])

    start = ckpt.resume(restore)
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
        if ckpt.due(epoch + 1):
            ckpt.save(epoch + 1, weights={"model": judge.state_dict()},
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



class BasicBlock(nn.Module):
    """He et al.'s basic residual block: relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut x), torchvision's names."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


def _stages(width: int, blocks, first_stride: int) -> nn.Sequential:
    layers, c_in = [], width
    for i, n in enumerate(blocks):
        c_out = width * 2**i
        for j in range(n):
            layers.append(BasicBlock(c_in, c_out, (first_stride if i == 0 else 2) if j == 0 else 1))
            c_in = c_out
    return nn.Sequential(*layers)


class ResNetJudge(nn.Module):
    """A small ResNet trained from scratch: 3×3 stem, stages of basic blocks (widths w, 2w, 4w, ..., stride 2
    from the second stage), global average pool → 128-d features → logits."""

    def __init__(self, num_outputs: int, width: int = 32, blocks=(1, 1, 1), in_channels: int = 3):
        super().__init__()
        blocks = [int(b) for b in blocks]
        self.config = {"arch": "resnet", "num_outputs": num_outputs, "width": width, "blocks": blocks,
                       "in_channels": in_channels}
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.stages = _stages(width, blocks, 1)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(width * 2 ** (len(blocks) - 1), FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, num_outputs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TorchvisionResNet(nn.Module):
    """torchvision's ResNet-18/34 layout (same parameter names): 7×7 stem, max pool, four stages, fc."""

    def __init__(self, arch: str, num_outputs: int, in_channels: int = 3):
        super().__init__()
        self.config = {"arch": arch, "num_outputs": num_outputs, "in_channels": in_channels}
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        c_in = 64
        for i, n in enumerate(TORCHVISION_DEPTHS[arch]):
            c_out = 64 * 2**i
            blocks = [BasicBlock(c_in if j == 0 else c_out, c_out, (1 if i == 0 else 2) if j == 0 else 1)
                      for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            c_in = c_out
        self.fc = nn.Linear(512, num_outputs)

    @property
    def head(self) -> nn.Linear:
        return self.fc

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class InputAdapter(nn.Module):
    """Wraps a judge with its declared input convention: [-1, 1] → [0, 1] → resize → (x − mean) / std."""

    def __init__(self, net: nn.Module, size, mean, std):
        super().__init__()
        self.net = net
        self.config = net.config
        self.size = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = (x + 1.0) / 2.0
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        return (x - self.mean) / self.std

    @property
    def head(self) -> nn.Module:
        return self.net.head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(self.prepare(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_judge(config: dict) -> nn.Module:
    """An untrained judge from its config (no "arch" = the small CNN, `Judge`)."""
    config = dict(config)
    arch = config.pop("arch", "cnn")
    if arch == "cnn":
        return Judge(**config)
    if arch == "resnet":
        return ResNetJudge(**config)
    if arch in TORCHVISION_DEPTHS:
        return TorchvisionResNet(arch, **config)
    raise ValueError(f"unknown judge architecture {arch!r} (expected cnn, resnet, {', '.join(TORCHVISION_DEPTHS)})")


def judge_from_header(header: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    """Build the judge a file's metadata describes and load its tensors; any mismatch is a one-line ValueError."""
    if not isinstance(header, dict) or not isinstance(header.get("config"), dict):
        raise ValueError('metadata "judge" must be a JSON object with a "config" object')
    try:
        judge = build_judge(header["config"])
    except TypeError as exc:
        raise ValueError(f"config does not fit its architecture ({exc})") from None
    expected = judge.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"tensors do not match the architecture: {len(missing)} missing {missing[:3]}, "
                         f"{len(unexpected)} unexpected {unexpected[:3]}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"tensor {k} has shape {tuple(state[k].shape)}, the architecture needs {tuple(v.shape)}")
    judge.load_state_dict(state)
    k = judge.config["num_outputs"]
    labels = header.get("labels")
    if labels is not None and (not isinstance(labels, list) or len(labels) != k):
        raise ValueError(f"labels must list {k} names (one per output), got {labels!r}")
    spec = header.get("input")
    if spec is None:
        return judge
    c = judge.config.get("in_channels", 3)
    size, mean, std = spec.get("size"), spec.get("mean"), spec.get("std")
    sizes = [size] if isinstance(size, int) else size
    if not (isinstance(sizes, list) and len(sizes) in (1, 2) and all(isinstance(s, int) and s > 0 for s in sizes)):
        raise ValueError(f"input.size must be a positive integer or [height, width], got {size!r}")
    for name, v in (("mean", mean), ("std", std)):
        if not (isinstance(v, list) and len(v) == c and all(isinstance(e, (int, float)) for e in v)):
            raise ValueError(f"input.{name} must list {c} numbers, got {v!r}")
    if min(std) <= 0:
        raise ValueError(f"input.std must be > 0, got {std}")
    return InputAdapter(judge, size if isinstance(size, int) else sizes, mean, std)


def adopt_judge(source: str, num_outputs: int, dest, key: str) -> nn.Module:
    """Validate a user-supplied judge file (it must load and have `num_outputs` outputs) and copy its bytes
    to `dest` atomically; returns the loaded judge. `key` is the param that named the file (for errors)."""
    import shutil

    from pipeline.io import atomic_path

    if not Path(source).is_file():
        raise UserError(f"{key}: {source}: judge file not found")
    judge = load_judge(source)
    if judge.config["num_outputs"] != num_outputs:
        raise UserError(f"{key}: {source} has {judge.config['num_outputs']} outputs but the prepared data "
                        f"has {num_outputs} labels for it")
    with atomic_path(dest) as tmp:
        shutil.copyfile(source, tmp)
    return judge
