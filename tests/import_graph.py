"""hubquant's import graph, read from the source (no import runs): every `import` and `from ... import`
of every module, the ones inside functions included, the ones under `if TYPE_CHECKING:` left out
(they never run). Used by tests/test_imports.py.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_folders() -> dict[str, str]:
    """setup.py's FOLDERS: the package's folders by installed name (read, not run as __main__)."""
    spec = importlib.util.spec_from_file_location("hubquant_setup", ROOT / "setup.py")
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    return setup.FOLDERS


FOLDERS = _setup_folders()


@dataclass(frozen=True)
class Import:
    """One import statement's target, where it is, and whether it runs when the module loads."""

    source: str  # the importing module
    target: str  # the imported module (an internal one, or a top-level external name)
    path: Path
    line: int
    in_function: bool

    def where(self) -> str:
        return f"{self.path.relative_to(self.path.parents[1])}:{self.line}"


def modules(root: Path = ROOT, folders: dict[str, str] = FOLDERS) -> dict[str, Path]:
    """Module name -> file for every .py file under the folders (packages by their `__init__.py`)."""
    found = {}
    for name, folder in folders.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            if "__pycache__" in parts or any(p.startswith(".") for p in parts):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((name, *parts))] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Walker(ast.NodeVisitor):
    def __init__(self) -> None:
        self.found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []
        self.depth = 0

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:  # `else:` of TYPE_CHECKING runs
                self.visit(child)
            return
        self.generic_visit(node)

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        self.found.append((node, self.depth > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.found.append((node, self.depth > 0))


def lazy_names(package: str, path: Path) -> dict[str, str]:
    """A package's lazily resolved names (its `_LAZY` table: name -> defining module, PEP 562)."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        if isinstance(target, ast.Name) and target.id == "_LAZY" and node.value is not None:
            table = ast.literal_eval(node.value)
            return {k: v if v.startswith("hubquant") else f"{package}.{v}" for k, v in table.items()}
    return {}


def _resolve(name: str, path: Path, known: dict[str, Path], node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules one import statement loads (internal ones by full name, external by top name).
    `from package import name` of a lazily resolved name loads the module that defines it."""
    if isinstance(node, ast.Import):
        return [_nearest(alias.name, known) for alias in node.names]
    if node.level:
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    targets = []
    for alias in node.names:
        # `from pkg import submodule` loads the submodule; `from pkg import name` loads pkg.
        sub = f"{base}.{alias.name}"
        lazy = lazy_names(base, known[base]).get(alias.name) if base in known else None
        targets.append(sub if sub in known else lazy or _nearest(base, known))
    return targets


# Parts of a third-party package that importing the package leaves unloaded and that take long to
# load on their own: each counts as a package of its own (inductor: a second, on first use only).
HEAVY_SUBPACKAGES = ("torch._inductor",)


def _nearest(dotted: str, known: dict[str, Path]) -> str:
    """An internal module by its longest known prefix, or an external one by its top-level name
    (or its heavy subpackage's name)."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return ".".join(parts[:end])
    for heavy in HEAVY_SUBPACKAGES:
        if dotted == heavy or dotted.startswith(heavy + "."):
            return heavy
    return parts[0]


def imports(root: Path = ROOT, folders: dict[str, str] = FOLDERS) -> list[Import]:
    """Every import statement that can run, of every module under the folders."""
    known = modules(root, folders)
    found = []
    for name, path in known.items():
        walker = _Walker()
        walker.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        for node, in_function in walker.found:
            for target in _resolve(name, path, known, node):
                if target != name:
                    found.append(Import(name, target, path, node.lineno, in_function))
    return found


def cycles(edges: list[Import]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:  # recursion depth is the module count: a few dozen
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def third_party_at_load(edges: list[Import], known: dict[str, Path]) -> dict[str, set[str]]:
    """For every module, the third-party packages importing it loads (its module-level imports,
    followed through hubquant's own modules)."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        if not edge.in_function:
            graph.setdefault(edge.source, set()).add(edge.target)
    loads: dict[str, set[str]] = {}

    def visit(module: str, seen: set[str]) -> set[str]:
        if module not in known:
            return set() if module in sys.stdlib_module_names or module == "__future__" else {module}
        if module in loads:
            return loads[module]
        if module in seen:  # a cycle (test_imports fails on it separately)
            return set()
        found: set[str] = set()
        for target in graph.get(module, ()):
            found |= visit(target, seen | {module})
        loads[module] = found
        return found

    for module in known:
        visit(module, set())
    return loads


def needless_function_imports(edges: list[Import], known: dict[str, Path]) -> list[Import]:
    """Imports inside functions that load no third-party package the module has not loaded already:
    they hide the graph and save nothing. (One that keeps torch out of `--help`, or an optional
    library out of a module that works without it, loads something new and is kept.)"""
    loads = third_party_at_load(edges, known)

    def brings(target: str) -> set[str]:
        if target in known:
            return loads[target]
        return set() if target in sys.stdlib_module_names or target == "__future__" else {target}

    return [e for e in edges if e.in_function and not brings(e.target) - loads[e.source]]
