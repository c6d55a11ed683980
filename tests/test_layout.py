"""The package layout docs/layout.md describes: every sub-package of steps/ imports only the layers
below it, no entry point imports another, what ships inside the logged ONNX model (its model
file and code_paths) imports nothing of this project but itself, and the script packages beside
steps/ (bench/, tools/) never import the tests, nor steps/ them."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT

from steps.config.plan import ENTRY_POINTS
from steps.serving.chat import ONNX_CODE_PATHS
from steps.wrap_onnx import MODEL_CODE

STEPS = PROJECT_ROOT / "steps"
# Each layer may import the layers listed before it (and itself).
LAYERS = (
    "errors",
    "config",
    "store",
    "sources",
    "onnx",
    "serving",
    "evaluation",
    "tracking",
    "backends",
    "reproduce",
    "serve",
    "add_model",
)


def imported_layers(path: Path) -> set[str]:
    """The top-level names under steps/ that a module imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "steps" and len(parts) > 1:
                found.add(parts[1])
    return found


def imported_modules(path: Path) -> set[str]:
    """Every name a module imports, `from a.b import c` as `a.b.c`; relative ones with dots."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            found |= {f"{module}.{alias.name}" for alias in node.names}
    return found


def layer_of(path: Path) -> str:
    relative = path.relative_to(STEPS)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def test_every_module_belongs_to_a_layer_an_entry_point_or_the_launcher() -> None:
    known = {*LAYERS, *ENTRY_POINTS, "__init__", "__main__"}
    assert {layer_of(path) for path in STEPS.rglob("*.py")} <= known


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_imports_only_the_layers_below_it(layer: str) -> None:
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    for path in STEPS.rglob("*.py"):
        if layer_of(path) == layer:
            imported = imported_layers(path) - {"__init__"}
            assert imported <= allowed, (path.relative_to(PROJECT_ROOT), imported - allowed)


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_no_entry_point_imports_another(entry_point: str) -> None:
    imported = imported_layers(STEPS / f"{entry_point}.py")
    assert not imported & set(ENTRY_POINTS), imported & set(ENTRY_POINTS)


def test_the_model_code_shipped_with_the_onnx_model_imports_nothing_of_ours() -> None:
    """The model file and its code_paths run where this project is not installed. They may
    import each other: by file name (MLflow puts code_paths on sys.path), or, when the project
    imports the model file, as steps.serving modules. Anything else must be an installed
    package, not a module of this repository."""
    shipped = {path.stem for path in ONNX_CODE_PATHS}
    as_ours = {f"steps.serving.{name}" for name in shipped}
    # What an import could resolve to (not `make run`'s mlflow.db, which shadows no package).
    repository = {
        path.stem for path in PROJECT_ROOT.iterdir() if path.is_dir() or path.suffix == ".py"
    }
    for path in (MODEL_CODE, *ONNX_CODE_PATHS):
        for name in imported_modules(path):
            parts = name.split(".")
            if parts[0] == "steps":
                assert ".".join(parts[:3]) in as_ours, (path.name, name)
            elif parts[0] not in shipped:
                assert parts[0] and parts[0] not in repository, (path.name, name)
                assert importlib.util.find_spec(parts[0]) is not None, (path.name, name)


def test_the_serving_rules_need_only_the_standard_library() -> None:
    """chat_protocol ships inside the ONNX model and serves the transformers runtime too."""
    core = STEPS / "serving" / "chat_protocol.py"
    assert core in ONNX_CODE_PATHS
    imported = {name.split(".")[0] for name in imported_modules(core)}
    assert imported <= sys.stdlib_module_names, imported - sys.stdlib_module_names


def imported_packages(path: Path) -> set[str]:
    """The top-level packages a module imports."""
    tree = ast.parse(path.read_text())
    imports = [node for node in ast.walk(tree) if isinstance(node, ast.Import)]
    modules = {alias.name for node in imports for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    return {module.split(".")[0] for module in modules if module}


# Runnable scripts beside steps/: the benchmarks (python -m bench.*) and the build-time
# generators whose output is committed (python -m tools.*).
SCRIPT_PACKAGES = ("bench", "tools")


@pytest.mark.parametrize("package", SCRIPT_PACKAGES)
def test_no_script_imports_the_tests(package: str) -> None:
    paths = list((PROJECT_ROOT / package).rglob("*.py"))
    assert paths
    for path in paths:
        assert not imported_packages(path) & {"tests", "conftest"}, path


def test_steps_imports_no_script_and_no_test() -> None:
    for path in STEPS.rglob("*.py"):
        imported = imported_packages(path) & {*SCRIPT_PACKAGES, "tests", "conftest"}
        assert not imported, (path.relative_to(PROJECT_ROOT), imported)
