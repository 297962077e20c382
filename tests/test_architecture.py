"""The package's layers, read from the code: every module's imports (at the top and inside
functions alike) go to its own layer or a lower one, no two modules import each other through
any chain, Optuna is imported only in the study layer (and the report's plots), MLflow only in
the tracking layer, and ARCHITECTURE.md names every module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "harness"
# Lowest first: a module may import its own layer and those before it, never one after it.
LAYERS = ("config", "infra", "data", "core", "tracking", "reports", "study", "cli")


def _name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    """harness.LAYER[.module]; the package itself and harness.cli are the top, 'cli'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS[:-1] else "cli"


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, wherever the import statement is, but inside an
    `if TYPE_CHECKING:` block (annotations only: nothing is imported when the code runs)."""
    tree = ast.parse(path.read_text(), str(path))
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


MODULES = {_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
INTERNAL = {
    name: {m for m in _imports(path) if m in MODULES and m != name and m != "harness"}
    for name, path in MODULES.items()
}


def test_every_module_is_in_a_layer():
    stray = [m for m in MODULES if _layer(m) not in LAYERS]
    assert not stray, f"modules outside the layers {LAYERS}: {stray}"


def test_no_module_imports_a_higher_layer():
    up = [
        f"{m} ({_layer(m)}) imports {i} ({_layer(i)})"
        for m, imported in INTERNAL.items()
        for i in sorted(imported)
        if LAYERS.index(_layer(i)) > LAYERS.index(_layer(m))
    ]
    assert not up, "imports that go up a layer:\n" + "\n".join(up)


def test_no_import_circle():
    """Tarjan's strongly connected components: a component of two or more is a circle."""
    index, low, stack, on, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(INTERNAL[v] - {p for p in INTERNAL[v] if p not in INTERNAL}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(INTERNAL):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


@pytest.mark.parametrize(
    ("library", "layers", "modules"),
    [("optuna", {"study"}, {"harness.reports.plots"}), ("mlflow", {"tracking"}, set())],
)
def test_each_library_lives_in_its_layer(library, layers, modules):
    outside = [
        m
        for m, path in MODULES.items()
        if any(i.split(".")[0] == library for i in _imports(path))
        and _layer(m) not in layers
        and m not in modules
    ]
    assert not outside, f"{library} imported outside {sorted(layers | modules)}: {outside}"


def test_tag_names_are_spelled_only_in_their_home():
    """Every run tag and trial attribute name is `Tag.X` (harness/config/tags.py); a literal
    "harness.x" elsewhere in the package (but a module's dotted name) would drift from it."""
    literal = re.compile(r"^(harness|optuna|mlflow)\.[A-Za-z_.]+$")
    spelled = [
        f"{m}: {node.value!r}"
        for m, path in MODULES.items()
        if m != "harness.config.tags"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and literal.match(node.value)
        and node.value not in MODULES
        and node.value not in ("optuna.journal", "mlflow.db")  # file names
    ]
    assert not spelled, "tag names outside harness/config/tags.py: " + ", ".join(spelled)


def _code_strings(tree: ast.AST) -> list[str]:
    """The string literals of a module's code, docstrings left out (they may show examples)."""
    docs = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
    ]


def test_weight_files_are_named_only_in_their_home():
    """Only harness/core/checkpoints.py builds a .pt/.pth path, globs for one, or saves or loads
    one with torch: a checkpoint's name, place or format written twice would drift."""
    weights = re.compile(r"\.pth?\b")
    found = []
    for m, path in MODULES.items():
        if m == "harness.core.checkpoints":
            continue
        tree = ast.parse(path.read_text())
        found += [f"{m}: {v!r}" for v in _code_strings(tree) if weights.search(v)]
        found += [
            f"{m}: torch.{node.func.attr}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("save", "load")
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "torch"
        ]
    assert not found, "weight files outside harness/core/checkpoints.py: " + ", ".join(found)


def test_architecture_md_names_every_module():
    text = (REPO / "ARCHITECTURE.md").read_text()
    missing = [
        str(p.relative_to(REPO))
        for p in MODULES.values()
        if p.name != "__init__.py" or p.parent == PACKAGE
        if str(p.relative_to(REPO)) not in text
    ]
    assert not missing, f"ARCHITECTURE.md does not name: {missing}"


def test_every_file_is_under_500_lines():
    long = {
        str(p.relative_to(REPO)): n
        for p in [*PACKAGE.rglob("*.py"), *(REPO / "tests").glob("*.py")]
        if (n := len(p.read_text().splitlines())) >= 500
    }
    assert not long, f"files of 500 lines or more: {long}"
