"""A hospital's privacy ledger on disk: continue the stored one (it must match this run, hospital
and records, and the coordinator's record of it), or start a fresh one only where none exists.

Used by a federated site (medtune/site.py) and by `medtune train` (medtune/standalone.py); the file
is held with an OS lock by the caller from reading to writing back (medtune/locks.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from medtune.config import PrivacyConfig
from medtune.data import Record
from medtune.errors import LedgerError
from medtune.ledger_record import LedgerRecord, check_ledger
from medtune.privacy import PrivacyLedger
from medtune.train import SamplingPlan, new_ledger


def records_digest(records: Sequence[Record]) -> str:
    """sha256 over the records a ledger counts (text and label, in order): which data it was made
    for."""
    digest = hashlib.sha256()
    for record in records:
        text = record.text.encode("utf-8")
        digest.update(
            len(text).to_bytes(8, "little") + text + int(record.label).to_bytes(8, "little")
        )
    return digest.hexdigest()


def read_ledger(path: Path) -> PrivacyLedger | None:
    """The ledger stored at `path`, or None when there is no file; an unreadable one is refused."""
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise LedgerError(
            f"{path}: unreadable privacy ledger ({error}); refusing to start a fresh one"
        ) from None
    return PrivacyLedger.from_state_dict(state, source=str(path))


def load_or_create_ledger(
    path: Path | None,
    privacy: PrivacyConfig,
    num_records: int,
    batch_size: int,
    planned_passes: int,
    *,
    hospital: str,
    records: str,
    record: LedgerRecord | None = None,
) -> PrivacyLedger:
    """The ledger stored at `path` if there is one, else a fresh one; either way it must be
    `hospital`'s, made for the training records whose `records_digest` is `records`, and agree with
    the coordinator's `record` of it. A fresh one is planned for `planned_passes` over the records
    (medtune/train.py, new_ledger)."""
    ledger = read_ledger(path) if path is not None else None
    check_ledger(ledger, record, path or Path("(no ledger file)"))
    if ledger is None:
        ledger = new_ledger(privacy, num_records, batch_size, planned_passes)
    else:
        ledger.matches(privacy, SamplingPlan.for_records(num_records, batch_size).sample_rate)
    source = str(path) if path is not None else "this ledger"
    ledger.claim(hospital, source)
    ledger.claim_records(records, source)
    return ledger
