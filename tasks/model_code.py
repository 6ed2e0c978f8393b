"""The code a registered model ships: the sae_core modules its pyfunc (tasks/pyfunc_model.py)
imports, found by following the import graph, not the whole package.

Each file is one more artifact to download on load (one request each from a tracking server),
and shipping the viewer, the benchmarks or the stages would make a model carry code it never
runs. Imports under `if TYPE_CHECKING:` are left out (they never run); imports inside functions
are followed (they may run).
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import sae_core

PACKAGE = "sae_core"
ROOT = Path(sae_core.__file__).resolve().parent
# What the pyfunc imports: the SAE kinds (load_sae_bytes) and the shard reader it documents.
ENTRY_MODULES = ("sae_core.sae", "sae_core.storage.layout")
# Data a shipped module reads at import: native.py lists the kernels' sources on import.
PACKAGE_DATA = ("sae/csrc",)


def module_file(name: str) -> Path | None:
    """The source of sae_core module `name` (a package's __init__.py), None when it is not one."""
    rel = Path(*name.split(".")[1:])
    for candidate in (ROOT / rel / "__init__.py", (ROOT / rel).with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The module a `from ... import` in sae_core module `module` names, relative ones resolved
    (`from .gather import x` in sae_core.sae.triton.ops: sae_core.sae.triton.gather)."""
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    is_package = module_file(module).name == "__init__.py"
    base = parts[: len(parts) - node.level + is_package]
    return ".".join(base + ([node.module] if node.module else []))


def _imported_names(tree: ast.AST, module: str) -> list[str]:
    """Every sae_core module or `module.name` an import statement of `module` names, outside
    TYPE_CHECKING."""
    names: list[str] = []
    pending = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            pending.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            # `from sae_core.sae import kernels` may name a submodule: try both readings.
            source = _absolute(module, node)
            names += [source, *(f"{source}.{alias.name}" for alias in node.names)]
        pending.extend(ast.iter_child_nodes(node))
    return [n for n in names if n == PACKAGE or n.startswith(PACKAGE + ".")]


def inference_modules(entries: tuple[str, ...] = ENTRY_MODULES) -> list[str]:
    """The sae_core modules `entries` import, transitively, with every package above them."""
    seen: set[str] = set()
    pending = list(entries)
    while pending:
        name = pending.pop()
        if name in seen or module_file(name) is None:
            continue
        seen.add(name)
        parts = name.split(".")
        pending += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run too
        pending += _imported_names(ast.parse(module_file(name).read_text()), name)
    return sorted(seen)


def copy_inference_code(dest: Path) -> list[Path]:
    """Copy the inference modules and their package data into `dest/sae_core`; the files copied."""
    files = [module_file(name) for name in inference_modules()]
    files += [
        p for folder in PACKAGE_DATA for p in sorted((ROOT / folder).iterdir()) if p.is_file()
    ]
    copied = []
    for src in files:
        target = dest / PACKAGE / src.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
        copied.append(target)
    return copied
