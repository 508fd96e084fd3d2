"""The install metadata: constraints.txt pins every dependency and extra with the version this
environment runs, setup.py's ranges admit those versions, and python_requires is what the code
needs (docs/install.md). CI runs vermin over the sources for the last part (.ci/run)."""

import ast
import os
import re
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
packaging = pytest.importorskip("packaging.requirements")
from packaging.requirements import Requirement  # noqa: E402
from packaging.version import Version  # noqa: E402


def setup_keywords() -> dict:
    """install_requires, extras_require and python_requires as literals read from setup.py's
    setup() call (no execution: setup.py builds the native operator when run)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    wanted = {"install_requires", "extras_require", "python_requires"}
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in wanted}


def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def requirements() -> list[Requirement]:
    kw = setup_keywords()
    extras = [r for reqs in kw["extras_require"].values() for r in reqs]
    return [Requirement(r) for r in [*kw["install_requires"], *extras]]


def test_every_dependency_is_pinned_and_its_pin_is_in_range():
    pins = constraints()
    for req in requirements():
        name = req.name.lower()
        assert name in pins, f"constraints.txt does not pin {name}"
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} outside setup.py's {req.specifier}"
    assert set(pins) == {r.name.lower() for r in requirements()}, "constraints.txt pins a package setup.py lacks"


@pytest.mark.skipif(not os.environ.get("CI"), reason="CI's environment is the tested set; a GPU or dev machine "
                                                    "may hold other versions inside setup.py's ranges")
def test_installed_versions_are_the_constraints():
    """CI runs the tests on the tested set (a local build label such as +cpu aside)."""
    for name, pinned in constraints().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{name} is pinned in constraints.txt but not installed")
        assert Version(installed).public == Version(pinned).public, f"{name}: installed {installed}, pinned {pinned}"


def test_python_requires_matches_the_lint_target():
    """ruff's target and python_requires name the same minimum (vermin checks the code in CI)."""
    minimum = re.fullmatch(r">=(\d+)\.(\d+)", setup_keywords()["python_requires"]).groups()
    target = re.search(r'target-version = "py(\d)(\d+)"', (REPO / "pyproject.toml").read_text()).groups()
    assert minimum == target
    assert "vermin" in (REPO / ".ci/run").read_text()
