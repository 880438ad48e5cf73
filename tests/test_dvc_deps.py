"""dvc.yaml's code deps are exactly each stage's import closure inside the project (docs/protocol.md, "Stale outputs").

A stage module's closure: the project files (pipeline/**.py, stages/*.py) reached from it by `import` / `from … import`
statements anywhere in a file (function bodies included), followed transitively. Every file of it must be a dep of
every stage (each foreach item too) that runs the module, or editing it would leave the stage "up to date" with old
outputs; and no other project .py file may be a dep, so a code change re-runs exactly the stages it can affect.
Empty package __init__.py files carry no code and are not asked for (one that gains code is).
"""

import ast
import re
from functools import cache
from pathlib import Path

import pytest

from tests.tiny import ROOT

PACKAGES = ("pipeline", "stages")


def module_file(module: str) -> Path | None:
    """The project file that `import <module>` executes last (a module, or a package's __init__.py), else None."""
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*parts)
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_names(path: Path) -> list[str]:
    """Every dotted name an import statement in `path` may load: `import a.b` → a.b; `from a import b` → a, a.b
    (b may be a submodule or a name); relative imports resolved against the file's package."""
    package = list(path.relative_to(ROOT).parent.parts)
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parent = package[: len(package) - node.level + 1] if node.level else []
            base = ".".join([*parent, *([node.module] if node.module else [])])
            names += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    return names


@cache
def import_closure(module: str) -> frozenset[str]:
    """Project files (relative paths) that running `python -m <module>` imports, empty __init__.py files left out."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__, then a/b/c
            path = module_file(".".join(parts[:i]))
            if path is not None and path not in seen:
                seen.add(path)
                todo += imported_names(path)
    return frozenset(str(p.relative_to(ROOT)) for p in seen if p.name != "__init__.py" or p.read_text().strip())


def is_project_code(dep: str) -> bool:
    return dep.endswith(".py") and dep.split("/")[0] in PACKAGES


def dvc_stages() -> list[tuple[str, str, set[str]]]:
    """(stage name, module it runs, its deps) for every stage of dvc.yaml, foreach items expanded by DVC itself."""
    from dvc.repo import Repo

    out = []
    with Repo(str(ROOT)) as repo:
        for stage in repo.index.stages:
            match = re.match(r"python -m ([\w.]+)", stage.cmd)
            assert match, f"{stage.addressing}: cmd {stage.cmd!r} is not `python -m <module>`"
            out.append((stage.addressing, match.group(1), {dep.def_path for dep in stage.deps}))
    return out


def test_import_closure_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    """The closure follows imports inside functions, `from pkg import submodule` and relative imports."""
    import tests.test_dvc_deps as me

    (tmp_path / "pipeline" / "sub").mkdir(parents=True)
    (tmp_path / "stages").mkdir()
    files = {"pipeline/__init__.py": "", "pipeline/a.py": "def f():\n    from pipeline.sub import b\n",
             "pipeline/sub/__init__.py": "X = 1\n", "pipeline/sub/b.py": "from . import c\nfrom ..d import y\n",
             "pipeline/sub/c.py": "import numpy\n", "pipeline/d.py": "y = 1\n", "pipeline/unused.py": "",
             "stages/__init__.py": "", "stages/s.py": "import pipeline.a\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(me, "ROOT", tmp_path)
    me.import_closure.cache_clear()
    try:
        assert me.import_closure("stages.s") == {"stages/s.py", "pipeline/a.py", "pipeline/sub/__init__.py",
                                                 "pipeline/sub/b.py", "pipeline/sub/c.py", "pipeline/d.py"}
    finally:
        me.import_closure.cache_clear()


def test_sample_closure_holds_every_method_module():
    """The case that went stale: sample@… runs every method's hooks and the sampler."""
    closure = import_closure("stages.sample")
    for path in ("pipeline/sampling.py", "pipeline/methods/invdiff.py", "pipeline/methods/latent_directions.py",
                 "pipeline/methods/distribution_guidance.py", "stages/common.py", "pipeline/config.py"):
        assert path in closure


STAGES = dvc_stages()


@pytest.mark.parametrize("name,module,deps", STAGES, ids=[s[0] for s in STAGES])
def test_code_deps_are_the_import_closure(name, module, deps):
    closure = import_closure(module)
    assert closure, f"{name}: module {module} not found in the project"
    missing = sorted(closure - deps)
    assert not missing, f"dvc.yaml stage {name} ({module}) misses code deps: {missing}"
    extra = sorted(d for d in deps if is_project_code(d) and d not in closure)
    assert not extra, f"dvc.yaml stage {name} ({module}) depends on code it never imports: {extra}"
