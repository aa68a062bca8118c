"""The package's stack (docs/design.md, "The stack"): a module imports only its own layer and those below it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "proco_ray"

# Bottom to top; a name is a top-level module or sub-package of proco_ray.
LAYERS = [
    {"errors", "processes", "metric_keys", "config", "metrics", "progress", "ray_compat"},
    {"storage"},
    {"data"},
    {"distributed"},
    {"method"},
    {"engine"},
    {"runs"},
    {"evaluation", "inference", "experiments"},
    {"launch"},
    {"commands", "cli", "__main__", "__init__"},
]
LAYER_OF = {name: level for level, names in enumerate(LAYERS) for name in names}


def imported_parts(tree: ast.AST) -> set[str]:
    """The proco_ray parts (first name after `proco_ray.`) a module imports anywhere, function bodies included."""
    parts = set()
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names]
        parts |= {name.split(".")[1] for name in names if name.startswith("proco_ray.")}
    return parts


def test_every_module_imports_only_its_own_layer_and_those_below():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        assert part in LAYER_OF, f"{path.relative_to(PACKAGE)} belongs to no layer: add '{part}' to LAYERS and docs/design.md"
        for imported in imported_parts(ast.parse(path.read_text(), str(path))):
            assert imported in LAYER_OF, f"{path.relative_to(PACKAGE)} imports proco_ray.{imported}, which is in no layer"
            if LAYER_OF[imported] > LAYER_OF[part]:
                upward.append(f"{path.relative_to(PACKAGE)} ({part}) imports {imported}")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_commands_live_in_the_command_layer_only():
    """Library modules keep no command line: add_arguments/run/main belong to proco_ray.commands and cli."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if part in ("commands", "cli"):
            continue
        tree = ast.parse(path.read_text())
        names = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        offenders += [f"{path.relative_to(PACKAGE)}: {name}" for name in sorted(names & {"add_arguments", "run", "main"})]
    assert not offenders, "command functions outside proco_ray.commands:\n" + "\n".join(offenders)
