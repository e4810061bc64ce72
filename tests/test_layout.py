"""The package's layering, read from its import statements (ARCHITECTURE: a house with room for many methods):
the math core is pure torch, the trainer never names a method, methods never reach a family, nothing imports
upward in a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tdm

ROOT = Path(tdm.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        name = ".".join(("tdm", *p.relative_to(ROOT).with_suffix("").parts))
        out[name.removesuffix(".__init__")] = p
    return out


def _imports(name: str, path: Path, top_level_only: bool) -> set[str]:
    """Absolute names of what `name` imports (modules, and `package.name` for names imported from a package)."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    nodes = ast.parse(path.read_text()).body if top_level_only else list(ast.walk(ast.parse(path.read_text())))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


MODULES = _modules()


def _edges(top_level_only: bool) -> dict[str, set[str]]:
    return {m: {i for i in _imports(m, p, top_level_only) if i in MODULES and i != m} for m, p in MODULES.items()}


def test_the_core_is_pure_torch():
    for m, p in MODULES.items():
        if m.startswith("tdm.core"):
            imports = _imports(m, p, top_level_only=False)
            assert not {i for i in imports if i.startswith("tdm") and not i.startswith("tdm.core")}, m
            assert not {i.split(".")[0] for i in imports} & {"diffusers", "accelerate", "peft", "transformers"}, m


@pytest.mark.parametrize("who, never", [
    ("tdm.trainer", ("tdm.methods.tdm", "tdm.methods.dmd2", "tdm.methods.consistency")),  # methods by registry only
    ("tdm.methods", ("tdm.families", "tdm.trainer", "tdm.eval")),
    ("tdm.families", ("tdm.trainer", "tdm.methods.tdm", "tdm.methods.dmd2", "tdm.methods.consistency",
                      "tdm.eval.evaluate")),
    ("tdm.export", ("tdm.eval", "tdm.trainer")),
])
def test_who_never_imports_what(who, never):
    for m, p in MODULES.items():
        if m == who or m.startswith(who + "."):
            bad = {i for i in _imports(m, p, top_level_only=False) for n in never if i == n or i.startswith(n + ".")}
            assert not bad, (m, bad)


def test_no_import_cycles_at_module_level():
    edges, state, cycles = _edges(top_level_only=True), {}, []

    def visit(u, stack):
        state[u] = "open"
        for v in edges[u]:
            if state.get(v) == "open":
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v, stack + [v])
        state[u] = "done"

    for m in MODULES:
        if m not in state:
            visit(m, [m])
    assert not cycles
