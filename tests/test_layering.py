"""The layering rules of docs/architecture.md, checked on the source (no imports executed).

- runtime/ never imports compiler/;
- compiler/ imports from the runtime only runtime.contract (its CLI package may call runtime
  entry points);
- runtime.contract imports only the standard library, pydantic and itself;
- runtime.stages import only runtime.core and runtime.contract; runtime.core never imports the
  stages or the entry modules;
- no import cycles between modules, counting imports inside functions;
- no private name imported from another module;
- no module over 500 lines.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("compiler", "runtime")
MAX_LINES = 500
ENTRY_MODULES = {"runtime.train", "runtime.evaluate", "runtime.chat", "runtime.report"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))
            if "_data" not in p.parts}


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    is_package = MODULES[module].name == "__init__.py"
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import in the module, at any depth."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            names = [alias.name for alias in node.names]
            # `from runtime import checkpoint` imports the module runtime.checkpoint
            submodules = [n for n in names if f"{target}.{n}" in MODULES]
            found += [(f"{target}.{n}", [], node.lineno) for n in submodules]
            rest = [n for n in names if n not in submodules]
            if rest or not submodules:
                found.append((target, rest, node.lineno))
    return found


def _internal(name: str) -> str | None:
    """The project module an import refers to (the longest known prefix), or None if external."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in MODULES:
            return candidate
    return None


GRAPH = {m: [(t, names, line) for t, names, line in _imports(m)] for m in MODULES}


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _violations(rule, graph=None) -> list[str]:
    graph = GRAPH if graph is None else graph
    return [f"{m}:{line}: imports {t}" for m, edges in graph.items() for t, _, line in edges if rule(m, t)]


def test_runtime_never_imports_the_compiler() -> None:
    assert _violations(lambda m, t: _within(m, "runtime") and _within(t, "compiler")) == []


def test_the_compiler_imports_only_the_runtime_contract() -> None:
    def bad(m: str, t: str) -> bool:
        if not (_within(m, "compiler") and _within(t, "runtime")) or _within(t, "runtime.contract"):
            return False
        return not (_within(m, "compiler.cli") and _internal(t) in ENTRY_MODULES | {"runtime.core.model"})
    assert _violations(bad) == []


def test_the_contract_imports_only_the_standard_library_and_pydantic() -> None:
    allowed = set(sys.stdlib_module_names) | {"pydantic", "__future__"}

    def bad(m: str, t: str) -> bool:
        if not _within(m, "runtime.contract"):
            return False
        if _internal(t) is not None:
            return not _within(t, "runtime.contract")
        return t.split(".")[0] not in allowed
    assert _violations(bad) == []


def test_stages_are_leaves_over_core_and_contract() -> None:
    def stage_bad(m: str, t: str) -> bool:
        inner = _internal(t)
        return (_within(m, "runtime.stages") and inner is not None and not _within(inner, "runtime.stages")
                and not _within(inner, "runtime.core") and not _within(inner, "runtime.contract"))

    def core_bad(m: str, t: str) -> bool:
        inner = _internal(t)
        return _within(m, "runtime.core") and inner is not None and (
            _within(inner, "runtime.stages") or inner in ENTRY_MODULES)
    assert _violations(stage_bad) == []
    assert _violations(core_bad) == []


def test_no_import_cycles() -> None:
    edges = {m: sorted({i for t, _, _ in GRAPH[m] if (i := _internal(t)) is not None and i != m}) for m in MODULES}
    # a package's __init__ importing its own submodules is how a package is assembled, not a cycle
    # between ideas; every other edge counts
    cycles, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for n in edges[m]:
            if state.get(n) == "open":
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(MODULES):
        if m not in state:
            visit(m)
    assert cycles == []


def test_no_private_name_is_imported_from_another_module() -> None:
    found = [f"{MODULES[m].relative_to(REPO)}:{line}: {n} from {t}" for m, edges in GRAPH.items()
             for t, names, line in edges if _internal(t) is not None for n in names
             if n.startswith("_") and not n.startswith("__")]
    assert found == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_over_500_lines(module: str) -> None:
    n = len(MODULES[module].read_text().splitlines())
    assert n <= MAX_LINES, f"{MODULES[module].relative_to(REPO)} has {n} lines"


def test_the_checker_sees_a_violation() -> None:
    """A function-level import of the compiler inside the runtime is found and reported."""
    tree = ast.parse("def f():\n    from compiler.loading.loader import load_recipe\n")
    found = [(n.module, [a.name for a in n.names], n.lineno) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    graph = {"runtime.core.model": found}
    assert _violations(lambda m, t: _within(m, "runtime") and _within(t, "compiler"), graph) == [
        "runtime.core.model:2: imports compiler.loading.loader"]
    assert len(MODULES) > 40  # the scan found the packages
