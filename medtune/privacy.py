"""A hospital's privacy ledger: its (epsilon, delta) target, the noise derived from it, and every step spent.

The noise multiplier is derived once, from the target and the planned number of steps for the
hospital's whole participation (rounds x local epochs x steps per epoch), with the same Opacus
accountant that then records each step. The ledger is a plain dict (`state_dict`) so it can be
saved, carried across rounds and restarts, and inspected; loading one restores the exact history.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from opacus.accountants import create_accountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.utils import get_noise_multiplier

from medtune.config import PrivacyConfig
from medtune.errors import ConfigError, LedgerError, PrivacyBudgetError

LEDGER_FORMAT = "medtune-privacy-ledger/1"


class PrivacyLedger:
    """Tracks one hospital's spending against its target. Never lets training overspend it."""

    def __init__(self, config: PrivacyConfig, sample_rate: float, planned_steps: int) -> None:
        if not 0.0 < sample_rate <= 1.0:
            raise LedgerError(f"sample rate must be in (0, 1], got {sample_rate}")
        if planned_steps < 1:
            raise LedgerError(f"planned steps must be at least 1, got {planned_steps}")
        self.config = config
        self.sample_rate = float(sample_rate)
        self.planned_steps = int(planned_steps)
        self.accountant: IAccountant = create_accountant(mechanism=config.accountant)
        self.non_private_steps = 0
        if config.is_private:
            try:
                self.noise_multiplier = float(
                    get_noise_multiplier(
                        target_epsilon=config.epsilon,
                        target_delta=config.delta,
                        sample_rate=self.sample_rate,
                        steps=self.planned_steps,
                        accountant=config.accountant,
                    )
                )
            except ValueError as error:
                raise PrivacyBudgetError(
                    f"epsilon={config.epsilon} is too small to train {planned_steps} steps at sampling rate "
                    f"{sample_rate:.4f} ({error}); raise epsilon, or plan fewer rounds or epochs"
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
        if not self.accountant.history:
            return 0.0
        return float(self.accountant.get_epsilon(delta=self.config.delta))

    def epsilon_after(self, extra_steps: int) -> float:
        """Epsilon this hospital would have spent after `extra_steps` more steps at its noise level."""
        if not self.config.is_private:
            return math.inf
        if extra_steps == 0:
            return self.epsilon
        trial = copy.deepcopy(self.accountant)
        for _ in range(int(extra_steps)):
            trial.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return float(trial.get_epsilon(delta=self.config.delta))

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
                f"training {extra_steps} more steps would spend epsilon={after:.3f}, past this hospital's "
                f"target epsilon={self.config.epsilon} (delta={self.config.delta}); spent so far "
                f"epsilon={self.epsilon:.3f} over {self.steps} steps"
            )

    def record_non_private_steps(self, steps: int) -> None:
        self.non_private_steps += int(steps)

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable ledger."""
        return {
            "format": LEDGER_FORMAT,
            "epsilon_target": None if not self.config.is_private else self.config.epsilon,
            "delta": self.config.delta,
            "max_grad_norm": self.config.max_grad_norm,
            "accountant": self.config.accountant,
            "sample_rate": self.sample_rate,
            "planned_steps": self.planned_steps,
            "noise_multiplier": self.noise_multiplier,
            "history": [[float(s), float(q), int(n)] for s, q, n in self.accountant.history],
            "non_private_steps": self.non_private_steps,
            "epsilon_spent": None if math.isinf(self.epsilon) else self.epsilon,
            "steps": self.steps,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], source: str = "ledger") -> "PrivacyLedger":
        """Rebuild a ledger exactly; a malformed one is an error, never a silent fresh start."""
        if not isinstance(state, dict) or state.get("format") != LEDGER_FORMAT:
            raise LedgerError(f"{source}: not a MedTune privacy ledger (expected format '{LEDGER_FORMAT}')")
        try:
            epsilon = math.inf if state["epsilon_target"] is None else float(state["epsilon_target"])
            config = PrivacyConfig(
                epsilon=epsilon,
                delta=float(state["delta"]),
                max_grad_norm=float(state["max_grad_norm"]),
                accountant=str(state["accountant"]),
            )
            ledger = cls.__new__(cls)
            ledger.config = config
            ledger.sample_rate = float(state["sample_rate"])
            ledger.planned_steps = int(state["planned_steps"])
            ledger.noise_multiplier = float(state["noise_multiplier"])
            ledger.non_private_steps = int(state["non_private_steps"])
            ledger.accountant = create_accountant(mechanism=config.accountant)
            ledger.accountant.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
            recorded_steps = int(state["steps"])
        except (KeyError, TypeError, ValueError, ConfigError) as error:
            raise LedgerError(f"{source}: corrupted ledger ({type(error).__name__}: {error})") from None
        negative_steps = ledger.non_private_steps < 0 or any(steps < 0 for _, _, steps in ledger.accountant.history)
        if not 0.0 < ledger.sample_rate <= 1.0 or ledger.planned_steps < 1 or ledger.noise_multiplier < 0 or negative_steps:
            raise LedgerError(
                f"{source}: corrupted ledger (sample rate {ledger.sample_rate}, planned steps {ledger.planned_steps}, "
                f"noise multiplier {ledger.noise_multiplier} or a step count is out of range)"
            )
        if recorded_steps != ledger.steps:
            raise LedgerError(
                f"{source}: corrupted ledger (its history adds up to {ledger.steps} steps but it records "
                f"{recorded_steps}); refusing to count this hospital's spending from it"
            )
        return ledger

    def matches(self, config: PrivacyConfig, sample_rate: float) -> None:
        """A stored ledger must belong to the same target and sampling; otherwise its promise changes."""
        if (
            self.config.epsilon != config.epsilon
            or self.config.delta != config.delta
            or self.config.accountant != config.accountant
            or not math.isclose(self.sample_rate, sample_rate, rel_tol=1e-9)
        ):
            raise LedgerError(
                f"stored ledger was made for epsilon={self.config.epsilon}, delta={self.config.delta}, "
                f"accountant={self.config.accountant}, sample rate {self.sample_rate:.6f}; this run asks for "
                f"epsilon={config.epsilon}, delta={config.delta}, accountant={config.accountant}, sample rate "
                f"{sample_rate:.6f}. A hospital's budget cannot be restarted or changed mid-federation"
            )
