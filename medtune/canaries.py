"""Audit canaries (`medtune audit --canaries M`): known signals planted at one simulated hospital,
so that an auditor can test whether its DP training hides a record as well as its ledger's epsilon
says.

Each of the M canaries of a kind is included with probability 1/2, independently, drawn from the
run seed: the auditor, who ran the simulation, knows which were in (Steinke, Nasr and Jagielski,
"Privacy Auditing with One (1) Training Run", 2023). A canary that is in is a record of the
hospital's training set in every way DP-SGD can tell:

- **gradient canaries** (white box): canary i is one coordinate direction d_i of the flattened
  prompt and head, of norm equal to the clipping bound C. Each step, an included canary is
  Poisson-sampled at the hospital's sampling rate, and when sampled its per-sample gradient C·d_i
  joins the batch's per-sample gradients before Opacus clips and noises them (medtune/train.py's
  ordinary step). Each step is read as DP's own adversary would (`PlantedCanaries`), and the
  readings are kept beside the site's ledger (`ledger.canary-steps.npy`).
- **input canaries** (black box): records of random vocabulary words with a random label; the
  included ones join the hospital's training split.

Only a simulated site plants canaries (`audit-canaries` in the run config); a deployed site
refuses a run config that asks for them (client/node_config.py).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from medtune.backbone import Backbone
from medtune.data import Record
from medtune.errors import ConfigError
from medtune.files import atomic_write_bytes
from medtune.model import PromptClassifier
from medtune.prompt_grad_sampler import per_sample_gradients, set_per_sample_gradients
from medtune.state import EXCHANGED_NAMES, ExchangedStateSpec

if TYPE_CHECKING:
    from medtune.run_config import RunSettings

INPUT_WORDS = 40  # words of an input canary: enough to fill a typical note's first sentences


def _generator(seed: int, hospital: str, purpose: str) -> np.random.Generator:
    """The auditor's own stream for one purpose at one hospital, independent of training's streams
    and of each other (which canaries are in must not depend on what they are)."""
    tag = int.from_bytes(hashlib.sha256(f"{hospital}/{purpose}".encode()).digest()[:8], "little")
    return np.random.default_rng([seed, tag])


def included_bits(count: int, seed: int, hospital: str, kind: str) -> np.ndarray:
    """Which of `count` canaries of `kind` are in: each with probability 1/2, independently."""
    return _generator(seed, hospital, f"{kind} in").random(count) < 0.5


@dataclass(frozen=True)
class GradientCanaries:
    """M coordinate directions of the flattened (prompt, head.weight, head.bias), and which are
    in."""

    # (M,) distinct flat indices into the exchanged state, in EXCHANGED_NAMES order
    directions: np.ndarray
    included: np.ndarray  # (M,) bool
    clip: float  # C: each canary's gradient norm, the records' clipping bound
    # the Poisson rate at which an included canary joins a step, as a record does
    sample_rate: float

    @classmethod
    def draw(
        cls,
        count: int,
        spec: ExchangedStateSpec,
        seed: int,
        hospital: str,
        clip: float,
        sample_rate: float,
    ) -> "GradientCanaries":
        size = sum(int(np.prod(shape)) for shape in spec.shapes.values())
        if count > size:
            raise ConfigError(
                f"audit-canaries = {count} is more than the {size} coordinates of the prompt and "
                "head; each gradient canary needs a coordinate of its own: give at most that many"
            )
        directions = _generator(seed, hospital, "gradient directions").choice(
            size, size=count, replace=False
        )
        return cls(
            np.sort(directions), included_bits(count, seed, hospital, "gradient"), clip, sample_rate
        )

    def sampled_gradients(
        self, model: PromptClassifier, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """This step's sampled canaries as per-sample gradient rows, one tensor (rows, *shape) per
        parameter."""
        chosen = torch.rand(len(self.directions), generator=generator).numpy() < self.sample_rate
        hits = self.directions[chosen & self.included]
        rows, offset = {}, 0
        for name, tensor in model.exchanged_tensors().items():
            block = torch.zeros(
                (len(hits), tensor.numel()), dtype=tensor.dtype, device=tensor.device
            )
            inside = (hits >= offset) & (hits < offset + tensor.numel())
            block[np.flatnonzero(inside), torch.from_numpy(hits[inside] - offset)] = self.clip
            rows[name] = block.reshape(len(hits), *tensor.shape)
            offset += tensor.numel()
        return rows

    def scores(self, updates: list[dict[str, np.ndarray]]) -> np.ndarray:
        """Each canary's score from the updates the coordinator received (sent state minus reply,
        per round): a sampled canary's gradient pushes its coordinate down, so the sum of the
        descents along it."""
        total = np.zeros(len(self.directions))
        # flattened in EXCHANGED_NAMES order, whatever order the file kept them in
        for descent in updates:
            flat = np.concatenate(
                [np.asarray(descent[name], dtype=np.float64).ravel() for name in EXCHANGED_NAMES]
            )
            total += flat[self.directions]
        return total


class PlantedCanaries:
    """One training call's gradient canaries: planted into each step, and each step read as a
    white-box auditor reads it.

    The auditor is DP's own adversary: it sees every step's released (noised) gradient and knows
    every other record's clipped gradient, so it subtracts the records' part at each canary's
    coordinate and is left with the canaries' part plus the noise. DP must hide a canary even from
    it; the sum of these observations over the steps is the canary's white-box score.
    """

    def __init__(self, canaries: GradientCanaries, seed: int, private: bool) -> None:
        self.canaries = canaries
        self.private = private
        self.generator = torch.Generator().manual_seed(seed)
        self.observations: list[np.ndarray] = []  # one (M,) row per step
        self._records_part = np.zeros(len(canaries.directions))

    def _at_directions(self, rows: list[torch.Tensor]) -> torch.Tensor:
        """(rows, M): each row's values at the canary coordinates, from per-tensor (rows, *shape)
        blocks."""
        flat = torch.cat([block.reshape(len(block), -1) for block in rows], dim=1)
        return flat[:, torch.from_numpy(self.canaries.directions)].double()

    def plant(self, model: PromptClassifier, size: int) -> None:
        """After backward, before the optimizer's step: note the records' part, then add this step's
        sampled canaries as records join a batch. Under DP as per-sample gradients, which Opacus
        then clips and noises with the records' own; without DP into the batch's summed gradient
        (the loss is a mean over `size`)."""
        tensors = model.exchanged_tensors()
        if self.private:
            samples = [per_sample_gradients(t) for t in tensors.values()]
            clipped = torch.zeros(len(self.canaries.directions), dtype=torch.float64)
            # Opacus's own clipping factor of each record: the auditor knows the records
            if len(samples[0]):
                norms = torch.stack(
                    [s.reshape(len(s), -1).norm(2, dim=-1) for s in samples], dim=1
                ).norm(2, dim=1)
                factors = (self.canaries.clip / (norms + 1e-6)).clamp(max=1.0).double()
                clipped = (self._at_directions(samples) * factors[:, None]).sum(0)
            self._records_part = clipped.numpy()
        else:
            grads = [
                t.grad if t.grad is not None else torch.zeros_like(t) for t in tensors.values()
            ]
            self._records_part = (self._at_directions([g[None] for g in grads])[0] * size).numpy()
        rows = self.canaries.sampled_gradients(model, self.generator)
        for name, parameter in tensors.items():
            extra = rows[name]
            if self.private:
                set_per_sample_gradients(
                    parameter, torch.cat([per_sample_gradients(parameter), extra])
                )
            elif len(extra):
                grad = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
                parameter.grad = grad + extra.sum(0) / max(1, size)

    def observe(self, model: PromptClassifier, scale: float) -> None:
        """After the step: the released gradient at each canary's coordinate, as a sum (times
        `scale`, the step's divisor), less the records' part."""
        grads = [
            t.grad if t.grad is not None else torch.zeros_like(t)
            for t in model.exchanged_tensors().values()
        ]
        released = self._at_directions([g[None] for g in grads])[0] * scale
        self.observations.append(released.numpy() - self._records_part)


def canary_steps_path(ledger_path: Path) -> Path:
    """Where an audited simulated site keeps its white-box observations, one row per step, beside
    its ledger."""
    return ledger_path.with_name(f"{ledger_path.stem}.canary-steps.npy")


def append_canary_steps(ledger_path: Path, observations: np.ndarray) -> None:
    """Add one round's step rows to the site's observations (written whole, atomically)."""
    path = canary_steps_path(ledger_path)
    rows = (
        np.concatenate([read_canary_steps(path), observations]) if path.is_file() else observations
    )
    buffer = io.BytesIO()
    np.save(buffer, rows, allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())


def read_canary_steps(path: Path) -> np.ndarray:
    """The (steps, M) observations an audited site kept; a damaged file is named."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"{path}: the audit's step observations cannot be read ({error})"
        ) from None


def input_canaries(
    count: int, vocabulary: list[str], num_labels: int, seed: int, hospital: str
) -> list[Record]:
    """M records of random vocabulary words with a random label: no real record resembles them."""
    rng = _generator(seed, hospital, "input records")
    words = rng.choice(len(vocabulary), size=(count, INPUT_WORDS))
    labels = rng.integers(num_labels, size=count)
    return [
        Record(" ".join(vocabulary[w] for w in row), int(label))
        for row, label in zip(words, labels, strict=True)
    ]


def audited_input_canaries(settings: RunSettings, backbone: Backbone) -> list[Record]:
    """All M input canaries of the run's audited hospital, in and out: what the auditor scores."""
    return input_canaries(
        settings.audit.canaries,
        word_vocabulary(backbone.tokenizer),
        len(settings.data.labels),
        settings.seed,
        settings.audit.hospital,
    )


def planted_input_canaries(
    settings: RunSettings, hospital: str, train_records: list[Record], backbone: Backbone
) -> list[Record]:
    """The input canaries that are in, for the audited hospital's training split; M is refused when
    the split cannot carry it (canaries would outnumber the hospital's own records)."""
    count = settings.audit.canaries
    if count > len(train_records):
        raise ConfigError(
            f"audit-canaries = {count} is more than {hospital}'s {len(train_records)} training "
            "records: the canaries would outnumber them; give at most that many, or audit a "
            "larger hospital"
        )
    records = audited_input_canaries(settings, backbone)
    return [
        record
        for record, inside in zip(
            records, included_bits(count, settings.seed, hospital, "input"), strict=True
        )
        if inside
    ]


def word_vocabulary(tokenizer) -> list[str]:  # noqa: ANN001 - any Hugging Face tokenizer
    """The tokenizer's whole-word alphabetic entries, in a fixed order: the words input canaries are
    made of."""
    return sorted(
        token
        for token in tokenizer.get_vocab()
        if token.isalpha() and token.isascii() and len(token) > 2
    )
