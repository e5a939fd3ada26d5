"""The packages' layering: what each may import (lazy imports inside functions included), no import circles,
and the two packages that must stay free of Ray."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ALLOWED = {  # package -> the packages it may import; the arrows of docs/architecture.md
    "search": set(),
    "dataset": {"search"},
    "cluster": {"search"},
    "modelkit": {"search"},
    "actors": {"search", "dataset", "cluster"},
    "bench": {"search", "dataset", "cluster", "actors", "modelkit"},
    "deploy": {"search", "dataset", "cluster", "actors", "modelkit", "bench"},
}


def _modules() -> dict[str, Path]:
    return {".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): path
            for package in ALLOWED for path in (REPO / package).rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that ``path`` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {name for name in names if name in modules}
    return found


GRAPH = {name: _imports(path, _modules()) for name, path in _modules().items()}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_each_module_imports_only_the_packages_below_it(module):
    package = module.split(".")[0]
    upward = {m for m in GRAPH[module] if m.split(".")[0] not in ALLOWED[package] | {package}}
    assert not upward, f"{module} imports {sorted(upward)}"


def test_no_import_circles():
    """A depth-first search over the module graph (a module's package ``__init__`` counts as imported)."""
    def edges(module):
        parents = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        return (GRAPH[module] | {p for m in GRAPH[module] for p in _parents(m)}) - {module} - parents

    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(edges(module)):
            if state.get(target) == "open":
                circle = stack[stack.index(target):] + [target]
                pytest.fail("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def _parents(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))} & set(GRAPH)


@pytest.mark.parametrize("package, banned", [
    ("search", ("ray", "vllm", "pyarrow", "pydantic", "torch", "transformers")),
    ("dataset.writer, dataset.reader, dataset.exports, dataset.records", ("ray", "vllm", "torch")),
])
def test_pure_packages_load_no_heavy_dependencies(package, banned):
    code = f"import sys, {package}; print(sorted(m for m in {banned!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
