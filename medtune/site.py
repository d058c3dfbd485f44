"""One hospital's side of a federation, free of Flower: train a round, evaluate the global state.

The ClientApp is a thin shell around this. A round goes: global prompt and head in -> check the
privacy ledger can afford the round -> DP training on the local train split -> ledger written
to the site's disk -> the new prompt and head out. The ledger is a file at the site (in
simulation, `<out>/sites/<hospital>/ledger.json`), so neither a restart nor a resumed run can
ever reset a hospital's epsilon.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from medtune.backbone import Backbone, load_backbone, resolve_device
from medtune.data import Record, train_test_split
from medtune.errors import LedgerError, PrivacyBudgetError
from medtune.evaluation import evaluate
from medtune.features import record_inputs
from medtune.files import atomic_write_bytes, atomic_write_json
from medtune.ledger_file import load_or_create_ledger
from medtune.locks import exclusive
from medtune.metrics import Evaluation
from medtune.model import PromptClassifier
from medtune.noise import NoiseSource
from medtune.privacy import PrivacyLedger
from medtune.run_config import RunSettings
from medtune.train import ProximalPull, SamplingPlan, TrainResult, train_local


@functools.lru_cache(maxsize=2)
def cached_backbone(path: str | None, num_layers: int | None, device: str) -> Backbone:
    """Load a backbone once per process: a simulated node trains many rounds in one worker."""
    return load_backbone(path, num_layers, device)


@dataclass(frozen=True)
class RoundOutcome:
    """What a hospital did in a round: trained (arrays and result) or stopped (budget spent)."""

    arrays: dict[str, np.ndarray] | None
    result: TrainResult | None
    ledger: PrivacyLedger
    stop_reason: str = ""

    @property
    def trained(self) -> bool:
        return self.arrays is not None


class Site:
    """A hospital's records, split, turned into model inputs (cached at the site) and tied to its ledger file.

    The feature cache lives in `cache_dir` (default: `features/` beside the ledger) and never leaves the site.
    `noise` is where its DP randomness comes from: secret at a deployed site, seeded in simulation.
    """

    def __init__(
        self, name: str, records: list[Record], settings: RunSettings, ledger_path: Path, *, noise: NoiseSource,
        cache_dir: Path | None = None,
    ) -> None:
        self.name = name
        self.noise = noise
        self.settings = settings
        self.ledger_path = ledger_path
        self.backbone = cached_backbone(settings.model.backbone, settings.model.num_layers, settings.train.device)
        train_records, test_records = train_test_split(records, settings.data.test_fraction, settings.seed)
        cache = cache_dir or ledger_path.parent / "features"
        self.train_set = record_inputs(self.backbone, settings.model, train_records, cache)
        self.test_set = record_inputs(self.backbone, settings.model, test_records, cache)
        self.pad = self.backbone.tokenizer.pad_token_id
        # The local optimizer's moments live beside the ledger and, like it, never leave the site.
        self.optimizer_path = ledger_path.with_name(f"{ledger_path.stem}.optimizer.safetensors")

    def _optimizer_state(self) -> dict[str, torch.Tensor] | None:
        if not self.optimizer_path.is_file():
            return None
        try:
            return load_tensors(self.optimizer_path.read_bytes())
        except (OSError, SafetensorError) as error:
            raise LedgerError(
                f"{self.optimizer_path}: the local optimizer state is damaged ({error}); delete it to restart "
                "Adam's moments (the privacy ledger is separate and unaffected)"
            ) from None

    def _model(self, arrays: dict[str, np.ndarray]) -> PromptClassifier:
        model = PromptClassifier(self.backbone, self.settings.model, len(self.settings.data.labels), self.settings.seed)
        model.load_exchanged_state(arrays, source=f"global state sent to {self.name}")
        return model

    def ledger(self) -> PrivacyLedger:
        """The hospital's ledger from its file; a missing file after this site has trained is refused.

        The optimizer state beside the ledger is written after every trained round, so a ledger that
        is gone while it remains was deleted or moved: starting a fresh one would forget spent epsilon.
        """
        settings = self.settings
        if not self.ledger_path.exists() and self.optimizer_path.exists():
            raise LedgerError(
                f"{self.ledger_path}: privacy ledger missing, but {self.optimizer_path.name} beside it shows this "
                "hospital has trained before; restore the ledger (a fresh one would forget the epsilon spent)"
            )
        return load_or_create_ledger(
            self.ledger_path, settings.privacy, len(self.train_set), settings.train, settings.federation.rounds,
            hospital=self.name,
        )

    def train_round(self, arrays: dict[str, np.ndarray], server_round: int, proximal_mu: float) -> RoundOutcome:
        """Train on the global state, unless this round would take epsilon past the target.

        The ledger is held (an OS lock) from reading to writing it back, so no other process can
        charge it meanwhile and have its steps overwritten.
        """
        with exclusive(self.ledger_path, f"{self.name}'s privacy ledger"):
            ledger = self.ledger()
            train = self.settings.train
            steps = train.epochs * SamplingPlan.for_records(len(self.train_set), train.batch_size).steps_per_epoch
            try:
                ledger.check_can_spend(steps)
            except PrivacyBudgetError as error:
                return RoundOutcome(arrays=None, result=None, ledger=ledger, stop_reason=str(error))
            model = self._model(arrays)
            proximal = ProximalPull(proximal_mu, dict(arrays)) if proximal_mu > 0 else None
            ledger.start_round(server_round)
            result = train_local(
                model, self.train_set, ledger, train, self.pad, seed=self.noise.seed_for(ledger.steps), progress=False,
                proximal=proximal, optimizer_state=self._optimizer_state(), secure_noise=self.noise.is_secret,
            )
            # The ledger reaches the site's disk before the update can leave the site.
            atomic_write_json(self.ledger_path, ledger.state_dict())
            atomic_write_bytes(self.optimizer_path, save_tensors(result.optimizer_state))
        return RoundOutcome(arrays=dict(model.exchanged_state()), result=result, ledger=ledger)

    def evaluate(self, arrays: dict[str, np.ndarray]) -> Evaluation:
        """The global state on this hospital's held-out test split."""
        model = self._model(arrays)
        return evaluate(model, self.test_set, self.settings.data.labels, self.pad, resolve_device(self.settings.train.device))
