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
PLOTTING = {"common.results", "common.cli", "patching.plots", "probing.plots"}   # common.cli: the one plot parser


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
    for module in PLOTTING:
        path = REPO / (module.replace(".", "/") + ".py")
        imported = {m for m, _ in project_imports(path)}
        assert all(m.split(".")[0] == "common" for m in imported), (path, imported)   # no model, no experiment


def test_every_package_is_known_to_this_test():
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")}
    assert packages == set(ALLOWED), packages


# --- a family's quirks live in its adapter; hooks live in the intervention layer --------------------------------

CODE_DIRS = [name for name in sorted(ALLOWED) if name != "tests"] + ["figures", "scripts"]


def code_words(path: Path) -> set[str]:
    """The lowercase identifiers and string literals of `path`'s code: names, attributes, strings that are not
    docstrings; comments and docstrings are prose and may name a model."""
    import io
    import tokenize

    tree = ast.parse(path.read_text())
    docstrings = {node.body[0].value.lineno for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant) and isinstance(node.body[0].value.value, str)}
    words = set()
    for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if token.type == tokenize.NAME or (token.type == tokenize.STRING and token.start[0] not in docstrings):
            words.add(token.string.lower())
    return words


def test_family_names_appear_in_code_only_in_their_adapters_and_configs():
    """No code outside vlm/adapters/ names a family (its adapter's `name`) or a family's model class: a family's
    quirks are its adapter's methods and its configs' data (configs/family/<name>.yaml)."""
    from vlm.adapters import ADAPTERS

    names = set(ADAPTERS) | {adapter.model_class.__name__.lower() for adapter in ADAPTERS.values()}
    offending = []
    for directory in CODE_DIRS:
        for path in sorted((REPO / directory).rglob("*.py")):
            if path.is_relative_to(REPO / "vlm" / "adapters"):
                continue
            words = code_words(path)
            hits = sorted(name for name in names if any(name in word for word in words))
            if hits:
                offending.append(f"{path.relative_to(REPO)}: {', '.join(hits)}")
    assert not offending, offending


def test_forward_hooks_are_installed_by_the_intervention_layer_only():
    hooking = sorted(str(path.relative_to(REPO)) for directory in CODE_DIRS
                     for path in (REPO / directory).rglob("*.py")
                     if "register_forward_hook" in path.read_text() or "register_forward_pre_hook" in path.read_text())
    assert hooking == ["vlm/interventions.py"]
