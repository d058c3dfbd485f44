"""One hospital's side of a federation, free of Flower: train a round, evaluate the global state.

The ClientApp is a thin shell around this. A round goes: global prompt and head in -> check the
privacy ledger against the coordinator's record of it (medtune/ledger_record.py) and that it can
afford the round -> DP training on the local train split -> ledger written to the site's disk ->
the new prompt and head out (and kept, so a repeated round is answered without a new step:
medtune/sent_update.py). The ledger is a file at the site (in simulation,
`<out>/sites/<hospital>/ledger.json`), so neither a restart nor a resumed run can ever reset a
hospital's epsilon.
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
from medtune.canaries import GradientCanaries, append_canary_steps, planted_input_canaries
from medtune.config import federation_passes
from medtune.data import Record, train_test_split
from medtune.errors import LedgerError, PrivacyBudgetError
from medtune.evaluation import evaluate
from medtune.features import record_inputs
from medtune.files import atomic_write_bytes, atomic_write_json
from medtune.ledger_file import load_or_create_ledger, records_digest
from medtune.ledger_record import LedgerRecord, check_identity
from medtune.locks import exclusive
from medtune.metrics import Evaluation
from medtune.model import PromptClassifier
from medtune.noise import NoiseSource
from medtune.own_evaluations import OwnEvaluations
from medtune.privacy import PrivacyLedger
from medtune.run_config import RunSettings
from medtune.sent_update import SentUpdate, SentUpdateFile
from medtune.state import ExchangedStateSpec, state_digest
from medtune.train import ProximalPull, SamplingPlan, train_local


@functools.lru_cache(maxsize=2)
def cached_backbone(path: str | None, num_layers: int | None, device: str) -> Backbone:
    """Load a backbone once per process: a simulated node trains many rounds in one worker."""
    return load_backbone(path, num_layers, device)


@dataclass(frozen=True)
class RoundOutcome:
    """What a hospital did in a round: trained (or sent its stored update again), or stopped (budget
    spent)."""

    arrays: dict[str, np.ndarray] | None
    examples: int
    ledger: PrivacyLedger
    stop_reason: str = ""
    # the round's update was already trained from this global state: sent again, no new step
    resent: bool = False

    @property
    def trained(self) -> bool:
        return self.arrays is not None


@dataclass(frozen=True)
class Instruction:
    """What the coordinator asks of this site for a round: the global state, and its record of the
    ledger."""

    arrays: dict[str, np.ndarray]
    server_round: int
    proximal_mu: float = 0.0
    record: LedgerRecord | None = None  # None: the coordinator does not know this node yet
    node: int = 0  # the node this site answers from, as Flower identifies it


class Site:
    """A hospital's records, split, turned into model inputs (cached at the site) and tied to its
    ledger file.

    The feature cache lives in `cache_dir` (default: `features/` beside the ledger) and never leaves
    the site. `noise` is where its DP randomness comes from: secret at a deployed site, seeded in
    simulation.
    """

    def __init__(
        self,
        name: str,
        records: list[Record],
        settings: RunSettings,
        ledger_path: Path,
        *,
        noise: NoiseSource,
        cache_dir: Path | None = None,
        audited: bool = False,
    ) -> None:
        self.name = name
        self.noise = noise
        self.settings = settings
        self.ledger_path = ledger_path
        self.backbone = cached_backbone(
            settings.model.backbone, settings.model.num_layers, settings.train.device
        )
        train_records, test_records = train_test_split(
            records, settings.data.test_fraction, settings.seed
        )
        # an audit's input canaries join the training split (medtune/canaries.py)
        if audited and settings.audit.black_box:
            train_records = train_records + planted_input_canaries(
                settings, name, train_records, self.backbone
            )
        self.records = records_digest(train_records)  # the ledger is tied to exactly these records
        cache = cache_dir or ledger_path.parent / "features"
        self.train_set = record_inputs(self.backbone, settings.model, train_records, cache)
        self.test_set = record_inputs(self.backbone, settings.model, test_records, cache)
        self.pad = self.backbone.tokenizer.pad_token_id
        # The local optimizer's moments live beside the ledger and, like it, never leave the site.
        self.optimizer_path = ledger_path.with_name(f"{ledger_path.stem}.optimizer.safetensors")
        self.sent_update = SentUpdateFile(ledger_path)
        self.own_evaluations = OwnEvaluations(ledger_path)
        self.gradient_canaries = (
            None
            if not (audited and settings.audit.white_box)
            else GradientCanaries.draw(
                settings.audit.canaries,
                self.spec,
                settings.seed,
                name,
                clip=settings.privacy.max_grad_norm,
                sample_rate=SamplingPlan.for_records(
                    len(self.train_set), settings.train.batch_size
                ).sample_rate,
            )
        )

    @property
    def spec(self) -> ExchangedStateSpec:
        """The exchanged state's names and shapes for this federation: what this site's update must
        be."""
        return ExchangedStateSpec(
            self.settings.model.prompt_length,
            self.backbone.hidden_size,
            len(self.settings.data.labels),
        )

    def _optimizer_state(self) -> dict[str, torch.Tensor] | None:
        if not self.optimizer_path.is_file():
            return None
        try:
            return load_tensors(self.optimizer_path.read_bytes())
        except (OSError, SafetensorError) as error:
            raise LedgerError(
                f"{self.optimizer_path}: the local optimizer state is damaged ({error}); delete it "
                "to restart Adam's moments (the privacy ledger is separate and unaffected)"
            ) from None

    def _model(self, arrays: dict[str, np.ndarray]) -> PromptClassifier:
        model = PromptClassifier(
            self.backbone, self.settings.model, len(self.settings.data.labels), self.settings.seed
        )
        model.load_exchanged_state(arrays, source=f"global state sent to {self.name}")
        return model

    def ledger(self, record: LedgerRecord | None = None) -> PrivacyLedger:
        """The hospital's ledger from its file, checked against the coordinator's `record` of it.

        A missing file after this site has trained is refused even without a record: the optimizer
        state beside the ledger is written after every trained round, so a ledger that is gone while
        it remains was deleted or moved, and a fresh one would forget spent epsilon.
        """
        settings = self.settings
        if not self.ledger_path.exists() and self.optimizer_path.exists():
            raise LedgerError(
                f"{self.ledger_path}: privacy ledger missing, but {self.optimizer_path.name} "
                "beside it shows this hospital has trained before; restore the ledger (a fresh "
                "one would forget the epsilon spent)"
            )
        return load_or_create_ledger(
            self.ledger_path,
            settings.privacy,
            len(self.train_set),
            settings.train.batch_size,
            federation_passes(settings.federation.rounds, settings.train.local_epochs),
            hospital=self.name,
            records=self.records,
            record=record,
        )

    def _steps_per_round(self) -> int:
        train = self.settings.train
        return (
            train.local_epochs
            * SamplingPlan.for_records(len(self.train_set), train.batch_size).steps_per_epoch
        )

    def can_take_part(self, instruction: Instruction) -> bool:
        """Whether this site would send an update for `instruction`: its stored one, or one it can
        afford.

        Raises, as training would, when the site cannot take part at all (a name clash, a ledger
        that disagrees with the coordinator's record). Nothing is spent or written.
        """
        check_identity(instruction.record, self.name, instruction.node)
        with exclusive(self.ledger_path, f"{self.name}'s privacy ledger"):
            ledger = self.ledger(instruction.record)
            if self._stored_answer(instruction, ledger) is not None:
                return True
            try:
                ledger.check_can_spend(self._steps_per_round())
            except PrivacyBudgetError:
                return False
            return True

    def _stored_answer(self, instruction: Instruction, ledger: PrivacyLedger) -> SentUpdate | None:
        """The update this site already sent for `instruction`, if the ledger shows its steps and
        nothing since."""
        stored = self.sent_update.read()
        if stored is None or not stored.answers(
            instruction.server_round, state_digest(instruction.arrays), ledger.steps
        ):
            return None
        return stored

    def train_round(self, instruction: Instruction) -> RoundOutcome:
        """Train on the global state, unless this round would take epsilon past the target.

        The same instruction again (a coordinator that stopped before recording the round) gets the
        update already sent, with no new step. The ledger is held (an OS lock) from reading to
        writing it back, so no other process can charge it meanwhile and have its steps overwritten.
        """
        check_identity(instruction.record, self.name, instruction.node)
        with exclusive(self.ledger_path, f"{self.name}'s privacy ledger"):
            ledger = self.ledger(instruction.record)
            stored = self._stored_answer(instruction, ledger)
            if stored is not None:
                return RoundOutcome(
                    arrays=stored.arrays, examples=stored.examples, ledger=ledger, resent=True
                )
            # another round has started: the last update is no longer an answer
            self.sent_update.delete()
            steps = self._steps_per_round()
            try:
                ledger.check_can_spend(steps)
            except PrivacyBudgetError as error:
                return RoundOutcome(arrays=None, examples=0, ledger=ledger, stop_reason=str(error))
            arrays = instruction.arrays
            model = self._model(arrays)
            mu = instruction.proximal_mu
            proximal = ProximalPull(mu, dict(arrays)) if mu > 0 else None
            ledger.start_round(instruction.server_round)
            result = train_local(
                model,
                self.train_set,
                ledger,
                self.settings.train,
                self.pad,
                seed=self.noise.seed_for(ledger.steps),
                passes=self.settings.train.local_epochs,
                progress=False,
                proximal=proximal,
                optimizer_state=self._optimizer_state(),
                secure_noise=self.noise.is_secret,
                canaries=self.gradient_canaries,
            )
            # The ledger reaches the site's disk before the update can leave the site, and before
            # the copy kept for a repeated round (which is sent only if the ledger shows its steps).
            atomic_write_json(self.ledger_path, ledger.state_dict())
            atomic_write_bytes(self.optimizer_path, save_tensors(result.optimizer_state))
            if result.canary_observations is not None:
                append_canary_steps(self.ledger_path, result.canary_observations)
            update = dict(model.exchanged_state())
            digest = state_digest(arrays)
            self.sent_update.write(
                SentUpdate(instruction.server_round, digest, ledger.steps, result.examples, update)
            )
        return RoundOutcome(arrays=update, examples=result.examples, ledger=ledger)

    def evaluate(self, arrays: dict[str, np.ndarray], server_round: int) -> Evaluation:
        """The global state on this hospital's held-out test split, kept in the site's own record of
        its scores."""
        model = self._model(arrays)
        evaluation = evaluate(
            model,
            self.test_set,
            self.settings.data.labels,
            self.pad,
            resolve_device(self.settings.train.device),
        )
        self.own_evaluations.record(server_round, evaluation)
        return evaluation
