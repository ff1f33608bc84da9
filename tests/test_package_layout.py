"""The package's shape: no import circles (lazy, function-level imports count), nothing imported by nobody,
and ``import ddtas_lightning`` (and the light subpackages) pulls in no Lightning, timm or faiss."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ddtas_lightning"
# The commands users type (python -m ...): they must stay where they are.
COMMANDS = {"ddtas_lightning.train", "ddtas_lightning.evaluate", "ddtas_lightning.compare",
            "ddtas_lightning.study", "ddtas_lightning.nspa_report", "ddtas_lightning.data.prepare"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path, known: set[str]) -> set[str]:
    """Every ddtas_lightning module ``path`` imports, at any depth of the file (a lazy import is still an edge).
    ``from pkg import name`` counts as ``pkg.name`` when that is a module, else as ``pkg``."""
    out: set[str] = set()
    here = module_name(path)
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                pkg = here.split(".")[: len(here.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join(pkg + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out.update(n for n in names if n in known and n != here)
    return out


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    return {name: project_imports(path, known) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep.startswith(node + ".") or node.startswith(dep + "."):
                continue  # a package and its own submodules (an __init__ re-export) are not a circle
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_cycle_and_a_lazy_import(tmp_path):
    # The checker itself: a hand-made graph with a circle, and a file whose only import is inside a function.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    lazy = PACKAGE / "x_lazy_probe.py"
    lazy.write_text("def f():\n    from ddtas_lightning.train import main\n")
    try:
        assert "ddtas_lightning.train" in project_imports(lazy, {"ddtas_lightning.train"})
    finally:
        lazy.unlink()


def test_no_module_imports_a_module_that_imports_it_back():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def config_targets() -> set[str]:
    text = "\n".join(p.read_text() for p in (REPO / "conf").rglob("*.yaml"))
    return {word.rstrip(".,)") for word in text.replace(":", " ").split() if word.startswith("ddtas_lightning.")}


def test_every_module_is_imported_or_an_entry_point():
    graph = import_graph()
    imported = set().union(*graph.values())
    targets = config_targets()
    reached = {m for m in graph if any(t == m or t.startswith(m + ".") for t in targets)}
    entry_points = {module_name(p) for p in PACKAGE.rglob("*.py") if 'if __name__ == "__main__"' in p.read_text()}
    assert COMMANDS <= entry_points, f"commands that are no longer entry points: {sorted(COMMANDS - entry_points)}"
    orphans = sorted(m for m in graph if m not in imported | entry_points | reached
                     and not m.endswith("__init__") and m != "ddtas_lightning"
                     and not any(o.startswith(m + ".") for o in graph if o != m))  # packages
    assert not orphans, f"modules imported by nobody (and no entry point or config _target_): {orphans}"


@pytest.mark.parametrize("module", ["ddtas_lightning", "ddtas_lightning.config.validation",
                                    "ddtas_lightning.losses", "ddtas_lightning.miners"])
def test_light_imports_pull_no_heavy_framework(module):
    code = (f"import sys, {module}; heavy = [m for m in ('lightning', 'pytorch_lightning', 'timm', 'faiss', "
            "'hydra', 'wandb') if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import {module} loads {out.stdout.strip()}"


# What each command may not load before it runs (issue 22: `--help` took 13-25 s). torch is allowed where the
# command's own module needs it at import (cached_features' arrays); data.prepare (downloads, unpacking) not.
HEAVY = ("lightning", "pytorch_lightning", "timm", "faiss", "wandb", "optuna", "matplotlib", "torchvision", "sklearn")


@pytest.mark.parametrize("module, also_not", [
    ("ddtas_lightning.train", ("torch",)), ("ddtas_lightning.evaluate", ("torch",)),
    ("ddtas_lightning.compare", ("torch",)), ("ddtas_lightning.study", ("torch",)),
    ("ddtas_lightning.nspa_report", ("torch",)), ("ddtas_lightning.data.prepare", ("torch", "hydra")),
    ("ddtas_lightning.data.cached_features", ()),
])
def test_commands_import_no_heavy_framework_before_they_run(module, also_not):
    # Speed is measured, not asserted: benchmarks/bench_startup.py times each `--help`.
    names = HEAVY + also_not
    code = f"import sys, {module}; print(','.join(m for m in {names!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import {module} loads {out.stdout.strip()} (import it where it is used)"
