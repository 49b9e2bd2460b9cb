"""The import rule (DESIGN.md, "The import rule"): imports point down, nothing is circular.

Five layers, lowest first: leaves -> hessian -> engine -> recipe -> apps. A module may import
its own layer and the ones below, never one above; and no two modules may import each
other, directly or round a circle, inside a layer too. Every import counts: at the top, in
a function (a lazy import), under ``if TYPE_CHECKING``, absolute or relative. Importing a
module only runs its packages' ``__init__`` on the way; that is not counted as an import
of the package (or every module would import the apps' ``largebatch/__init__``).
"""

from __future__ import annotations

import ast
import graphlib
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "largebatch"
SOURCE = Path(__file__).resolve().parents[1] / "src" / PACKAGE

LAYERS = ("leaves", "hessian", "engine", "recipe", "apps")

#: the layer of each module, by its first name under the package; a package (a folder)
#: puts all of its modules in its layer
LAYER_OF = {
    **dict.fromkeys(("errors", "io", "checks", "figures", "inputs"), "leaves"),
    "hessian": "hessian",
    **dict.fromkeys(
        (
            "source",
            "feed",
            "sampler",
            "lr",
            "controllers",
            "meters",
            "accumulate",
            "adversarial",
            "scoring",
            "checkpoint",
            "divergence",
            "progress",
            "precision",
            "distributed",
            "parallel",
            "engine",
        ),
        "engine",
    ),
    **dict.fromkeys(
        (
            "config",
            "user_code",
            "models",
            "data",
            "build",
            "outputs",
            "interrupts",
            "scalars",
            "train",
        ),
        "recipe",
    ),
    **dict.fromkeys(
        (
            "evaluate",
            "analysis",
            "cbs",
            "compare",
            "claims",
            "report",
            "launch",
            "cli",
            "demo",
            "__main__",
        ),
        "apps",
    ),
}
#: the package's own ``__init__`` (it imports ``fit`` lazily)
ROOT_LAYER = "apps"


@dataclass(frozen=True)
class Import:
    """One import statement's reach into the package: who imports what, where."""

    source: str  # importing module, dotted ("largebatch.engine")
    target: str  # imported module, dotted
    file: str  # the importing file, relative to the package's parent
    line: int
    statement: str  # the statement as written
    names: tuple[str, ...]  # the names it takes ("*" for all; () for a plain import)

    def where(self) -> str:
        taken = f" (takes {', '.join(self.names)})" if self.names else ""
        return f"{self.file}:{self.line}: {self.statement}{taken}"


def modules(root: Path) -> dict[str, Path]:
    """Every module of the package at ``root``, by its dotted name."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found.setdefault(".".join(parts), path)  # a package wins over a module of its name
    return found


def layer_of(module: str) -> str | None:
    """The layer of the dotted ``module`` (None: not in the map)."""
    parts = module.split(".")
    if parts == [PACKAGE]:
        return ROOT_LAYER
    return LAYER_OF.get(parts[1])


def _resolve(name: str, known: set[str]) -> str:
    """The module ``name`` refers to: itself, or the nearest package above that exists."""
    while name not in known and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _one_line(statement: str) -> str:
    """An import statement written over several lines, on one."""
    line = " ".join(statement.replace("\\\n", " ").split())
    return line.replace("( ", "(").replace(", )", ")").replace(",)", ")")


def imports(root: Path) -> list[Import]:
    """Every import of the package's own modules made in the package at ``root``."""
    found = modules(root)
    known = set(found)
    result = []
    for module, path in found.items():
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text, filename=str(path))
        is_package = path.name == "__init__.py"
        here = module if is_package else module.rpartition(".")[0]
        file = path.relative_to(root.parent).as_posix()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            statement = _one_line(ast.get_source_segment(text, node) or "")
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                        target = _resolve(alias.name, known)
                        result.append(Import(module, target, file, node.lineno, statement, ()))
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the package of this module, up level - 1
                    base = here.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    name = ".".join(base + ([node.module] if node.module else []))
                else:
                    name = node.module or ""
                if name != PACKAGE and not name.startswith(PACKAGE + "."):
                    continue
                targets: dict[str, list[str]] = {}
                for alias in node.names:
                    # `from pkg import module` imports the module; `from pkg import name`
                    # imports pkg
                    sub = f"{name}.{alias.name}"
                    target = sub if sub in known else _resolve(name, known)
                    targets.setdefault(target, []).append(alias.name)
                for target, names in targets.items():
                    result.append(
                        Import(module, target, file, node.lineno, statement, tuple(names))
                    )
    return [i for i in result if i.target != i.source]


def unmapped(root: Path) -> list[str]:
    """Modules that have no layer, as lines to read."""
    return [
        f"{path.relative_to(root.parent).as_posix()}: module {module!r} has no layer; "
        "add it to LAYER_OF in tests/test_layers.py"
        for module, path in modules(root).items()
        if layer_of(module) is None
    ]


def upward(root: Path) -> list[str]:
    """Imports of a higher layer, as lines to read."""
    lines = []
    for found in imports(root):
        mine, theirs = layer_of(found.source), layer_of(found.target)
        if mine is None or theirs is None:
            continue  # reported by unmapped()
        if LAYERS.index(theirs) > LAYERS.index(mine):
            lines.append(
                f"{found.where()}: {found.source} ({mine}) imports {found.target} ({theirs})"
            )
    return lines


def _components(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of ``graph`` with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
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
    return found


def circles(root: Path) -> list[str]:
    """Circular imports, as lines to read: each circle, then the imports that make it."""
    edges = imports(root)
    graph: dict[str, set[str]] = {module: set() for module in modules(root)}
    for found in edges:
        graph[found.source].add(found.target)
    try:
        graphlib.TopologicalSorter(graph).prepare()
        return []
    except graphlib.CycleError as error:
        lines = [f"a circle: {' -> '.join(error.args[1])}"]
    for component in _components(graph):
        lines.append(f"the modules {', '.join(component)} import each other:")
        lines += [
            f"  {found.where()}: {found.source} -> {found.target}"
            for found in edges
            if found.source in component and found.target in component
        ]
    return lines


def problems(root: Path) -> list[str]:
    return [*unmapped(root), *upward(root), *circles(root)]


def test_imports_point_down_and_nothing_is_circular():
    assert SOURCE.is_dir(), SOURCE
    found = problems(SOURCE)
    assert not found, "the import rule is broken:\n" + "\n".join(found)


def _write(root: Path, files: dict[str, str]) -> Path:
    package = root / PACKAGE
    for name, text in files.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return package


def test_the_checker_finds_every_kind_of_break(tmp_path):
    package = _write(
        tmp_path,
        {
            "__init__.py": "def __getattr__(name):\n    from largebatch.train import fit\n",
            "errors.py": "class UsageError(Exception):\n    pass\n",
            "hessian/__init__.py": "from .tracker import EigenTracker\n",
            "hessian/tracker.py": "from ..errors import UsageError\nEigenTracker = 1\n",
            "engine.py": (
                "from typing import TYPE_CHECKING\n"
                "from largebatch import lr\n"
                "from largebatch.hessian import EigenTracker\n"
                "if TYPE_CHECKING:\n"
                "    from largebatch.config import TrainConfig, load\n"
            ),
            "lr.py": "def f():\n    import largebatch.sampler\n",
            "sampler.py": "from . import lr\n",
            "config.py": "from largebatch import errors\n",
            "train.py": "from largebatch.engine import *\n",
            "mystery.py": "",
        },
    )
    found = problems(package)
    text = "\n".join(found)
    assert any(
        line.startswith("largebatch/mystery.py: module 'largebatch.mystery' has no layer")
        for line in found
    ), text
    assert (
        "largebatch/engine.py:5: from largebatch.config import TrainConfig, load "
        "(takes TrainConfig, load): largebatch.engine (engine) imports largebatch.config "
        "(recipe)" in found
    ), text
    assert "largebatch.engine -> largebatch.lr" not in text  # not part of a circle
    assert "the modules largebatch.lr, largebatch.sampler import each other:" in found, text
    assert "  largebatch/lr.py:2: import largebatch.sampler: largebatch.lr -> " in text, text
    assert "  largebatch/sampler.py:1: from . import lr (takes lr): " in text, text
    # what is allowed is not reported: down, and the root package's lazy import of train
    assert not any("hessian" in line or "__init__" in line for line in found), text
    assert len([line for line in found if " imports " in line]) == 1, text

    # the relative import one level up from a top-level module names the package: fine
    # for the apps' __init__, upward for anyone else
    (package / "sampler.py").write_text("from . import lr\n", encoding="utf-8")
    (package / "lr.py").write_text("from . import evaluate\n", encoding="utf-8")
    (package / "evaluate.py").write_text("", encoding="utf-8")
    (package / "engine.py").write_text("from largebatch import lr\n", encoding="utf-8")
    (package / "mystery.py").unlink()
    found = problems(package)
    assert found == [
        "largebatch/lr.py:1: from . import evaluate (takes evaluate): largebatch.lr (engine) "
        "imports largebatch.evaluate (apps)"
    ], found


@pytest.mark.parametrize(
    ("module", "layer"),
    [
        ("largebatch", "apps"),
        ("largebatch.io", "leaves"),
        ("largebatch.hessian.tracker", "hessian"),
        ("largebatch.feed", "engine"),
        ("largebatch.data", "recipe"),
        ("largebatch.data.imagenet", "recipe"),
        ("largebatch.__main__", "apps"),
        ("largebatch.nothing", None),
    ],
)
def test_modules_map_to_their_layers(module, layer):
    assert layer_of(module) == layer
