"""The package's import graph: arrows point down the layers, nothing is imported late to dodge a cycle.

Layers (a module may import from its own layer's package or from lower layers, never from higher ones):

0. ``_version``, ``errors``, ``files``, ``pixels``, ``describe``, ``randomness``, ``ranks``, ``modes``,
   ``batch_progress``, ``interrupts``, ``records``: leaves
1. ``taps``, ``kernels``, ``teacher``, ``losses``, ``checks``, ``optim``, ``weighting``, ``augment``, ``models``,
   ``data``, ``export``, ``predictions``, ``metadata``, ``pictures``, ``random_resume``,
   ``hparams``, ``callbacks``, ``metrics``
2. ``synthesis``: what and how (no Lightning, no files)
3. ``impressions`` (offline drivers), ``online`` (online drivers), ``distillation``, ``classifier``
4. ``cli``, and the package face ``zskd_lightning/__init__.py``
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "zskd_lightning"

LAYERS = {
    "_version": 0, "errors": 0, "files": 0, "pixels": 0, "describe": 0, "randomness": 0, "ranks": 0, "modes": 0,
    "batch_progress": 0, "interrupts": 0, "records": 0,
    "taps": 1, "kernels": 1, "teacher": 1, "losses": 1, "checks": 1, "optim": 1, "weighting": 1, "augment": 1,
    "models": 1, "data": 1, "export": 1, "predictions": 1, "metadata": 1, "pictures": 1, "random_resume": 1,
    "hparams": 1, "callbacks": 1, "metrics": 1,
    "synthesis": 2,
    "impressions": 3, "online": 3, "distillation": 3, "classifier": 3,
    "cli": 4, "__main__": 4, "": 4,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def top(name: str) -> str:
    """The first component below the package: ``zskd_lightning.synthesis.api`` -> ``synthesis``."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def imported(tree: ast.Module) -> list[tuple[str, ast.stmt, bool]]:
    """``(module, node, at_module_level)`` for every import of the package (``from X import Y`` gives X.Y when
    X.Y is a module, else X)."""
    found = []
    module_level = {id(node) for node in tree.body}

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            names = [f"{base}.{alias.name}" if (PACKAGE.parent / f"{base}.{alias.name}".replace(".", "/")).exists()
                     or (PACKAGE.parent / (f"{base}.{alias.name}".replace(".", "/") + ".py")).exists() else base
                     for alias in node.names]
        else:
            continue
        for name in names:
            if name == "zskd_lightning" or name.startswith("zskd_lightning."):
                found.append((name, node, id(node) in module_level))
    return found


def test_every_module_has_a_layer():
    assert {top(name) for name in modules()} <= set(LAYERS)


def test_the_package_imports_by_absolute_name_only():
    """The graph below reads absolute names: a relative import (``from . import x``) would pass its checks
    unseen."""
    relative = [f"{name}:{node.lineno}" for name, tree in modules().items() for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.level]
    assert not relative, relative


def test_no_import_runs_back_up_the_layers():
    upward = []
    for name, tree in modules().items():
        for target, node, _ in imported(tree):
            if LAYERS[top(target)] > LAYERS[top(name)] or (
                LAYERS[top(target)] == LAYERS[top(name)] and top(target) != top(name)
                and LAYERS[top(name)] in (2, 3)
            ):
                upward.append(f"{name}:{node.lineno} imports {target}")
            if target in ("zskd_lightning", "zskd_lightning.cli") and LAYERS[top(name)] < 4:
                upward.append(f"{name}:{node.lineno} imports the package face or the CLI ({target})")
    assert not upward, upward


def test_no_package_import_is_made_late():
    late = [f"{name}:{node.lineno} imports {target} inside a function"
            for name, tree in modules().items() for target, node, top_level in imported(tree) if not top_level]
    assert not late, late


def test_the_import_graph_has_no_cycle():
    graph = {name: {t for t, _, _ in imported(tree) if t != name} for name, tree in modules().items()}

    def visit(node, path):
        if node in path:
            pytest.fail("import cycle: " + " -> ".join([*path[path.index(node):], node]))
        for nxt in graph.get(node, ()):
            visit(nxt, [*path, node])

    for start in graph:
        visit(start, [])


@pytest.mark.parametrize("forbidden", ["lightning", "zskd_lightning.files"])
def test_synthesis_has_no_lightning_and_no_files(forbidden):
    offenders = []
    for name, tree in modules().items():
        if top(name) != "synthesis":
            continue
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            offenders += [f"{name}:{node.lineno} {n}" for n in names if n == forbidden or n.startswith(forbidden + ".")]
    assert not offenders, offenders
