"""The floors of the package: which module imports which, read from the source (function-level imports included)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mergemodules

PACKAGE = Path(mergemodules.__file__).parent
# The floors, bottom first (docs/architecture.md explains them): a module imports only modules on lower floors.
FLOORS = [
    ("primitives", ["files", "layouts", "lapack", "batches", "streams", "buffers"]),
    ("formats, layers and the SVD", ["safetensors_files", "layers", "distributed", "decompose"]),
    ("reading and choosing", ["sources", "targets", "tta_checkpoint"]),
    ("the method description", ["methods.base"]),
    ("transforms", ["methods.awd", "methods.ties", "methods.tsv"]),
    ("the method registry", ["methods"]),
    ("building and adapting", ["build", "masks", "transform_state", "tta"]),
    ("whole models", ["surgery", "streaming", "plotting"]),
    ("writing", ["export", "merge_state", "recipe", "deprecated"]),
    ("entry points", ["cli", "io", ""]),
]
FLOOR_OF = {f"mergemodules.{m}".rstrip("."): i for i, (_, modules) in enumerate(FLOORS) for m in modules}


def module_names() -> dict[str, Path]:
    """Dotted module name → file, the package itself included."""
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its file, but under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(block.test) for node in ast.walk(block)}
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                if node.level else node.module
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {m for m in found if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def floors(edges: dict[str, set[str]]) -> dict[str, int]:
    """Module → its floor (0: imports nothing of the package); a circle is an AssertionError naming it."""
    floor: dict[str, int] = {}

    def visit(name: str, path: tuple[str, ...]) -> int:
        assert name not in path, "import circle: " + " -> ".join(path[path.index(name):] + (name,))
        if name not in floor:
            floor[name] = 1 + max((visit(d, path + (name,)) for d in edges[name]), default=-1)
        return floor[name]

    for name in edges:
        visit(name, ())
    return floor


def test_the_package_has_no_import_circle():
    floor = floors(graph())
    assert floor["mergemodules.files"] == 0 and floor["mergemodules.cli"] > floor["mergemodules.merge_state"]


def test_every_module_stands_on_one_stated_floor():
    assert sorted(FLOOR_OF) == sorted(module_names()) and len(FLOOR_OF) == sum(len(m) for _, m in FLOORS)


@pytest.mark.parametrize("module", sorted(FLOOR_OF))
def test_no_import_runs_up_a_floor(module):
    upward = {dep: FLOORS[FLOOR_OF[dep]][0] for dep in graph()[module] if FLOOR_OF[dep] >= FLOOR_OF[module]}
    assert not upward, f"{module} ({FLOORS[FLOOR_OF[module]][0]}) imports from its floor or above: {upward}"


def test_the_files_floor_imports_nothing_of_the_package():
    edges = graph()
    assert edges["mergemodules.files"] == set()
    assert edges["mergemodules.safetensors_files"] == {"mergemodules.files"}


@pytest.mark.parametrize("module", [
    "mergemodules.sources", "mergemodules.masks", "mergemodules.tta", "mergemodules.tta_checkpoint",
    "mergemodules.methods", "mergemodules.methods.awd", "mergemodules.build",
])
def test_lower_floors_do_not_import_the_exporters(module):
    edges = graph()
    exporters = {"mergemodules.export", "mergemodules.merge_state", "mergemodules.io", "mergemodules.surgery"}
    reached, todo = set(), [module]
    while todo:
        for dep in edges[todo.pop()] - reached:
            reached.add(dep)
            todo.append(dep)
    assert not reached & exporters


def test_the_circle_finder_finds_circles():
    with pytest.raises(AssertionError, match="import circle: a -> b -> a"):
        floors({"a": {"b"}, "b": {"a"}})
