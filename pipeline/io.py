"""Safe artifact I/O: write to a temporary name then rename, read with one-line errors.

Formats: arrays in npz (never pickled objects), tables in parquet, small records in JSON,
models as diffusers/safetensors directories. A killed writer leaves only a dot-prefixed temp file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import UserError, one_line


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path beside `path`; on success rename it onto `path` (file or directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if path.is_dir() and not path.is_symlink():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)


def load_npz(path: str | Path, *keys: str) -> dict[str, np.ndarray]:
    """Load the named arrays (pickled objects refused); missing file or key -> UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found (run the stage that writes it first)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise UserError(f"{path}: expected arrays {list(keys)}, missing {missing}")
            return {k: z[k] for k in (keys or z.files)}
    except UserError:
        raise
    except Exception as exc:  # zipfile/format errors: truncated or not an npz
        raise UserError(f"{path}: not a readable npz file ({one_line(exc)})") from None


def save_state(path: str | Path, state: dict, key: str, header: dict) -> None:
    """A module's tensors in one safetensors file, its config as JSON under the single metadata entry `key`
    (safetensors writes its metadata map in hash order, so more keys would change the bytes, and DVC's hash,
    from run to run)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp),
                  metadata={key: json.dumps(header, sort_keys=True)})


def read_state(path: str | Path, key: str) -> tuple[dict, dict]:
    """(header, tensors) of a file written by `save_state`; raises what safetensors/json raise, for the caller
    to turn into its own one-line error."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = json.loads((f.metadata() or {})[key])
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    return header, state


def save_parquet(path: str | Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def load_parquet(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found (run the stage that writes it first)")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:
        raise UserError(f"{path}: not a readable parquet file ({type(exc).__name__})") from None
    missing = [c for c in columns or [] if c not in frame.columns]
    if missing:
        raise UserError(f"{path}: expected columns {columns}, missing {missing}")
    return frame


def save_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def load_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found (run the stage that writes it first)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (signal 0 probes without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def clean_leftovers(root: str | Path = "data") -> list[Path]:
    """Tidy what a killed atomic_path writer left under `root`, for writers whose pid no longer runs: a temp
    `.<name>.tmp-<pid>` is removed; an `.<name>.old-<pid>` (killed between its two renames) is renamed back to
    <name> when <name> is missing, else removed. Returns the paths handled. Live writers' temps are kept, so
    stages running side by side (the flow) do not disturb each other."""
    handled = []
    for parent, dirs, files in os.walk(root):
        for entry in [*dirs, *files]:
            m = _LEFTOVER.match(entry)
            if m is None or pid_alive(int(m["pid"])):
                continue
            path, target = Path(parent) / entry, Path(parent) / m["name"]
            if m["kind"] == "old" and not target.exists():
                os.replace(path, target)
            else:
                _remove(path)
            handled.append(path)
        dirs[:] = [d for d in dirs if (Path(parent) / d).exists() and not _LEFTOVER.match(d)]
    return handled
