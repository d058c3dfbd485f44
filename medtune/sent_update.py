"""The last update a site sent, kept at the site so that a repeated round costs no privacy.

When the coordinator stops after the sites trained round r but before it recorded the round (a
SIGINT, a crash), the resumed run sends round r again from the same global state. Training again
would spend the round's budget twice. Instead the site sends the update it already released:
re-sending the same output draws no new noise and costs nothing. The update is kept beside the
ledger, with the round, a digest of the global state it was trained from and the ledger's step
count after that training, and deleted as soon as any other round starts.

It is written after the ledger: an update whose steps the ledger does not show (a crash between the
two writes) is never sent.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from medtune.files import atomic_write_bytes, safetensors_metadata

log = logging.getLogger("medtune.site")
META_KEY = "medtune.sent-update"


@dataclass(frozen=True)
class SentUpdate:
    """An update as it left the site: from which round and global state, after how many ledger
    steps."""

    round: int
    global_digest: str
    steps: int
    examples: int
    arrays: dict[str, np.ndarray]

    def answers(self, server_round: int, global_digest: str, ledger_steps: int) -> bool:
        """Whether this is the reply to the instruction (round, global state) at the ledger's
        current count."""
        return (self.round, self.global_digest, self.steps) == (
            server_round,
            global_digest,
            ledger_steps,
        )


class SentUpdateFile:
    """The site's copy of its last sent update, beside its ledger; never leaves the site except as
    that update."""

    def __init__(self, ledger_path: Path) -> None:
        self.path = ledger_path.with_name(f"{ledger_path.stem}.sent-update.safetensors")

    def read(self) -> SentUpdate | None:
        """The stored update; a damaged one is dropped (the round then trains), never sent."""
        if not self.path.is_file():
            return None
        try:
            raw = self.path.read_bytes()
            meta = json.loads(safetensors_metadata(raw)[META_KEY])
            return SentUpdate(
                round=int(meta["round"]),
                global_digest=str(meta["global"]),
                steps=int(meta["steps"]),
                examples=int(meta["examples"]),
                arrays=load(raw),
            )
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
            log.warning("%s is damaged (%s); it is not sent again", self.path, error)
            return None

    def write(self, update: SentUpdate) -> None:
        meta = {
            "round": update.round,
            "global": update.global_digest,
            "steps": update.steps,
            "examples": update.examples,
        }
        atomic_write_bytes(self.path, save(update.arrays, metadata={META_KEY: json.dumps(meta)}))

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)
