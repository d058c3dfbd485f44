"""Where a hospital's DP randomness comes from: Poisson sampling and Gaussian noise.

DP-SGD's guarantee holds only against a party that cannot predict the noise. Two sources:

- **secret** (every deployed site): each round's generator is seeded with 64 bits from the
  operating system's secure generator (`secrets`), drawn at the site and never stored or sent,
  and the Gaussian noise is drawn with Opacus's floating-point-safe sampler (`secure_mode`). No
  one outside the site, the coordinator included, can reproduce a draw, even knowing the run
  seed, the hospital's name and its ledger position.
- **seeded** (simulation, `medtune train`, benchmarks and tests): the generator is seeded by (run
  seed, hospital, steps already in the ledger), so the same seed gives the same run, and a round
  trained again after a restart draws fresh noise (two releases with the same noise are not
  independent: their difference cancels it). Seeded noise gives **no privacy against anyone who
  knows the seed**; it is for experiments on one machine, and a deployed site never uses it.
"""

from __future__ import annotations

import secrets
import zlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NoiseSource:
    """A hospital's source of DP randomness; `seed_for` gives the seed of its next round."""

    run_seed: int | None  # None: secret, drawn from the OS at every round
    hospital: str

    @classmethod
    def seeded(cls, run_seed: int, hospital: str) -> "NoiseSource":
        """Reproducible noise for simulation and tests: no privacy against whoever knows the
        seed."""
        return cls(run_seed=int(run_seed), hospital=hospital)

    @classmethod
    def secret(cls, hospital: str) -> "NoiseSource":
        """Noise that only this site can know: what every deployed site uses."""
        return cls(run_seed=None, hospital=hospital)

    @property
    def is_secret(self) -> bool:
        return self.run_seed is None

    def seed_for(self, steps_taken: int) -> int:
        """The seed of the round that starts at ledger position `steps_taken`.

        Secret: 64 fresh bits from the OS, unrelated to the position or to any earlier round.
        Seeded: derived from (run seed, hospital, position), so every trained step moves it.
        """
        if self.run_seed is None:
            return secrets.randbits(64)
        hospital = zlib.crc32(self.hospital.encode())
        return int(
            np.random.SeedSequence([self.run_seed, hospital, steps_taken]).generate_state(1)[0]
        )
