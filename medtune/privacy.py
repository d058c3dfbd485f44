"""A hospital's privacy ledger: its (epsilon, delta) target, the noise derived from it, and every
step spent.

The noise multiplier is derived once, from the target and the planned number of steps for the
hospital's whole participation (rounds x local epochs x steps per epoch), with the same Opacus
accountant that then records each step. The ledger is a plain dict (`state_dict`) so it can be
saved, carried across rounds and restarts, and inspected; loading one restores the exact history.

Accounting cost: Opacus's noise search evaluates the PRV accountant a dozen times (0.3-4 s per
hospital on a CPU), and every round asks for epsilon several times. Both are pure functions of
their inputs, so they are memoised: epsilon per (accountant, history, delta) in the process, and
the noise search's answer on disk (`noise-multipliers.json` in MedTune's user cache). A remembered
noise multiplier is never trusted blindly: it is checked with one accountant evaluation to reach
the target over the planned steps, and searched again if it does not. Every epsilon is unchanged.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import opacus
from opacus.accountants import create_accountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.utils import get_noise_multiplier

from medtune.config import PrivacyConfig
from medtune.epsilon import NO_DP, read_epsilon
from medtune.errors import ConfigError, LedgerError, PrivacyBudgetError
from medtune.files import atomic_write_json, json_ready

LEDGER_FORMAT = "medtune-privacy-ledger/3"
# Format 1 wrote epsilon = inf (no DP) as null; format 2 writes it as "inf" (medtune/epsilon.py);
# format 3 adds the records it was made for and a checksum. Older ledgers are still read, so a
# hospital's history from an older MedTune is never lost.
LEDGER_FORMAT_2 = "medtune-privacy-ledger/2"
LEDGER_FORMAT_1 = "medtune-privacy-ledger/1"
log = logging.getLogger("medtune.privacy")

History = tuple[tuple[float, float, int], ...]


def ledger_checksum(state: dict[str, Any]) -> str:
    """sha256 of a ledger's fields as JSON writes them: accidental damage shows as damage.

    It is no seal against a deliberate edit (anyone can recompute it); the coordinator's record of
    the ledger (medtune/ledger_record.py) is the outside check for that.
    """
    body = json_ready({key: value for key, value in state.items() if key != "checksum"})
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=4096)
def epsilon_of(accountant: str, history: History, delta: float) -> float:
    """Epsilon of a step history under `accountant`: the one place MedTune asks Opacus for it."""
    if not history:
        return 0.0
    trial = create_accountant(mechanism=accountant)
    trial.load_state_dict({"history": list(history), "mechanism": accountant})
    return float(trial.get_epsilon(delta=delta))


def noise_memo_path() -> Path:
    """The on-disk memo of noise searches, in the user's cache folder (XDG_CACHE_HOME)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "medtune" / "noise-multipliers.json"


def _read_memo(path: Path) -> dict[str, float]:
    if not path.is_file():
        return {}
    try:
        memo = json.loads(path.read_text(encoding="utf-8"))
        return {str(k): float(v) for k, v in memo.items()}
    except (OSError, ValueError, TypeError, AttributeError) as error:
        log.warning(
            "%s is damaged (%s); searching noise multipliers afresh and rewriting it", path, error
        )
        return {}


# the noise search stops within this much below the target; a remembered sigma must too
SEARCH_TOLERANCE = 0.01


def _gives_target(
    sigma: float, accountant: str, epsilon: float, delta: float, sample_rate: float, steps: int
) -> bool:
    """Whether `sigma` spends epsilon within [target - SEARCH_TOLERANCE, target] over `steps`."""
    if not (math.isfinite(sigma) and sigma > 0):
        return False
    try:
        spent = epsilon_of(accountant, ((sigma, sample_rate, steps),), delta)
    # the accountant cannot evaluate it (e.g. a huge sigma)
    except (RuntimeError, ValueError, OverflowError):
        return False
    return epsilon - SEARCH_TOLERANCE <= spent <= epsilon


def noise_multiplier_for(
    accountant: str, epsilon: float, delta: float, sample_rate: float, steps: int
) -> float:
    """The noise multiplier Opacus's search gives for this target, remembered across processes.

    A remembered value is used only if one accountant evaluation confirms it gives the target over
    `steps` within the search's own tolerance, in both directions: too little noise would pass the
    target, too much would cost accuracy for nothing. Otherwise (a damaged or edited memo) the
    search runs again.
    """
    key = json.dumps([opacus.__version__, accountant, epsilon, delta, sample_rate, steps])
    path = noise_memo_path()
    memo = _read_memo(path)
    remembered = memo.get(key)
    if remembered is not None:
        if _gives_target(remembered, accountant, epsilon, delta, sample_rate, steps):
            return remembered
        log.warning(
            "%s: remembered noise multiplier %s does not give epsilon=%s; searching again",
            path,
            remembered,
            epsilon,
        )
    sigma = float(
        get_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            epsilon_tolerance=SEARCH_TOLERANCE,
        )
    )
    memo[key] = sigma
    try:
        atomic_write_json(path, memo)
    except OSError as error:  # a read-only home only costs the next search its time
        log.warning("cannot remember noise multipliers in %s (%s)", path, error)
    return sigma


class PrivacyLedger:
    """Tracks one hospital's spending against its target. Never lets training overspend it."""

    def __init__(
        self,
        config: PrivacyConfig,
        sample_rate: float,
        planned_steps: int,
        noise_multiplier: float | None = None,
    ) -> None:
        """A ledger with no steps yet. `noise_multiplier` None derives the noise for the whole
        participation; a stored ledger passes the one it was derived with (never derived again)."""
        if not 0.0 < sample_rate <= 1.0:
            raise LedgerError(f"sample rate must be in (0, 1], got {sample_rate}")
        if planned_steps < 1:
            raise LedgerError(f"planned steps must be at least 1, got {planned_steps}")
        self.config = config
        self.sample_rate = float(sample_rate)
        self.planned_steps = int(planned_steps)
        self.accountant: IAccountant = create_accountant(mechanism=config.accountant)
        self.non_private_steps = 0
        # whose spending this is: a ledger serves one hospital only
        self.hospital: str | None = None
        # digest of the records it was made for (medtune/ledger_file.py)
        self.records: str | None = None
        self.trained_rounds: list[int] = []  # federated rounds this hospital trained, in order
        self.events: list[str] = []  # what the step history alone does not explain
        if noise_multiplier is not None:
            self.noise_multiplier = float(noise_multiplier)
        elif config.is_private:
            try:
                self.noise_multiplier = noise_multiplier_for(
                    config.accountant,
                    config.epsilon,
                    config.delta,
                    self.sample_rate,
                    self.planned_steps,
                )
            except ValueError as error:
                raise PrivacyBudgetError(
                    f"epsilon={config.epsilon} is too small to train {planned_steps} steps at "
                    f"sampling rate {sample_rate:.4f} ({error}); raise epsilon, or plan fewer "
                    "rounds or epochs"
                ) from None
        else:
            self.noise_multiplier = 0.0

    @property
    def steps(self) -> int:
        """Steps taken so far, private or not."""
        return sum(steps for _, _, steps in self.accountant.history) + self.non_private_steps

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far: 0 before any step, inf once any non-private step was taken."""
        if self.non_private_steps:
            return math.inf
        return epsilon_of(self.config.accountant, self._history(), self.config.delta)

    def _history(self, extra_steps: int = 0) -> History:
        """The step history, with `extra_steps` more merged in exactly as Opacus's `step` records
        them."""
        history = [(float(s), float(q), int(n)) for s, q, n in self.accountant.history]
        if extra_steps:
            if history and history[-1][:2] == (self.noise_multiplier, self.sample_rate):
                history[-1] = (*history[-1][:2], history[-1][2] + int(extra_steps))
            else:
                history.append((self.noise_multiplier, self.sample_rate, int(extra_steps)))
        return tuple(history)

    def epsilon_at(self, steps: int) -> float:
        """Epsilon of this ledger's first `steps` steps: what its history says was spent by then."""
        if steps <= 0:
            return 0.0
        if self.non_private_steps:
            return math.inf
        prefix, left = [], int(steps)
        for sigma, rate, count in self._history():
            prefix.append((sigma, rate, min(count, left)))
            left -= prefix[-1][2]
            if left == 0:
                break
        return epsilon_of(self.config.accountant, tuple(prefix), self.config.delta)

    def epsilon_after(self, extra_steps: int) -> float:
        """Epsilon this hospital would have spent after `extra_steps` more steps at its noise
        level."""
        if not self.config.is_private:
            return math.inf
        return epsilon_of(self.config.accountant, self._history(extra_steps), self.config.delta)

    @property
    def remaining_steps(self) -> int:
        return max(0, self.planned_steps - self.steps)

    @property
    def exhausted(self) -> bool:
        """True once the planned steps are all spent: one more step would pass the target."""
        return self.config.is_private and self.remaining_steps == 0

    def check_can_spend(self, extra_steps: int) -> None:
        """Refuse, with a message, any training that would take epsilon past the target."""
        if not self.config.is_private:
            return
        after = self.epsilon_after(extra_steps)
        if after > self.config.epsilon:
            raise PrivacyBudgetError(
                f"training {extra_steps} more steps would spend epsilon={after:.3f}, past this "
                f"hospital's target epsilon={self.config.epsilon} (delta={self.config.delta}); "
                f"spent so far epsilon={self.epsilon:.3f} over {self.steps} steps"
            )

    def record_non_private_steps(self, steps: int) -> None:
        self.non_private_steps += int(steps)

    def claim_records(self, digest: str, source: str) -> None:
        """Tie this ledger to the records it counts; a ledger made for other records is refused."""
        if self.records not in (None, digest):
            raise LedgerError(
                f"{source} was made for other records (digest {self.records[:12]}, these are "
                f"{digest[:12]}): a ledger counts the privacy spent on one set of records; give "
                "these records a ledger of their own"
            )
        self.records = digest

    def claim(self, hospital: str, source: str) -> None:
        """Tie this ledger to `hospital`; a ledger already tied to another hospital is refused."""
        if self.hospital not in (None, hospital):
            raise LedgerError(
                f"{source} is the privacy ledger of hospital {self.hospital!r}, not of "
                f"{hospital!r}: give every hospital its own ledger path (two hospitals charging "
                "one ledger under-count both)"
            )
        self.hospital = hospital

    def start_round(self, server_round: int) -> None:
        """Note a federated round about to train; a round trained before is recorded as an event."""
        if server_round in self.trained_rounds:
            self.events.append(
                f"round {server_round} trained again from step {self.steps}: the coordinator sent "
                "it again after a restart; the earlier attempt's steps stay counted, and the new "
                "steps draw fresh noise"
            )
        self.trained_rounds.append(int(server_round))

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable ledger, with its checksum."""
        state = {
            "format": LEDGER_FORMAT,
            "epsilon_target": self.config.epsilon,
            "delta": self.config.delta,
            "max_grad_norm": self.config.max_grad_norm,
            "accountant": self.config.accountant,
            "sample_rate": self.sample_rate,
            "planned_steps": self.planned_steps,
            "noise_multiplier": self.noise_multiplier,
            "history": [[float(s), float(q), int(n)] for s, q, n in self.accountant.history],
            "non_private_steps": self.non_private_steps,
            "epsilon_spent": self.epsilon,
            "steps": self.steps,
            "hospital": self.hospital,
            "records": self.records,
            "trained_rounds": list(self.trained_rounds),
            "events": list(self.events),
        }
        return {**state, "checksum": ledger_checksum(state)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], source: str = "ledger") -> "PrivacyLedger":
        """Rebuild a ledger exactly; a malformed one is an error, never a silent fresh start."""
        if not isinstance(state, dict) or state.get("format") not in (
            LEDGER_FORMAT,
            LEDGER_FORMAT_2,
            LEDGER_FORMAT_1,
        ):
            raise LedgerError(
                f"{source}: not a MedTune privacy ledger (expected format '{LEDGER_FORMAT}')"
            )
        if state["format"] == LEDGER_FORMAT and state.get("checksum") != ledger_checksum(state):
            raise LedgerError(
                f"{source}: damaged privacy ledger (its checksum does not match its contents): the "
                "file was edited or corrupted; restore it from the site's backup (a fresh ledger "
                "would forget the epsilon spent)"
            )
        try:
            target = state["epsilon_target"]
            if state["format"] == LEDGER_FORMAT_1 and target is None:
                target = NO_DP
            epsilon = read_epsilon(target, f"{source} epsilon_target")
            config = PrivacyConfig(
                epsilon=epsilon,
                delta=float(state["delta"]),
                max_grad_norm=float(state["max_grad_norm"]),
                accountant=str(state["accountant"]),
            )
            sample_rate = float(state["sample_rate"])
            planned_steps = int(state["planned_steps"])
            noise_multiplier = float(state["noise_multiplier"])
            non_private_steps = int(state["non_private_steps"])
            history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
            recorded_steps = int(state["steps"])
            hospital = state.get("hospital")
            records = state.get("records")
            trained_rounds = [int(r) for r in state.get("trained_rounds", [])]
            events = [str(e) for e in state.get("events", [])]
        except (KeyError, TypeError, ValueError, ConfigError) as error:
            raise LedgerError(
                f"{source}: corrupted ledger ({type(error).__name__}: {error})"
            ) from None
        negative_steps = non_private_steps < 0 or any(steps < 0 for _, _, steps in history)
        if (
            not 0.0 < sample_rate <= 1.0
            or planned_steps < 1
            or not noise_multiplier >= 0  # NaN too
            or negative_steps
        ):
            raise LedgerError(
                f"{source}: corrupted ledger (sample rate {sample_rate}, planned steps "
                f"{planned_steps}, noise multiplier {noise_multiplier} or a step "
                "count is out of range)"
            )
        ledger = cls(config, sample_rate, planned_steps, noise_multiplier=noise_multiplier)
        ledger.accountant.load_state_dict({"history": history, "mechanism": config.accountant})
        ledger.non_private_steps = non_private_steps
        ledger.hospital = None if hospital is None else str(hospital)
        ledger.records = None if records is None else str(records)
        ledger.trained_rounds = trained_rounds
        ledger.events = events
        if recorded_steps != ledger.steps:
            raise LedgerError(
                f"{source}: corrupted ledger (its history adds up to {ledger.steps} steps but it "
                f"records {recorded_steps}); refusing to count this hospital's spending from it"
            )
        return ledger

    def matches(self, config: PrivacyConfig, sample_rate: float) -> None:
        """A stored ledger must belong to the same target and sampling; otherwise its promise
        changes."""
        if (
            self.config.epsilon != config.epsilon
            or self.config.delta != config.delta
            or self.config.accountant != config.accountant
            or not math.isclose(self.sample_rate, sample_rate, rel_tol=1e-9)
        ):
            raise LedgerError(
                f"stored ledger was made for epsilon={self.config.epsilon}, "
                f"delta={self.config.delta}, accountant={self.config.accountant}, sample rate "
                f"{self.sample_rate:.6f}; this run asks for epsilon={config.epsilon}, "
                f"delta={config.delta}, accountant={config.accountant}, sample rate "
                f"{sample_rate:.6f}. A hospital's budget cannot be restarted or changed "
                "mid-federation"
            )
