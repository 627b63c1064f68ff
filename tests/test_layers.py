"""The layers hold: native -> runtime -> training -> export, each importing only those below.

setuptools maps ``cmhash.training`` and ``cmhash.export`` onto top-level folders, so no
tool sees the arrows between them; this test reads every module's imports with ``ast``
(top-level, inside functions, under ``TYPE_CHECKING``, relative ones resolved, and
``importlib.import_module("...")`` with a literal name) and fails on an arrow that points
up a layer, on a module outside the runtime that reaches into the runtime's private
names, and on an import cycle between training's modules.
"""

from __future__ import annotations

import ast
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The layers, bottom up. A module may import its own layer and those below it.
LAYERS = ("native", "runtime", "training", "export")
NATIVE = "cmhash._hamming"  # the C extension (native/), the one module of the bottom layer
PACKAGES = {"cmhash": "sdk/cmhash", "cmhash.training": "training", "cmhash.export": "export"}


@dataclass(frozen=True)
class Edge:
    file: str  # relative to the repository root
    line: int
    source: str  # importing module
    target: str  # imported module (or module.name for `from module import name`)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.source} -> {self.target}"


def layer_of(module: str) -> str | None:
    """The layer a cmhash module belongs to; None for anything outside cmhash."""
    if module == NATIVE or module.startswith(NATIVE + "."):
        return "native"
    for package, layer in (("cmhash.export", "export"), ("cmhash.training", "training"), ("cmhash", "runtime")):
        if module == package or module.startswith(package + "."):
            return layer
    return None


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Every Python module of the three packages, by its import name."""
    out = {}
    for package, folder in PACKAGES.items():
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    if level == 0:
        return target or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(module: str, source: str, is_package: bool, file: str = "<string>") -> list[Edge]:
    """Every import in ``source`` (anywhere in the file), as edges to absolute names.

    ``from package import name`` gives the edge ``package.name``, whether ``name`` is a
    submodule or an attribute: its layer is the package's either way, and the private-name
    rule reads every part of it.
    """
    edges = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            edges += [Edge(file, node.lineno, module, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            for alias in node.names:
                edges.append(Edge(file, node.lineno, module, base if alias.name == "*" else f"{base}.{alias.name}"))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            edges.append(Edge(file, node.lineno, module, node.args[0].value))
    return edges


def all_edges(root: Path = ROOT) -> list[Edge]:
    files = module_files(root)
    edges = []
    for module, path in files.items():
        edges += imports_of(module, path.read_text(), path.name == "__init__.py", str(path.relative_to(root)))
    return edges


def forbidden(edges: list[Edge]) -> list[str]:
    """The edges that break the layer rule, each with the reason."""
    problems = []
    for edge in edges:
        source, target = layer_of(edge.source), layer_of(edge.target)
        if target is None:
            continue
        if LAYERS.index(target) > LAYERS.index(source):
            problems.append(f"{edge}: {source} imports {target}, a layer above it")
        elif source not in ("native", "runtime") and target in ("native", "runtime") and _private(edge.target):
            problems.append(f"{edge}: {source} uses a private name of the runtime (make it public or keep it inside)")
    return problems


def _private(name: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in name.split(".")[1:])


def cycles(edges: list[Edge], package: str) -> list[list[str]]:
    """Import cycles between the top-level modules and subpackages of ``package``."""
    depth = package.count(".") + 1

    def node(name: str) -> str:
        return ".".join(name.split(".")[: depth + 1])

    graph: dict[str, set[str]] = {}
    for edge in edges:
        if edge.source.startswith(package + ".") and edge.target.startswith(package + "."):
            a, b = node(edge.source), node(edge.target)
            if a != b:
                graph.setdefault(a, set()).add(b)
    found, state = [], {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = "open"
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                found.append(path[path.index(m):] + [m] if m in path else [n, m])
            elif m not in state:
                visit(m, path + [m])
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    return found


# --------------------------------------------------------------------------- the rule


def test_no_layer_imports_a_layer_above_it():
    problems = forbidden(all_edges())
    assert not problems, "imports that break the layers (native -> runtime -> training -> export):\n" + "\n".join(problems)


def test_training_modules_import_each_other_without_cycles():
    found = cycles(all_edges(), "cmhash.training")
    assert not found, "import cycles in cmhash.training:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_scan_sees_the_folders_setuptools_maps():
    """The folder -> package map above is pyproject.toml's, and the scan finds every layer."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["package-dir"] == PACKAGES
    files = module_files()
    assert {"cmhash.cli", "cmhash.training.config", "cmhash.training.method", "cmhash.training.trainer",
            "cmhash.export.api"} <= set(files)
    edges = all_edges()
    layers = {(layer_of(e.source), layer_of(e.target)) for e in edges}
    # arrows that must exist: the scan is not blind to the mapped packages
    assert {("training", "runtime"), ("export", "training"), ("export", "runtime"), ("runtime", "native")} <= layers


# --------------------------------------------------------------------------- the checker itself


def test_lazy_relative_and_dynamic_imports_are_seen():
    source = (
        "import numpy\n"
        "from . import checkpoint as ckpt\n"
        "from ..export.api import export_checkpoint\n"
        "def f():\n"
        "    from cmhash.export import api\n"
        "    import importlib\n"
        "    importlib.import_module('cmhash.export.verify')\n"
        "if TYPE_CHECKING:\n"
        "    from .trainer import StepContext\n"
    )
    edges = imports_of("cmhash.training.run", source, False)
    targets = [(e.line, e.target) for e in edges]
    assert (2, "cmhash.training.checkpoint") in targets
    assert (3, "cmhash.export.api.export_checkpoint") in targets
    assert (5, "cmhash.export.api") in targets
    assert (7, "cmhash.export.verify") in targets
    assert (9, "cmhash.training.trainer.StepContext") in targets
    problems = forbidden(edges)
    assert len(problems) == 3 and all("training imports export" in p for p in problems)
    assert problems[0].startswith("<string>:3: cmhash.training.run -> cmhash.export.api")


def test_runtime_importing_training_and_private_names_are_forbidden():
    assert forbidden([Edge("sdk/cmhash/cli.py", 40, "cmhash.cli", "cmhash.training.run")])
    assert forbidden([Edge("training/run.py", 1, "cmhash.training.run", "cmhash._files.atomic_path")])
    assert forbidden([Edge("export/api.py", 1, "cmhash.export.api", "cmhash.bundle._helper")])
    assert not forbidden([Edge("export/api.py", 1, "cmhash.export.api", "cmhash.__version__")])
    assert not forbidden([Edge("sdk/cmhash/index.py", 1, "cmhash.index", "cmhash._hamming")])
    assert forbidden([Edge("training/run.py", 1, "cmhash.training.run", "cmhash._hamming")])
    assert not forbidden([Edge("export/api.py", 1, "cmhash.export.api", "cmhash.training.run.load_trained")])


def test_cycles_are_found():
    edges = [Edge("f", 1, "cmhash.training.config", "cmhash.training.method.get_method"),
             Edge("f", 2, "cmhash.training.method", "cmhash.training.config.MethodConfig"),
             Edge("f", 3, "cmhash.training.blocks.hashing", "cmhash.training.config.check_bits")]
    assert cycles(edges, "cmhash.training") == [["cmhash.training.config", "cmhash.training.method",
                                                 "cmhash.training.config"]]
    assert cycles(edges[1:], "cmhash.training") == []


@pytest.mark.parametrize("module, layer", [("cmhash", "runtime"), ("cmhash.cli", "runtime"), ("cmhash._hamming", "native"),
                                           ("cmhash.training.run", "training"), ("cmhash.export", "export"),
                                           ("numpy", None), ("cmhashx", None)])
def test_layer_of(module, layer):
    assert layer_of(module) == layer
