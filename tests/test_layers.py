"""The packages form layers whose imports point one way (read from the source, not from imports at run time):
common imports nothing of the project, data_gen only common, the model layer (vlm) only those two, the
experiments sit above, figures read results through the small plotting modules only. No project import hides
inside a function (the usual way to dodge a cycle)."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# package -> the project packages it may import
ALLOWED = {
    "common": set(),
    "data_gen": {"common"},
    "vlm": {"common", "data_gen"},
    "accuracy": {"common", "data_gen", "vlm"},
    "patching": {"common", "data_gen", "vlm", "accuracy"},
    "probing": {"common", "data_gen", "vlm"},
    "steering": {"common", "data_gen", "vlm", "probing"},
    "organisms": {"common", "data_gen", "vlm", "accuracy"},
    "runner": {"common", "data_gen", "vlm"},
}
PROJECT = set(ALLOWED) | {"figures", "tests"}
# what a figure's plot.py may import: results I/O and the plotting modules, which themselves read results only
PLOTTING = {"common.results", "patching.plots", "probing.plots"}


def python_files(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, whether the import sits inside a function) for every import of `path`."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                found.extend((alias.name, inside) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module, inside))
            visit(child, inside)

    visit(tree, False)
    return found


def project_imports(path: Path):
    return [(module, inside) for module, inside in imports(path) if module.split(".")[0] in PROJECT]


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_layers_below_it(package):
    wrong = [f"{path.relative_to(REPO)} imports {module}"
             for path in python_files(package) for module, _ in project_imports(path)
             if module.split(".")[0] not in ALLOWED[package] | {package}]
    assert not wrong, wrong


@pytest.mark.parametrize("package", sorted(ALLOWED) + ["figures"])
def test_no_project_import_inside_a_function(package):
    hidden = [f"{path.relative_to(REPO)} imports {module} inside a function"
              for path in python_files(package) for module, inside in project_imports(path) if inside]
    assert not hidden, hidden


def test_figures_read_results_only():
    for path in python_files("figures"):
        for module, _ in project_imports(path):
            assert module in PLOTTING, f"{path.relative_to(REPO)} imports {module}"
    for module in PLOTTING - {"common.results"}:
        path = REPO / (module.replace(".", "/") + ".py")
        assert {m for m, _ in project_imports(path)} <= {"common.results"}, path


def test_every_package_is_known_to_this_test():
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")}
    assert packages == set(ALLOWED), packages
