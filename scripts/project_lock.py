"""Exit 3 with one line when another `dvc repro` holds this project (used by `make run` before `dvc repro`).

DVC takes .dvc/tmp/lock (zc.lockfile) for a whole repro; a second run then fails after a few retries with exit 255
and a paragraph about the lock. This probe takes and releases the same lock first, so the second run is told in
one line what holds the project and how to wait: `dvc repro --wait-for-lock` (or `make run WAIT=1`).
"""

import sys
from pathlib import Path

import zc.lockfile

LOCK = Path(".dvc/tmp/lock")


def main() -> int:
    if not LOCK.parent.is_dir():
        return 0  # no .dvc/tmp yet: nothing can hold it
    try:
        zc.lockfile.LockFile(str(LOCK)).close()
    except zc.lockfile.LockError:
        print(f"error: another dvc repro holds this project ({LOCK}); wait for it with `make run WAIT=1` "
              "(dvc repro --wait-for-lock) or run again when it ends", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
