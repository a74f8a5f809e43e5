"""The codebase stays readable top to bottom: size limits of skd/ and pipelines/, and the package as installed."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*ROOT.glob("skd/**/*.py"), *ROOT.glob("pipelines/*.py")])
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 450, 80


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
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
        [sys.executable, "-c", f"from skd.cli.main import {main}; {main}()", "--version"],
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert result.returncode == 0 and skd.__version__ in result.stdout, (
        f"{command} --version: exit {result.returncode}, {result.stdout!r} {result.stderr[-300:]!r}"
    )


def contract_layers() -> list[set[str]]:
    """setup.cfg's layer contract, top first: one set of packages or modules a layer."""
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["importlinter:contract:layers"]["layers"].split("\n")
    return [set(line.replace("|", " ").split()) for line in lines if line.strip()]


def test_every_package_and_top_module_has_a_place_in_the_import_layers():
    """A package or top-level module missing from setup.cfg's layer contract would escape import-linter's checks:
    each one is named in the layers, and in the list the input pipelines may not import."""
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    layered = set().union(*contract_layers())
    forbidden = set(config["importlinter:contract:pipelines"]["forbidden_modules"].split())
    packages = {f"skd.{p.parent.name}" for p in ROOT.glob("skd/*/__init__.py")}
    modules = {f"skd.{p.stem}" for p in ROOT.glob("skd/*.py") if p.stem != "__init__"}
    assert not (packages | modules) - layered, f"outside the layer contract: {sorted((packages | modules) - layered)}"
    pipelines_may_not = (packages | modules) - {"skd.errors"}
    assert not pipelines_may_not - forbidden, (
        f"packages the pipelines contract does not forbid: {sorted(pipelines_may_not - forbidden)}"
    )


def test_the_shape_of_skd_shows_its_layers():
    """A newcomer sees the layers in the folders: a few modules at the top, the rest in packages."""
    top = sorted(p.name for p in ROOT.glob("skd/*.py"))
    packages = sorted(p.parent.name for p in ROOT.glob("skd/*/__init__.py"))
    assert len(top) <= 8, f"skd/ has {len(top)} modules at its top: {top}"
    assert len(packages) >= 6, f"skd/ has {len(packages)} packages: {packages}"
    undocumented = [p for p in packages if not (ROOT / "skd" / p / "__init__.py").read_text().startswith('"""')]
    assert not undocumented, f"packages whose __init__ has no docstring saying what they are for: {undocumented}"


def test_docs_layout_names_the_contracts_layers():
    """docs/layout.md lists the layers in the contract's order, each with the same packages."""
    import re

    text = (ROOT / "docs" / "layout.md").read_text()
    listed = [
        set(re.findall(r"`(skd\.[a-z_]+)`", line.split(" - ")[0]))
        for line in re.findall(r"^\d+\. (`skd\.[^\n]*)", text, flags=re.M)
    ]
    assert listed == contract_layers(), f"docs/layout.md lists {listed}, setup.cfg's contract {contract_layers()}"


def test_lines_people_read_fit_100_characters():
    """Code is formatted at 100 characters; what the formatter cannot split (a long message) stays rare."""
    lines = [line for path in SOURCES for line in path.read_text().splitlines()]
    long = sum(len(line) > 100 for line in lines)
    assert long <= 0.05 * len(lines), f"{long} of {len(lines)} lines ({long / len(lines):.1%}) are over 100 characters"


def test_a_small_error_family_all_skd_errors():
    """At most ten exception classes in skd/ and pipelines/, and every user-facing one an SkdError: a user catches
    one family and reads its class for what to do next."""
    import importlib

    import skd.errors

    defined = {}
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                getattr(base, "id", getattr(base, "attr", "")).endswith(("Error", "Exception", "Unreachable"))
                for base in node.bases
            ):
                defined[node.name] = path.relative_to(ROOT)
    assert len(defined) <= 10, f"{len(defined)} exception classes: {defined}"
    internal = {"DecodeError"}  # the pipelines' OSError for one unreadable image, turned into a one-line error
    for name, path in defined.items():
        if name in internal:
            continue
        module = importlib.import_module(".".join(path.with_suffix("").parts).replace("pipelines", "skd.pipelines", 1))
        assert issubclass(getattr(module, name), skd.errors.SkdError), f"{name} in {path} is not an SkdError"


def test_every_package_ships_in_the_wheel():
    """setup.cfg lists its packages by hand (skd.pipelines is mapped from pipelines/): a package of skd/ missing
    from the list would be left out of a non-editable install."""
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    packages = {"skd"} | {f"skd.{p.parent.name}" for p in ROOT.glob("skd/*/__init__.py")}
    assert packages <= listed, f"packages setup.cfg does not ship: {sorted(packages - listed)}"
