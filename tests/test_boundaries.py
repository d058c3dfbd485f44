"""The house's floors, checked from the source: the core (one site's learning, every module of
medtune/ outside federation/, experiments/ and cli/) imports none of the floors above it, nor
Flower, flwr-datasets or Ray, even lazily inside a function; the coordinator's import loads no note
generator."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import medtune

UPPER_FLOORS = (
    "medtune.federation",
    "medtune.experiments",
    "medtune.cli",
    "flwr",
    "flwr_datasets",
    "ray",
    "client",
    "server",
)
PACKAGE = Path(medtune.__file__).parent


def imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def core_modules() -> list[Path]:
    upper = {PACKAGE / floor.split(".")[1] for floor in UPPER_FLOORS[:3]}
    return [
        path
        for path in sorted(PACKAGE.rglob("*.py"))
        if not any(folder in path.parents for folder in upper)
    ]


def test_no_core_module_imports_a_floor_above_it_or_flower() -> None:
    modules = core_modules()
    assert (
        len(modules) > 30
        and PACKAGE / "train.py" in modules
        and PACKAGE / "hospitals.py" in modules
    )
    crossings = {
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in modules
        for name in imported_names(path)
        if any(name == floor or name.startswith(floor + ".") for floor in UPPER_FLOORS)
    }
    assert not crossings, sorted(crossings)


def test_importing_the_coordinator_loads_no_note_generator_and_no_partitioner() -> None:
    probe = "import sys, server.app; print(' '.join(sorted(sys.modules)))"
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True
        ).stdout.split()
    )
    assert "server.federation" in loaded  # the probe did import the coordinator
    assert not loaded & {"medtune.synth", "medtune.federation.partitions", "flwr_datasets"}, sorted(
        loaded
    )


def test_the_readme_layout_table_names_every_module() -> None:
    """A newcomer finds each module in the README's layout table, under its room."""
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme[readme.index("## Layout") :].split("\n## ")[0]
    rows = [row.split("|") for row in section.splitlines() if row.startswith("| `")]
    rooms = {row[1].strip().strip("`"): row[2] for row in rows}
    missing = []
    for room in (
        "medtune/",
        "medtune/cli/",
        "medtune/federation/",
        "medtune/experiments/",
        "client/",
        "server/",
    ):
        for path in sorted((PACKAGE.parent / room).glob("*.py")):
            if path.stem not in ("__init__", "__main__") and f"`{path.stem}`" not in rooms.get(
                room, ""
            ):
                missing.append(f"{room}{path.name}")
    assert not missing, missing
