"""The coordinator's record of one hospital's ledger, and the site's check of its own ledger against
it.

A site's ledger is a file on the site's disk: a wiped folder, a restored old backup or an edited
history would each let the hospital spend privacy its ledger no longer shows. The coordinator
keeps an outside copy of what the site reported: after each round the hospital trained, its
steps and epsilon, and the node it answered from. It sends that record with every instruction,
and before any step the site checks its ledger against it: a ledger that is missing, behind the
record, or whose history gives a lower epsilon for the recorded steps is refused.

The record can only add refusals. A coordinator that sends none, or an old one, leaves the site
with its own ledger's protection (the ledger still never passes the site's target); one that
sends an inflated record can only stop the site from training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from medtune.errors import HospitalNameError, LedgerError

if TYPE_CHECKING:  # the coordinator builds records without loading the accountant (Opacus)
    from medtune.privacy import PrivacyLedger

# The site reports its epsilon as a float, exactly; this only absorbs a different accountant build's
# rounding.
EPSILON_SLACK = 1e-9


@dataclass(frozen=True)
class Spend:
    """What a hospital's ledger reported after one round: its total steps and epsilon then."""

    round: int
    steps: int
    epsilon: float


@dataclass(frozen=True)
class LedgerRecord:
    """What the coordinator recorded of `hospital`'s ledger, and the node that hospital answers
    from."""

    hospital: str
    node: int
    spends: tuple[Spend, ...] = ()

    @property
    def steps(self) -> int:
        """The most steps the ledger has reported: it may never show fewer."""
        return max((spend.steps for spend in self.spends), default=0)


def check_identity(record: LedgerRecord | None, hospital: str, node: int) -> None:
    """Refuse when the coordinator has `hospital` answering from another node: two sites share a
    name."""
    if record is None:
        return
    if record.hospital != hospital:
        raise HospitalNameError(
            f"the coordinator's record for this node (node {node}) is of hospital "
            f"{record.hospital!r}, but this site is {hospital!r}: a node keeps one hospital name "
            "for the whole run"
        )
    if record.node != node:
        raise HospitalNameError(
            f"the coordinator has hospital {hospital!r} on node {record.node}; this is node "
            f"{node}: another site already calls itself by this name in this federation. Give each "
            "site its own `hospital` name"
        )


def check_ledger(ledger: PrivacyLedger | None, record: LedgerRecord | None, path: Path) -> None:
    """Refuse a ledger (None: no file) that is missing, behind, or gives a lower epsilon than the
    record."""
    if record is None or not record.spends:
        return
    last = max(record.spends, key=lambda spend: spend.steps)
    if ledger is None:
        raise LedgerError(
            f"{path}: privacy ledger missing, but the coordinator records {last.steps} steps "
            f"(epsilon={last.epsilon:.3f}) for {record.hospital} after round {last.round}; restore "
            "the ledger (a fresh one would forget the epsilon spent)"
        )
    if ledger.steps < last.steps:
        raise LedgerError(
            f"{path}: privacy ledger is behind: it records {ledger.steps} steps, but the "
            f"coordinator records {last.steps} after round {last.round}; it was replaced by an "
            "older copy. Restore the latest ledger"
        )
    for spend in record.spends:
        own = ledger.epsilon_at(spend.steps)
        if own < spend.epsilon * (1.0 - EPSILON_SLACK):
            raise LedgerError(
                f"{path}: privacy ledger's history gives epsilon={own:.3f} for its first "
                f"{spend.steps} steps, but after round {spend.round} it reported "
                f"epsilon={spend.epsilon:.3f} to the coordinator: the history was edited. Restore "
                "the ledger from the site's backup"
            )
