"""detkit's import graph, read from the source (every ``import`` statement, inside functions too): no cycles among
detkit's modules or bench's, the weights package sits below models and engine, and ``models/`` imports none of the
layers above it (``../shared/DESIGN.md`` section 2)."""

from __future__ import annotations

import ast
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODELS_MAY_NOT_IMPORT = ("detkit.engine", "detkit.config", "detkit.convert", "detkit.weights", "detkit.predict",
                         "detkit.cli", "detkit.loading")
WEIGHTS_MAY_IMPORT = ("detkit.errors", "detkit.registry", "detkit.data.classes", "detkit.weights")


def module_name(path: Path, root: Path) -> str:
    """``root/detkit/weights/io.py`` -> ``detkit.weights.io``; a package's ``__init__.py`` is the package."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path, root: Path) -> set[str]:
    """Every dotted name an import statement of ``path`` names (``from a import b`` gives ``a.b``: the module ``a.b``
    where there is one, else ``a`` itself), relative imports resolved against the file's package."""
    own = module_name(path, root)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same tree it imports (a name resolves to its longest module prefix)."""
    root = package_dir.parent
    paths = {module_name(p, root): p for p in sorted(package_dir.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        targets = set()
        for name in imported_names(path, root):
            while name and name not in paths:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as e:
        return list(e.args[1])
    return None


def test_the_cycle_finder_finds_a_cycle_through_an_import_inside_a_function(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("def late():\n    from ..a import thing\n")
    (package / "c.py").write_text("import pkg.a\n")
    graph = import_graph(package)
    assert graph == {"pkg": set(), "pkg.sub": set(), "pkg.a": {"pkg.sub.b"}, "pkg.sub.b": {"pkg.a"}, "pkg.c": {"pkg.a"}}
    assert set(find_cycle(graph) or []) == {"pkg.a", "pkg.sub.b"}
    (package / "sub" / "b.py").write_text("def late():\n    from .. import c\n")  # b -> c -> a -> b
    assert set(find_cycle(import_graph(package)) or []) == {"pkg.a", "pkg.sub.b", "pkg.c"}
    (package / "sub" / "b.py").write_text("from pkg import sub\n")  # a module importing its own package: no cycle
    assert find_cycle(import_graph(package)) is None


@pytest.mark.parametrize("tree", ["detkit", "bench"])
def test_no_import_cycles(tree):
    graph = import_graph(REPO / tree)
    assert len(graph) > 5
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_models_import_no_layer_above_them():
    root = REPO
    for path in sorted((REPO / "detkit" / "models").rglob("*.py")):
        bad = sorted(m for m in imported_names(path, root) if m.startswith(MODELS_MAY_NOT_IMPORT))
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_weights_sit_below_models_and_engine():
    for path in sorted((REPO / "detkit" / "weights").rglob("*.py")):
        names = imported_names(path, REPO)
        bad = sorted(m for m in names if m.split(".")[0] == "detkit" and not m.startswith(WEIGHTS_MAY_IMPORT))
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"
        third_party = {m.split(".")[0] for m in names} - {"detkit", "torch", "omegaconf", "yaml", "__future__"}
        assert third_party <= set(sys.stdlib_module_names), f"{path.relative_to(REPO)}: {third_party}"
