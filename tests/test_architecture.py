"""The shape of the code: which package may import which, no cycles, no private names across packages, files a
reader can hold in their head. Read from the source with `ast` (nothing is imported), so it stays true as the
code grows.

The arrows (DESIGN.md section 1):
- `models/` never imports `data/`, `train/`, the tracking/registry package or MLflow: the network knows tensors;
- `evaluate/` and `pipeline.py` never import `data/` (the dataset's tensor helpers aside) nor `train/`;
- `data/` stages never import `models/`: faces come from `faces/`, which imports neither;
- `media/` and `config.py` import nothing of the project above them;
- nothing in `singer/` imports `flows/`.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 450


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    files = sorted((ROOT / "singer").rglob("*.py")) + sorted((ROOT / "flows").rglob("*.py"))
    return {_module_name(p): p for p in files}


SOURCES = _sources()


def _is_package(name: str) -> bool:
    return SOURCES.get(name, Path()).name == "__init__.py"


def _package_of(name: str) -> str:
    """The package a module lives in (a package's own `__init__` lives in itself)."""
    return name if _is_package(name) else name.rpartition(".")[0]


def _imports(name: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import in the module, at any depth (a
    function-level import is an arrow too). `from pkg import sub` is an import of the module `pkg.sub`."""
    tree = ast.parse(SOURCES[name].read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = _package_of(name).split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                if sub in SOURCES:
                    out.append((sub, None, node.lineno))
                else:
                    out.append((module, alias.name, node.lineno))
    return out


def _project_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for name in SOURCES:
        for module, _, _ in _imports(name):
            if module in SOURCES and module != name:
                edges[name].add(module)
    return edges


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one node."""
    nodes = sorted(set(edges) | {w for ws in edges.values() for w in ws})
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in nodes:
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles():
    """Between modules, and between the packages of `singer/` (`singer.train` -> `singer.release` ->
    `singer.train` is a circle even when no two modules import each other)."""
    edges = _project_edges()
    assert not _cycles(edges), f"modules that import each other (directly or around a loop): {_cycles(edges)}"
    packages: dict[str, set[str]] = defaultdict(set)
    for a, targets in edges.items():
        for b in targets:
            pa, pb = ".".join(a.split(".")[:2]), ".".join(b.split(".")[:2])
            if pa != pb and pb != "singer":  # `singer` itself is the lazy class map, importing nothing
                packages[pa].add(pb)
    assert not _cycles(packages), f"packages that import each other: {_cycles(packages)}"


def test_no_private_names_across_packages():
    found = []
    for name in SOURCES:
        for module, imported, line in _imports(name):
            private = imported is not None and imported.startswith("_") and not imported.startswith("__")
            if private and module in SOURCES and _package_of(module) != _package_of(name):
                found.append(f"{SOURCES[name].relative_to(ROOT)}:{line} imports {module}.{imported}")
    assert not found, "a leading underscore means 'not part of the API': " + "; ".join(found)


# (importer prefix, forbidden prefix, allowed exceptions)
FORBIDDEN = [
    ("singer.models", "singer.data", ()),
    ("singer.models", "singer.train", ()),
    ("singer.models", "singer.release", ()),
    ("singer.models", "mlflow", ()),
    ("singer.evaluate", "singer.data", ("singer.data.dataset",)),
    ("singer.evaluate", "singer.train", ()),
    ("singer.pipeline", "singer.data", ("singer.data.dataset",)),
    ("singer.data", "singer.models", ()),
    ("singer.faces", "singer.data", ()),
    ("singer.faces", "singer.models", ()),
    ("singer", "flows", ()),
]


@pytest.mark.parametrize(("importer", "forbidden", "allowed"), FORBIDDEN, ids=[f"{a} -/-> {b}" for a, b, _ in FORBIDDEN])
def test_forbidden_arrows(importer, forbidden, allowed):
    found = []
    for name in SOURCES:
        if not _under(name, importer):
            continue
        for module, _, line in _imports(name):
            if _under(module, forbidden) and not any(_under(module, a) for a in allowed):
                found.append(f"{SOURCES[name].relative_to(ROOT)}:{line} imports {module}")
    assert not found, "; ".join(found)


@pytest.mark.parametrize("low", ["singer.media", "singer.config"])
def test_low_layers_import_nothing_above_them(low):
    found = []
    for name in SOURCES:
        if not _under(name, low):
            continue
        for module, _, line in _imports(name):
            if _under(module, "singer") and not (_under(module, low) or module == "singer.io"):
                found.append(f"{SOURCES[name].relative_to(ROOT)}:{line} imports {module}")
    assert not found, "; ".join(found)


def test_files_fit_in_a_head():
    long = {str(p.relative_to(ROOT)): n for p in SOURCES.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines (split by concern): {long}"


def test_the_walker_sees_imports():
    """The checks above are only as good as the import walk: it must see module-level, function-level and
    `from package import module` imports."""
    runner = {module for module, _, _ in _imports("singer.evaluate.runner")}
    assert "singer.config" in runner  # module level
    assert any(_under(m, "singer.evaluate.metrics") for m in runner)  # inside a function
    assert "singer.evaluate.metrics.bas" in {m for m, _, _ in _imports("singer.evaluate.metrics")}  # from pkg import mod
