"""A site runs the MedTune it installed: a FAB with other Python code is refused, and shown for
review."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import pytest

from medtune.cli import main
from medtune.code_approval import APP_PACKAGES, CodePolicy, InstalledCode, fab_hash, review
from medtune.errors import CodeNotApprovedError


def fab_of(files: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    """A FAB as `flwr build` makes one: a zip of the app's files (plus its own manifest)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        archive.writestr("pyproject.toml", b"[project]\nname = 'medtune'\n")
        archive.writestr(".info/CONTENT", b"")
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def installed() -> InstalledCode:
    return InstalledCode.read()


def test_the_installed_code_is_every_python_file_of_medtunes_packages(
    installed: InstalledCode,
) -> None:
    assert {path.split("/", 1)[0] for path in installed.files} == set(APP_PACKAGES)
    assert (
        installed.files["client/app.py"]
        == (Path(__file__).parents[1] / "client" / "app.py").read_bytes()
    )
    assert not [path for path in installed.files if "__pycache__" in path]


def test_a_fab_with_the_installed_code_is_approved(installed: InstalledCode) -> None:
    fab = fab_of(installed.files)
    result = CodePolicy().check(fab, installed, source="honest.fab")
    assert result.same_as_installed and result.fab_hash == fab_hash(fab) and result.diff == ""


@pytest.mark.parametrize(
    ("edit", "summary"),
    [
        ("changed", "1 changed (client/app.py)"),
        ("added", "1 added (client/extra.py)"),
        ("missing", "1 missing (medtune/noise.py)"),
    ],
)
def test_a_fab_whose_code_differs_in_any_file_is_refused_and_the_difference_shown(
    installed: InstalledCode, edit: str, summary: str
) -> None:
    files = dict(installed.files)
    if edit == "changed":
        files["client/app.py"] += b"open('/tmp/marker', 'w')\n"
    elif edit == "added":
        files["client/extra.py"] = b"import os\n"
    else:
        del files["medtune/noise.py"]
    fab = fab_of(files)
    with pytest.raises(
        CodeNotApprovedError,
        match=rf"{fab_hash(fab)[:12]}: Python code differs .*{re.escape(summary)}",
    ):
        CodePolicy().check(fab, installed, source="coordinator.fab")
    if edit == "changed":
        assert "+open('/tmp/marker', 'w')" in review(fab, installed, "coordinator.fab").diff


def test_only_a_listed_hash_is_approved_and_garbage_is_not_a_fab(installed: InstalledCode) -> None:
    fab = fab_of({**installed.files, "client/app.py": b"print('new version')\n"})
    assert CodePolicy(frozenset({fab_hash(fab)})).approves_hash(fab_hash(fab).upper())
    assert not CodePolicy(frozenset({fab_hash(fab)})).approves_hash(
        fab_hash(fab_of(installed.files))
    )
    with pytest.raises(CodeNotApprovedError, match="garbage.fab: not a readable FAB"):
        review(b"not a zip", installed, "garbage.fab")
    damaged = bytearray(
        fab_of({"client/app.py": bytes(range(256)) * 64}, compression=zipfile.ZIP_DEFLATED)
    )
    # inside the deflate stream
    middle = damaged.index(b"client/app.py") + len("client/app.py") + 20
    # zlib.error, not BadZipFile: still a refusal, never a crash
    damaged[middle : middle + 16] = b"\xff" * 16
    with pytest.raises(CodeNotApprovedError, match="damaged.fab: not a readable FAB"):
        review(bytes(damaged), installed, "damaged.fab")


def test_medtune_site_review_prints_the_hash_and_the_diff(
    installed: InstalledCode, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "new.fab"
    path.write_bytes(
        fab_of({**installed.files, "server/app.py": installed.files["server/app.py"] + b"# new\n"})
    )
    assert main(["site", "review", str(path)]) == 1  # like diff(1): the code differs
    out = capsys.readouterr().out
    assert (
        f"sha256 {fab_hash(path.read_bytes())}" in out
        and "+# new" in out
        and "1 changed (server/app.py)" in out
    )
    assert main(["site", "review", str(tmp_path / "absent.fab")]) == 2
    assert "absent.fab: cannot read the FAB" in capsys.readouterr().err
