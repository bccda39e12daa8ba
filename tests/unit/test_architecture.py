"""The package graph has layers: a module imports only from its own layer or the ones below,
at module level and inside functions alike (docs/architecture.md draws the map)."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[2] / "engine"

LAYERS = [
    {"formats", "options", "loss_catalog", "arguments", "file_lock"},  # flags, formats, file locks: no torch
    {"platform", "initialize"},  # the accelerator and process groups
    {"tokenizer"},
    {"data"},
    {"model"},
    {"checkpoint"},
    {"dpo"},  # objectives
    {"training"},
    {"convert"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _unit(module: str) -> str:
    """engine.training.trainer -> training; engine.arguments -> arguments."""
    return module.split(".")[1]


def _engine_imports(path: Path) -> set[str]:
    """Every engine module `path` imports, wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "engine":
            found.update(f"engine.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("engine."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("engine."))
    return found


def test_every_engine_package_has_a_layer():
    units = {p.stem if p.is_file() else p.name for p in ENGINE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert units == set(RANK)


def test_no_module_imports_a_higher_layer():
    upward = []
    for path in sorted(ENGINE.rglob("*.py")):
        unit = path.relative_to(ENGINE).parts[0].removesuffix(".py")
        for module in _engine_imports(path):
            if RANK[_unit(module)] > RANK[unit]:
                upward.append(f"{path.relative_to(ENGINE.parent)} imports {module}")
    assert not upward, "\n".join(upward)


def test_only_platform_calls_cuda():
    callers = [str(path.relative_to(ENGINE.parent)) for path in sorted(ENGINE.rglob("*.py"))
               if path.name != "platform.py" and "torch.cuda." in _code(path)]
    assert not callers, callers


def _code(path: Path) -> str:
    """The source without comments and docstrings (they may name torch.cuda)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body[0] = ast.Pass()
    return ast.unparse(tree)
