"""The import contract of DESIGN.md's layers, read from the source with ``ast`` (nothing in
``sae`` is imported, except by the one subprocess check at the end).

- the model, the regularizers and the metrics import no training, config, Hydra or W&B code;
- only ``sae/tracking.py`` imports wandb; no module of ``sae`` imports submitit;
- ``sae.report`` (with ``sae/reporting/``), ``sae.identity`` and sweep planning load no torch when
  imported: followed through every module-level import (imports inside functions run only when
  called, and ``if TYPE_CHECKING:`` blocks never run);
- no cycles among ``sae.*`` modules, counting imports inside functions too (a lazy import that
  calls up into a higher layer is still a dependency).

The modules are found by walking ``sae/``, so packages that replace modules (``sae/training/fast/``,
``sae/regularizers/``) are covered as they appear.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "sae"

# Modules (and everything under them) that must stay below training, config and tracking.
PURE_LAYERS = ("sae.model", "sae.regularizers", "sae.metrics")
# What the pure layers must not import: training, config, entry points, Hydra, W&B.
NOT_IN_PURE_LAYERS = ("sae.train", "sae.training", "sae.config", "sae.grid", "sae.tracking",
                      "sae.extract", "sae.evaluation", "sae.report", "sae.reporting", "hydra",
                      "hydra_plugins", "omegaconf", "wandb", "submitit")
# The bottom of the stack: these import no other sae module than each other.
FOUNDATION = ("sae.config", "sae.dataset_schemas", "sae.checks", "sae.cli", "sae.cli.help",
              "sae.identity", "sae.io", "sae.io.files", "sae.io.digests", "sae.io.version",
              "sae.io.tensors", "sae.io.plain", "sae.io.fingerprint", "sae.runtime",
              "sae.runtime.progress")
# The regularizer registry (the package's torch-free ``__init__`` and ``base``): config validation
# reads its names, as issue 12 asks; the penalty modules themselves stay above the foundation.
REGISTRY = ("sae.regularizers", "sae.regularizers.base")
TORCH_FREE = ("sae.report", "sae.identity", "sae.io", "sae.io.files", "sae.io.digests",
              "sae.io.tensors", "sae.grid.runs", "sae.config", "sae.grid.sweep",
              "sae.data.similarity", "sae.evaluation.method_card")
TORCH = ("torch", "safetensors.torch", "torchvision", "open_clip", "timm")


@dataclass(frozen=True)
class Import:
    target: str  # absolute dotted name, resolved to an sae module where it names one
    module_level: bool  # runs when the importing module is imported


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def sae_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str) -> str:
    """``sae.a.b.c`` -> the longest prefix that is an sae module (``from sae.a import b``
    names module ``sae.a.b`` when it exists, else attribute ``b`` of ``sae.a``)."""
    if not name.startswith("sae"):
        return name
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in sae_modules():
            return candidate
    return name


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, module: str, is_package: bool, module_level: bool,
          type_checking: bool = False):
    """The imports under ``node``; ``type_checking``: also those of ``if TYPE_CHECKING:``
    blocks (which never run, but name a dependency all the same)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            if type_checking:
                body = ast.Module(body=child.body, type_ignores=[])
                yield from _walk(body, module, is_package, False, type_checking)
            orelse = ast.Module(body=child.orelse, type_ignores=[])  # the else branch runs
            yield from _walk(orelse, module, is_package, module_level, type_checking)
            continue
        if isinstance(child, ast.Import):
            for alias in child.names:
                yield Import(_resolve(alias.name), module_level)
        elif isinstance(child, ast.ImportFrom):
            base = child.module or ""
            if child.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[:len(anchor) - (child.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in child.names:
                yield Import(_resolve(f"{base}.{alias.name}"), module_level)
        inner = module_level and not isinstance(
            child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        yield from _walk(child, module, is_package, inner, type_checking)


@cache
def imports_of(module: str, type_checking: bool = False) -> tuple[Import, ...]:
    path = sae_modules()[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    return tuple(_walk(tree, module, path.name == "__init__.py", True, type_checking))


def _parents(module: str) -> list[str]:
    """Importing ``sae.a.b`` first imports ``sae`` and ``sae.a``."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def loaded_at_import(module: str) -> set[str]:
    """Every module (sae or external, top-level name too) that importing ``module`` loads."""
    seen: set[str] = set()
    todo = [*_parents(module), module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if current in sae_modules():
            for imp in imports_of(current):
                if imp.module_level:
                    todo.extend([*_parents(imp.target), imp.target])
    return seen


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def dependency_graph(type_checking: bool = False) -> dict[str, set[str]]:
    return {m: {i.target for i in imports_of(m, type_checking)
                if i.target in sae_modules() and i.target != m}
            for m in sae_modules()}


# ---------------------------------------------------------------- the contract

def test_the_walk_finds_the_layers():
    modules = sae_modules()
    for name in ("sae.model", "sae.identity", "sae.io", "sae.report", "sae.tracking"):
        assert name in modules
    assert any(within(m, ("sae.regularizers",)) for m in modules)
    assert any(within(m, ("sae.metrics",)) for m in modules)


@pytest.mark.parametrize("module", [m for m in sae_modules() if within(m, PURE_LAYERS)])
def test_pure_layers_import_no_training_config_hydra_or_wandb(module):
    bad = sorted({i.target for i in imports_of(module) if within(i.target, NOT_IN_PURE_LAYERS)})
    assert not bad, f"{module} imports {bad}: the model, regularizers and metrics stay below them"


@pytest.mark.parametrize("module", FOUNDATION)
def test_the_foundation_imports_only_itself(module):
    above = sorted({i.target for i in imports_of(module)
                    if within(i.target, ("sae",)) and not within(i.target, FOUNDATION)
                    and i.target not in REGISTRY})
    assert not above, f"{module} imports {above}: dependencies point down (DESIGN.md)"


def test_only_tracking_imports_wandb_and_nothing_imports_submitit():
    wandb = sorted(m for m in sae_modules()
                   if any(within(i.target, ("wandb",)) for i in imports_of(m)))
    assert wandb == ["sae.tracking"]
    submitit = sorted(m for m in sae_modules()
                      if any(within(i.target, ("submitit",)) for i in imports_of(m)))
    assert submitit == [], "only Hydra's submitit launcher plugin touches submitit"


@pytest.mark.parametrize("module", TORCH_FREE)
def test_torch_free_at_import(module):
    loaded = loaded_at_import(module)
    torch_via = sorted(m for m in loaded if within(m, TORCH))
    assert not torch_via, f"importing {module} loads {torch_via}"


def test_report_and_reporting_are_torch_free():
    for module in [m for m in sae_modules() if within(m, ("sae.reporting",))]:
        assert not [m for m in loaded_at_import(module) if within(m, TORCH)], module


@pytest.mark.parametrize("type_checking", [False, True], ids=["runtime", "with-TYPE_CHECKING"])
def test_no_import_cycles(type_checking):
    """Counting the imports of ``if TYPE_CHECKING:`` blocks too: an annotation that names a
    higher layer is a cycle in the design, even if it never runs."""
    cycle = find_cycle(dependency_graph(type_checking))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# ---------------------------------------------------------------- the checker can fail

def test_checker_finds_a_cycle_and_a_torch_import(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"
              "import numpy\nfrom .io import x\ndef f():\n    import wandb\n")
    found = list(_walk(ast.parse(source), "sae.identity", False, True))
    assert Import("numpy", True) in found and Import("wandb", False) in found
    assert Import("sae.io", True) in found  # relative import resolved to the module
    assert not any(i.target == "torch" for i in found)  # TYPE_CHECKING never runs
    strict = list(_walk(ast.parse(source), "sae.identity", False, True, type_checking=True))
    assert Import("torch", False) in strict  # ... but names a dependency


def test_import_sae_report_leaves_torch_out():
    """The real interpreter agrees with the static check."""
    code = ("import sys, sae.report, sae.identity, sae.grid.sweep\n"
            "import hydra_plugins.sae_sweeper.sae_sweeper\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
