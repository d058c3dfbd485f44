"""MedTune installed as a wheel reads nothing from the source tree, and ships the same app as its
FAB.

The run-config defaults are written twice, by necessity: pyproject.toml's [tool.flwr.app.config] for
`flwr run .`, and medtune/run_defaults.toml for an installed MedTune. These tests keep the two equal
key by key, check the app directory `medtune simulate` writes for Flower, and check that the FAB
holds exactly the wheel's packages and data files. (.ci/wheel_smoke.sh runs the built wheel itself.)
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from medtune.defaults import key_comments, key_help, run_defaults
from medtune.federation.overrides import resolve_run_config
from medtune.federation.simulation import COMPONENTS, flower_app_dir

# Flower's config and FAB modules import deprecated names of click (through typer) and pathspec:
# their chatter.
pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning:typer", "ignore::DeprecationWarning:pathspec"
)
ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
TABLE = "[tool.flwr.app.config]"


def pyproject() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))


def table_text(text: str, header: str) -> str:
    """The lines of one TOML table: from its header to the next table."""
    return text.split(f"\n{header}\n", 1)[1].split("\n[", 1)[0]


def drift(declared: str, shipped: str) -> list[str]:
    """Each key whose value (with its type: 5 is not 5.0) or comment differs between two tables'
    texts."""
    values = tomllib.loads(declared), tomllib.loads(shipped)
    comments = key_comments(declared), key_comments(shipped)
    differing = []
    for key in sorted(set(values[0]) | set(values[1])):
        sides = [
            "missing"
            if key not in value
            else f"{value[key]!r} ({type(value[key]).__name__}) # {comment.get(key)}"
            for value, comment in zip(values, comments)
        ]
        if sides[0] != sides[1]:
            differing.append(
                f"{key}: pyproject.toml {sides[0]} | medtune/run_defaults.toml {sides[1]}"
            )
    return differing


def test_the_shipped_defaults_are_pyprojects_run_config_key_by_key():
    shipped = (ROOT / "medtune" / "run_defaults.toml").read_text(encoding="utf-8")
    differing = drift(table_text(PYPROJECT.read_text(encoding="utf-8"), TABLE), shipped)
    assert not differing, "change both tables alike; they differ at " + "; ".join(differing)
    # ...and that file is what MedTune reads: values, and comments as the flags' help.
    assert run_defaults() == pyproject()["tool"]["flwr"]["app"]["config"]
    assert key_help()["prompt-length"] == "virtual prompt tokens"


def test_a_drifted_default_or_comment_is_named_by_its_key():
    declared = (
        "rounds = 5        # federation rounds\nseed = 0  # seeds everything\nepsilon = 8.0\n"
    )
    shipped = "rounds = 5.0      # federation rounds\nseed = 0  # seeds all\n"
    assert drift(declared, shipped) == [
        "epsilon: pyproject.toml 8.0 (float) # None | medtune/run_defaults.toml missing",
        "rounds: pyproject.toml 5 (int) # federation rounds | "
        "medtune/run_defaults.toml 5.0 (float) # federation rounds",
        "seed: pyproject.toml 0 (int) # seeds everything | "
        "medtune/run_defaults.toml 0 (int) # seeds all",
    ]


def test_the_app_directory_simulate_writes_is_what_flower_reads_and_fuses():
    """Flower gives each simulated hospital the run config fused onto this directory's defaults: it
    must be the run's."""
    from flwr.common.config import get_fused_config_from_dir, get_project_config

    config = resolve_run_config("ten_hospitals", {"epsilon": 1.0, "out": "/tmp/elsewhere"})
    with flower_app_dir() as app_dir:
        app = get_project_config(app_dir)["tool"]["flwr"]["app"]  # Flower's own validation passes
        fused = get_fused_config_from_dir(app_dir, config)
        defaults = get_fused_config_from_dir(app_dir, {})
    assert not app_dir.exists()
    assert app["components"] == COMPONENTS == pyproject()["tool"]["flwr"]["app"]["components"]
    assert fused == config and config["hospitals"] == 10 and config["epsilon"] == 1.0
    assert defaults == run_defaults()


def package_files() -> set[str]:
    """What the wheel installs, as pyproject.toml declares it: each package's modules and
    package-data."""
    setuptools = pyproject()["tool"]["setuptools"]
    tops = [pattern.rstrip("*") for pattern in setuptools["packages"]["find"]["include"]]
    packages = sorted(
        folder
        for top in tops
        for folder in [ROOT / top, *(ROOT / top).rglob("*")]
        if (folder / "__init__.py").is_file() and "__pycache__" not in folder.parts
    )
    files = {module for package in packages for module in package.glob("*.py")}
    for package, patterns in setuptools["package-data"].items():
        files |= {data for pattern in patterns for data in (ROOT / package).glob(pattern)}
    return {path.relative_to(ROOT).as_posix() for path in files}


def test_the_fab_holds_exactly_the_wheels_packages_and_data_files():
    """What `flwr build` and `flwr run .` would pack from this checkout, by Flower's own rules
    (nothing is written)."""
    from flwr.cli.build import get_filtered_fab_paths
    from flwr.cli.utils import collect_files, filter_paths_for_publish

    config = pyproject()
    fab = set(get_filtered_fab_paths(filter_paths_for_publish(collect_files(ROOT)), config))
    installed = package_files()
    assert (
        "medtune/run_defaults.toml" in installed
        and "simulations/scenarios/default.toml" in installed
    )
    assert fab == installed, (
        f"in the FAB only: {sorted(fab - installed)}; in the wheel only: {sorted(installed - fab)}"
    )
