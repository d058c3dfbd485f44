"""A site's own record of how each round's global state scored on its test split.

With secure aggregation the coordinator learns only the federation's summed test counts, so a
hospital's own accuracy is known to the hospital alone: it is kept here, beside its ledger
(`ledger.evaluations.json`), one entry per round (a round evaluated again replaces its entry).
In simulation the sites' folders lie under the run's out directory, where the user who ran it can
read them: `medtune simulate` prints its per-hospital table from these files, never from
anything the coordinator received.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from medtune.errors import MedTuneError
from medtune.files import atomic_write_json, read_json
from medtune.hospitals import hospital_name, simulated_ledger_path
from medtune.metrics import Evaluation

SUFFIX = ".evaluations.json"


@dataclass(frozen=True)
class OwnScore:
    """One round's global state on one hospital's own test split."""

    accuracy: float
    macro_f1: float
    examples: int


class OwnEvaluations:
    """The file of one site's own scores, keyed by round."""

    def __init__(self, ledger_path: Path) -> None:
        self.path = ledger_path.with_name(ledger_path.stem + SUFFIX)

    def read(self) -> dict[int, OwnScore]:
        if not self.path.exists():
            return {}
        try:
            return {
                int(r): OwnScore(float(s["accuracy"]), float(s["macro_f1"]), int(s["examples"]))
                for r, s in read_json(self.path).items()
            }
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise MedTuneError(
                f"{self.path}: unreadable own evaluation record ({type(error).__name__}: {error})"
            ) from None

    def record(self, server_round: int, evaluation: Evaluation) -> None:
        scores = self.read()
        scores[server_round] = OwnScore(
            evaluation.accuracy, evaluation.macro_f1, evaluation.examples
        )
        atomic_write_json(self.path, {str(r): vars(s) for r, s in sorted(scores.items())})


def simulated_scores(out: Path, hospitals: int) -> dict[str, dict[int, OwnScore]]:
    """The simulated hospitals' own scores, from their site folders under a run's out directory."""
    names = [hospital_name(i) for i in range(hospitals)]
    return {name: OwnEvaluations(simulated_ledger_path(out, name)).read() for name in names}


def own_scores_table(scores: dict[str, dict[int, OwnScore]]) -> Table:
    """Per round: each hospital's own accuracy and the worst of them, as the sites recorded them."""
    rounds = sorted({r for by_round in scores.values() for r in by_round})
    table = Table(
        title="each hospital's own test split, from the sites' own records (the coordinator never "
        "saw these)",
        title_justify="left",
        show_edge=False,
        pad_edge=False,
        box=None,
    )
    for column in ("round", *scores, "worst"):
        table.add_column(column, justify="right", no_wrap=True)
    for server_round in rounds:
        row = [scores[h].get(server_round) for h in scores]
        known = [s.accuracy for s in row if s is not None]
        table.add_row(
            str(server_round),
            *("-" if s is None else f"{s.accuracy:.3f}" for s in row),
            f"{min(known):.3f}" if known else "-",
        )
    return table


def print_own_scores(out: Path, hospitals: int, console: Console | None = None) -> None:
    scores = simulated_scores(out, hospitals)
    if any(scores.values()):
        (console or Console()).print(own_scores_table(scores))
