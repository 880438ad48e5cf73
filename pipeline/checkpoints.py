"""Training checkpoints shared by every long stage: a directory `step-XXXXXXX/` holding
<name>.safetensors for each weight set, the training state (optimizer, schedules, RNG states) as
state.safetensors (its tensors) + state.json (everything else, tensors replaced by references), and meta.json
(step, config fingerprint); no pickle anywhere (docs/checkpoints.md). Written to a temp name and renamed, so a
killed writer never leaves a checkpoint that looks complete."""

from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import UserError, one_line
from pipeline.io import atomic_path


def config_fingerprint(cfg: dict) -> str:
    """Hash of everything a checkpoint depends on; training length and checkpoint cadence are excluded, so a
    longer run resumes from a shorter one's checkpoints."""
    keep = {k: v for k, v in cfg.items() if k not in ("train_steps", "checkpoint_every", "epochs")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tensor_digest(*tensors: torch.Tensor) -> str:
    """Short content hash of training data, part of a fingerprint."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def latest_checkpoint(ckpt_dir: Path, fingerprint: str, max_step: int | None = None) -> Path | None:
    """The newest complete checkpoint made with the same config and before `max_step` (temp dirs are
    dot-prefixed, so skipped; a checkpoint past a lowered train_steps is not resumed)."""
    if not ckpt_dir.is_dir():
        return None
    for p in sorted((p for p in ckpt_dir.glob("step-*") if p.is_dir()), reverse=True):
        try:
            meta = json.loads((p / "meta.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if meta.get("fingerprint") == fingerprint and (max_step is None or meta.get("step", 0) < max_step):
            return p
    return None


def _encode(obj, tensors: dict[str, torch.Tensor]):
    """A state_dict → JSON: tensors move to `tensors` and leave {"__tensor__": key}; tuples and dicts with
    non-string keys (an optimizer's parameter indices) are tagged so that `_decode` gives back the same types."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: _encode(v, tensors) for k, v in obj.items()}}
        if not all(isinstance(k, int) for k in obj):
            raise TypeError(f"checkpoint state: dict keys must be str or int, got {sorted(map(type, obj))}")
        return {"__intdict__": [[k, _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, tensors) for v in obj]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state: cannot store {type(obj).__name__} (tensors, numbers, strings only)")


def _decode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    (tag, value), = obj.items()
    if tag == "__tensor__":
        return tensors[value]
    if tag == "__dict__":
        return {k: _decode(v, tensors) for k, v in value.items()}
    if tag == "__intdict__":
        return {int(k): _decode(v, tensors) for k, v in value}
    if tag == "__tuple__":
        return tuple(_decode(v, tensors) for v in value)
    raise ValueError(f"unknown tag {tag!r} in state.json")


def save_state_files(directory: Path, state: dict) -> None:
    """state → directory/state.safetensors + state.json (floats written by repr, so they read back exactly)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors)
    save_file(tensors, str(directory / "state.safetensors"))
    (directory / "state.json").write_text(json.dumps(tree))


def load_state_files(directory: Path) -> dict:
    from safetensors.torch import load_file

    tensors = load_file(str(directory / "state.safetensors"))
    return _decode(json.loads((directory / "state.json").read_text()), tensors)


def save_checkpoint(ckpt_dir: Path, step: int, fingerprint: str, weights: dict[str, dict[str, torch.Tensor]],
                    state: dict, keep: int = 2) -> Path:
    from safetensors.torch import save_file

    path = ckpt_dir / f"step-{step:07d}"
    with atomic_path(path) as tmp:
        tmp.mkdir(parents=True)
        for name, tensors in weights.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / f"{name}.safetensors"))
        save_state_files(tmp, state)
        (tmp / "meta.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint}))
    for old in sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old)
    return path


def load_checkpoint(path: Path, names: tuple[str, ...]) -> tuple[dict[str, dict[str, torch.Tensor]], dict, int]:
    """(weights by name, state, step); a truncated or missing file raises UserError naming the checkpoint."""
    from safetensors.torch import load_file

    try:
        weights = {name: load_file(str(path / f"{name}.safetensors")) for name in names}
        state = load_state_files(path)
        step = int(json.loads((path / "meta.json").read_text())["step"])
    except Exception as exc:
        raise UserError(f"{path}: checkpoint is incomplete or corrupt ({one_line(exc)}); "
                        "delete it to restart from the previous one") from None
    return weights, state, step


@contextmanager
def restoring(path: Path):
    """Around the load_state_dict calls of a resume: a checkpoint whose fingerprint matches but whose tensors or
    optimizer state do not fit the model (edited by hand, or written by other code) is one UserError naming it."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{path}: checkpoint does not fit the model ({one_line(exc)}); delete it to start "
                        "afresh") from None


def check_finite(loss: torch.Tensor, stage: str, step: int, hint: str) -> None:
    """Stop a training loop on a NaN/inf loss with one line naming the stage and step."""
    if not torch.isfinite(loss):
        raise UserError(f"{stage}: loss became {loss.item()} at step {step}; {hint}")


@dataclass
class LossHistory:
    """Training-loss records: every record step logs `train_loss` = mean of the per-step losses since the last
    record and, where given, `group_loss_k` = the same mean of group k's loss (InvDiff). Saved in each checkpoint,
    the open window included, so a resumed run reports the uninterrupted run's records (docs/checkpoints.md)."""

    points: list[tuple[int, float]] = field(default_factory=list)
    group_points: list[list[float]] = field(default_factory=list)
    window: list[float] = field(default_factory=list)
    group_window: list[np.ndarray] = field(default_factory=list)

    def add(self, loss: float, groups: np.ndarray | None = None) -> None:
        self.window.append(loss)
        if groups is not None:
            self.group_window.append(groups)

    def close_window(self, step: int) -> dict[str, float]:
        """Record the window's means at `step`; returns the metrics to log."""
        mean = float(np.mean(self.window))
        groups = np.mean(self.group_window, 0).tolist() if self.group_window else []
        self.points.append((step, mean))
        self.group_points.append(groups)
        self.window, self.group_window = [], []
        return _record(mean, groups)

    def replay(self, log) -> None:
        """Log the records made before a resume again, so the resumed run's metric history is complete."""
        for (step, mean), groups in zip(self.points, self.group_points, strict=True):
            log(step, _record(mean, groups))

    def state(self) -> dict:
        return {"loss_history": {"points": [list(p) for p in self.points], "group_points": self.group_points,
                                 "window": self.window,
                                 "group_window": [torch.from_numpy(np.asarray(g)) for g in self.group_window]}}

    @classmethod
    def from_state(cls, state: dict) -> LossHistory:
        """Checkpoints written before records were saved resume with an empty history (their old behaviour)."""
        saved = state.get("loss_history")
        if saved is None:
            return cls()
        return cls(points=[(int(s), float(m)) for s, m in saved["points"]], group_points=saved["group_points"],
                   window=list(saved["window"]), group_window=[g.numpy() for g in saved["group_window"]])


def _record(mean: float, groups: list[float]) -> dict[str, float]:
    return {"train_loss": mean, **{f"group_loss_{k}": v for k, v in enumerate(groups)}}


class Checkpointer:
    """The checkpoint/resume skeleton every training loop shares (train_diffusion, finetune_guidance, the judges).

    Before the first step, `resume(restore)` finds the latest checkpoint in `ckpt_dir` made with the same
    `fingerprint` (config, seed, data) at or below `total` steps, loads the weight sets `names` and the training
    state, and calls restore(weights, state) inside `restoring`; it returns the step to start from (0 without one).
    After step s (1-based count `done`), `due(done)` says whether to write one: every `every` steps, never at the last
    (the stage's output is that), on the main process only; `save(done, weights, state)` writes it. With
    ckpt_dir None nothing is read or written. The directory is created by the main process even when no step is
    checkpointed (it is a DVC output)."""

    def __init__(self, ckpt_dir: Path | None, fingerprint: str, *, total: int, every: int, names: tuple[str, ...],
                 is_main: bool = True):
        self.dir, self.fingerprint, self.total, self.every = ckpt_dir, fingerprint, total, every
        self.names, self.is_main = names, is_main
        if ckpt_dir is not None and is_main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.path = None if ckpt_dir is None else latest_checkpoint(ckpt_dir, fingerprint, max_step=total)

    def resume(self, restore) -> int:
        if self.path is None:
            return 0
        weights, state, start = load_checkpoint(self.path, self.names)
        with restoring(self.path):
            restore(weights, state)
        return start

    def due(self, done: int) -> bool:
        return self.dir is not None and self.is_main and done % self.every == 0 and done < self.total

    def save(self, done: int, weights: dict[str, dict[str, torch.Tensor]], state: dict) -> Path:
        return save_checkpoint(self.dir, done, self.fingerprint, weights=weights, state=state)
