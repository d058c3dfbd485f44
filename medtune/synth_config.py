"""The synthetic source's settings and label names, apart from the note generator
(medtune/synth.py).

Reading a run config needs these (the default labels, and the checks on `records-per-hospital`);
the generator is loaded only where notes are written, never by a coordinator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from medtune.defaults import from_pyproject
from medtune.errors import ConfigError

LABELS: tuple[str, ...] = (
    "cardiology",
    "pulmonology",
    "gastroenterology",
    "neurology",
    "infectious_disease",
)


@dataclass(frozen=True)
class SynthConfig:
    """How many hospitals, how big, how skewed, how noisy."""

    hospitals: int = from_pyproject("hospitals")
    # the mean; sizes spread log-normally (size_skew)
    mean_records: int = from_pyproject("records-per-hospital")
    size_skew: float = 0.6
    dirichlet_alpha: float = from_pyproject("dirichlet-alpha")
    label_noise: float = 0.05
    seed: int = from_pyproject("seed")

    def __post_init__(self) -> None:
        if self.hospitals < 1:
            raise ConfigError(f"synth.hospitals must be at least 1, got {self.hospitals}")
        if self.mean_records < 20:
            raise ConfigError(f"synth.mean_records must be at least 20, got {self.mean_records}")
        # NaN fails both
        if not (0 <= self.size_skew < math.inf and 0 < self.dirichlet_alpha < math.inf):
            raise ConfigError(
                "synth.size_skew must be a finite number >= 0 and synth.dirichlet_alpha a finite "
                f"number > 0, got {self.size_skew} and {self.dirichlet_alpha}"
            )
        if not 0 <= self.seed < 2**32:
            raise ConfigError(
                f"synth.seed must be a whole number from 0 to 2**32 - 1, got {self.seed}"
            )
        if not 0.0 <= self.label_noise < 0.5:
            raise ConfigError(f"synth.label_noise must be in [0, 0.5), got {self.label_noise}")
