"""The codebase stays readable top to bottom: size limits of skd/ and pipelines/, and the package as installed."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*ROOT.glob("skd/*.py"), *ROOT.glob("pipelines/*.py")])
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 450, 80


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_modules_and_functions_fit_the_limits(path):
    text = path.read_text()
    lines = text.count("\n")
    assert lines <= MAX_MODULE_LINES, f"{path.name} has {lines} lines, the limit is {MAX_MODULE_LINES}"
    long = {
        node.name: node.end_lineno - node.lineno + 1
        for node in ast.walk(ast.parse(text))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    }
    assert not long, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_pipelines_install_inside_skd():
    """The wheel claims no top-level `pipelines` package: the input pipelines are skd.pipelines."""
    import skd.pipelines

    assert Path(skd.pipelines.__file__).parent == ROOT / "pipelines", f"skd.pipelines is {skd.pipelines.__file__}"


@pytest.mark.parametrize("command", ["skd-cache", "skd-train"])
def test_version(command):
    import skd

    main = "main_cache" if command == "skd-cache" else "main_train"
    result = subprocess.run(
        [sys.executable, "-c", f"from skd.cli import {main}; {main}()", "--version"],
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert result.returncode == 0 and skd.__version__ in result.stdout, (
        f"{command} --version: exit {result.returncode}, {result.stdout!r} {result.stderr[-300:]!r}"
    )


def test_every_module_has_a_place_in_the_import_layers():
    """A module missing from setup.cfg's layer contract would escape import-linter's checks: each one is named in
    the layers, and each skd module in the list the input pipelines may not import."""
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    layered = set(config["importlinter:contract:layers"]["layers"].replace("|", " ").replace(":", " ").split())
    forbidden = set(config["importlinter:contract:pipelines"]["forbidden_modules"].split())
    modules = {f"skd.{p.stem}" for p in ROOT.glob("skd/*.py") if p.stem not in ("__init__", "errors")}
    assert not modules - layered, f"modules outside the layer contract: {sorted(modules - layered)}"
    assert not modules - forbidden, f"modules the pipelines contract does not forbid: {sorted(modules - forbidden)}"
