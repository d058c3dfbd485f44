"""A hospital's privacy ledger on disk: continue the stored one (it must match this run and hospital),
or start a fresh one only where none exists.

Used by a federated site (medtune/site.py) and by `medtune train` (medtune/standalone.py); the file is
held with an OS lock by the caller from reading to writing back (medtune/locks.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from medtune.config import PrivacyConfig, TrainConfig
from medtune.errors import LedgerError
from medtune.privacy import PrivacyLedger
from medtune.train import SamplingPlan, new_ledger


def load_or_create_ledger(
    path: Path | None, privacy: PrivacyConfig, num_records: int, train: TrainConfig, rounds: int,
    hospital: str | None = None,
) -> PrivacyLedger:
    """The ledger stored at `path` if there is one (it must match this run and hospital), else a fresh one."""
    if path is not None and path.exists():
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise LedgerError(f"{path}: unreadable privacy ledger ({error}); refusing to start a fresh one") from None
        ledger = PrivacyLedger.from_state_dict(state, source=str(path))
        ledger.matches(privacy, SamplingPlan.for_records(num_records, train.batch_size).sample_rate)
    else:
        ledger = new_ledger(privacy, num_records, train, rounds)
    if hospital is not None:
        ledger.claim(hospital, str(path))
    return ledger
