"""DVC experiments, readable: the headline table and a dry run that works (docs/tracking.md).

    python scripts/exp.py show                 # a row per experiment × method: bias, FID, fidelity, changed params
    python scripts/exp.py dry -S report.grid_per_class=3     # what `dvc exp run -S …` would run

`dvc exp show` has a column per metric and param (hundreds); `show` keeps the headline metrics of
data/scores/<method>/metrics.json and the params that differ between the experiments listed.
`dvc exp run --dry` always runs in a temporary copy (DVC forces it) and skips checking the outputs out there, so
it fails on the first stage whose dependencies are another stage's outputs; `dry` makes such a copy with the
outputs linked from DVC's cache and runs `dvc repro --dry` in it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

HEADLINE = ("bias_score_normalised", "fid_balanced", "fidelity")
SCORES = "data/scores/"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def experiments(shown: list[dict]) -> list[tuple[str, dict, dict]]:
    """`dvc exp show --json` as [(name, {param: value}, {method: {metric: value}})], commits then their
    experiments."""
    found = []

    def visit(entry: dict) -> None:
        data = entry.get("data") or {}
        rev = entry.get("rev") or ""
        name = entry.get("name") or (rev if rev == "workspace" else rev[:7])
        params = _flatten(((data.get("params") or {}).get("params.yaml") or {}).get("data"))
        methods = {}
        for path, metrics in (data.get("metrics") or {}).items():
            if path.startswith(SCORES) and path.endswith("/metrics.json"):
                methods[path[len(SCORES):-len("/metrics.json")]] = (metrics or {}).get("data") or {}
        found.append((name, params, methods))
        for group in entry.get("experiments") or []:
            for rev in group.get("revs") or []:
                visit(rev)

    for entry in shown:
        visit(entry)
    return found


def table(found: list[tuple[str, dict, dict]]) -> str:
    """One line per experiment × method: the headline metrics, then the params whose values differ."""
    keys = sorted({k for _, p, _ in found for k in p})
    changed = [k for k in keys if len({json.dumps(p.get(k), sort_keys=True) for _, p, _ in found}) > 1]
    head = ["experiment", "method", *HEADLINE, *changed]
    rows = []
    for name, params, methods in found:
        for method in sorted(methods, key=lambda m: (m != "baseline", m)):
            values = [methods[method].get(k) for k in HEADLINE]
            rows.append([name, method, *(f"{v:.4g}" if isinstance(v, int | float) else "-" for v in values),
                         *(str(params.get(k, "-")) for k in changed)])
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=False)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)) for line in [head, *rows])


def show(argv: list[str]) -> int:
    proc = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json", *argv], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        print(proc.stderr.strip(), file=sys.stderr)
        return proc.returncode
    print(table(experiments(json.loads(proc.stdout))))
    return 0


def apply_sets(params: Path, sets: list[str]) -> None:
    """`-S key=value` (dotted keys, YAML values) applied to params.yaml, as `dvc exp run -S` does."""
    raw = yaml.safe_load(params.read_text()) or {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: -S {item!r}: expected KEY=VALUE")
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    params.write_text(yaml.safe_dump(raw, sort_keys=False))


def dry(sets: list[str], root: Path) -> int:
    """`dvc repro --dry` in a copy of the checkout (tracked files, dvc.lock, params.yaml with `sets`), its outputs
    linked from the project's cache, under .dvc/tmp (removed afterwards)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, text=True, check=True)
    scratch = root / ".dvc" / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="exp-dry-", dir=scratch) as tmp:
        copy = Path(tmp)
        for name in {*files.stdout.split("\0"), "dvc.lock", "params.yaml"} - {""}:
            if (root / name).is_file() and not (root / name).is_symlink():
                (copy / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / name, copy / name)
        apply_sets(copy / "params.yaml", sets)
        cache = subprocess.run([sys.executable, "-m", "dvc", "cache", "dir"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
        env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
        for cmd in (["git", "init", "-q"],  # DVC wants an SCM root; the copy's own, empty one
                    [sys.executable, "-m", "dvc", "config", "--local", "cache.dir", cache],
                    [sys.executable, "-m", "dvc", "config", "--local", "cache.type", "hardlink,symlink,copy"],
                    [sys.executable, "-m", "dvc", "checkout", "--allow-missing", "-q"]):
            subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True)
        return subprocess.run([sys.executable, "-m", "dvc", "repro", "--dry"], cwd=copy, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("show", help="headline metrics per experiment (extra args go to `dvc exp show`)")
    d = sub.add_parser("dry", help="what `dvc exp run -S …` would run")
    d.add_argument("-S", "--set-param", action="append", default=[], metavar="KEY=VALUE")
    args, rest = ap.parse_known_args(argv)
    if args.command == "show":
        return show(rest)
    if rest:
        ap.error(f"unrecognised arguments: {' '.join(rest)}")
    return dry(args.set_param, Path.cwd())


if __name__ == "__main__":
    sys.exit(main())
