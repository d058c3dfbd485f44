"""How a simulated hospital is named, and where its site folder lives under a run's out directory.

Which records it holds is the simulation's business (medtune/federation/partitions.py).
"""

from __future__ import annotations

from pathlib import Path


def hospital_name(partition_id: int) -> str:
    """The name of simulated hospital `partition_id` (0-based)."""
    return f"hospital_{partition_id + 1}"


def simulated_ledger_path(out: Path, hospital: str) -> Path:
    """Where a simulated hospital keeps its ledger, under the run's out directory (its site folder
    holds the ledger's companions too: optimizer state, own scores, feature cache)."""
    return out / "sites" / hospital / "ledger.json"
