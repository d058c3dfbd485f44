"""Which code a site runs: the MedTune it installed, or a FAB its IT approved by hash. Nothing else.

Flower sends every SuperNode the coordinator's app as a FAB (a zip of its files) and would install
and import it. A MedTune site instead compares the FAB's Python files with the installed
packages' (medtune, client, server, simulations) byte for byte, without extracting or importing
anything. Equal code: the site runs its installed ClientApp. Different code: refused, unless the
FAB's SHA-256 (Flower's FAB hash) is in the site's `approved-fabs`. `medtune site review FAB`
prints that hash and the difference, for the site's IT to review.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

from medtune.errors import CodeNotApprovedError

APP_PACKAGES = ("medtune", "client", "server", "simulations")
# uncompressed Python in a FAB: MedTune's is about 0.4 MB; more is refused unread
MAX_CODE_BYTES = 64 * 2**20


def fab_hash(fab: bytes) -> str:
    """A FAB's identity as Flower computes it: the SHA-256 of its bytes, in hex."""
    return hashlib.sha256(fab).hexdigest()


def fab_code(fab: bytes, source: str) -> dict[str, bytes]:
    """The Python files inside a FAB, by path, read from memory (nothing is written or imported).

    The FAB is the coordinator's: anything wrong with it (a damaged or encrypted entry, an unknown
    compression, more code than MAX_CODE_BYTES unpacked) is a refusal, never a crash of the site.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as archive:
            entries = [info for info in archive.infolist() if info.filename.endswith(".py")]
            unpacked = sum(info.file_size for info in entries)
            if unpacked > MAX_CODE_BYTES:
                raise CodeNotApprovedError(
                    f"{source}: {unpacked} bytes of Python unpacked, over {MAX_CODE_BYTES}"
                )
            return {info.filename: archive.read(info) for info in entries}
    except CodeNotApprovedError:
        raise
    except Exception as error:  # noqa: BLE001 - zipfile raises zlib.error, NotImplementedError, RuntimeError, ...
        raise CodeNotApprovedError(
            f"{source}: not a readable FAB ({type(error).__name__}: {error})"
        ) from None


@dataclass(frozen=True)
class InstalledCode:
    """The Python files of the installed MedTune packages, by path relative to the site-packages
    root."""

    files: dict[str, bytes]

    @classmethod
    def read(cls) -> "InstalledCode":
        files: dict[str, bytes] = {}
        for package in APP_PACKAGES:
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                raise CodeNotApprovedError(f"package {package!r} is not installed at this site")
            root = Path(next(iter(spec.submodule_search_locations)))
            for path in sorted(root.rglob("*.py")):
                if "__pycache__" not in path.parts:
                    files[f"{package}/{path.relative_to(root).as_posix()}"] = path.read_bytes()
        return cls(files)


@dataclass(frozen=True)
class CodeReview:
    """How a FAB's Python code differs from the installed packages'."""

    fab_hash: str
    added: tuple[str, ...]  # in the FAB only
    removed: tuple[str, ...]  # installed, missing from the FAB
    changed: tuple[str, ...]
    diff: str  # unified diff of every added, removed and changed file

    @property
    def same_as_installed(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def summary(self) -> str:
        """One line: what differs, for the site's log."""
        if self.same_as_installed:
            return f"FAB {self.fab_hash[:12]}: its Python code is the installed MedTune's"
        parts = [
            f"{len(files)} {what} ({', '.join(files[:3])}{', ...' if len(files) > 3 else ''})"
            for what, files in (
                ("changed", self.changed),
                ("added", self.added),
                ("missing", self.removed),
            )
            if files
        ]
        return (
            f"FAB {self.fab_hash[:12]}: Python code differs from the installed MedTune: "
            f"{'; '.join(parts)}"
        )


def review(fab: bytes, installed: InstalledCode, source: str) -> CodeReview:
    """Compare a FAB's Python files with the installed ones, file by file."""
    code = fab_code(fab, source)
    added = tuple(sorted(set(code) - set(installed.files)))
    removed = tuple(sorted(set(installed.files) - set(code)))
    changed = tuple(
        sorted(p for p in set(code) & set(installed.files) if code[p] != installed.files[p])
    )
    diff: list[str] = []
    for path in sorted((*added, *removed, *changed)):
        before = (
            installed.files.get(path, b"")
            .decode("utf-8", errors="replace")
            .splitlines(keepends=True)
        )
        after = code.get(path, b"").decode("utf-8", errors="replace").splitlines(keepends=True)
        diff.extend(difflib.unified_diff(before, after, f"installed/{path}", f"fab/{path}"))
    return CodeReview(fab_hash(fab), added, removed, changed, "".join(diff))


@dataclass(frozen=True)
class CodePolicy:
    """A site's rule for the code it runs: its installed MedTune, plus FABs approved by hash."""

    approved_fabs: frozenset[str] = frozenset()

    def approves_hash(self, fab_sha256: str) -> bool:
        """A FAB the site's IT reviewed and listed: it runs as Flower would run it (its own
        code)."""
        return fab_sha256.lower() in self.approved_fabs

    def check(self, fab: bytes, installed: InstalledCode, source: str) -> CodeReview:
        """The review of a FAB that runs as the installed MedTune; refused if its code differs."""
        result = review(fab, installed, source)
        if not result.same_as_installed:
            raise CodeNotApprovedError(
                f"{result.summary()}; refused before any of it was imported. Review it with "
                "`medtune site review <fab>` and install the new version, or list its hash in "
                "approved-fabs"
            )
        return result
