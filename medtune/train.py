"""Local training of prompt and head, with Opacus DP-SGD when the hospital's budget is finite.

The loop is written out: Poisson-sampled batch -> forward -> mean cross-entropy -> backward
(Opacus hooks keep per-sample gradients of prompt and head) -> optimizer.step() (clip each
record's gradient to max_grad_norm, add Gaussian noise, record the step in the ledger).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from medtune.backbone import resolve_device
from medtune.canaries import GradientCanaries, PlantedCanaries
from medtune.config import PrivacyConfig, TrainConfig
from medtune.data import PadToLongest
from medtune.errors import PrivacyBudgetError
from medtune.features import RecordInputs
from medtune.heap import keep_heap_compact
from medtune.model import PromptClassifier
from medtune.privacy import PrivacyLedger
from medtune.prompt_grad_sampler import set_per_sample_gradients


@dataclass(frozen=True)
class SamplingPlan:
    """How DP-SGD samples one hospital's training set: one step per expected batch."""

    steps_per_epoch: int
    sample_rate: float

    @classmethod
    def for_records(cls, num_records: int, batch_size: int) -> "SamplingPlan":
        steps = max(1, math.ceil(num_records / batch_size))
        return cls(steps_per_epoch=steps, sample_rate=1.0 / steps)


@dataclass(frozen=True)
class TrainResult:
    loss: float
    steps: int
    examples: int
    epsilon: float
    delta: float
    optimizer_state: dict[str, torch.Tensor]  # Adam's moments after the last step (see train_local)
    # (steps, M): an audit's white-box reading (medtune/canaries.py)
    canary_observations: np.ndarray | None = None

    def metrics(self) -> dict[str, float]:
        """The figures worth reporting (the optimizer state stays at the site, unreported)."""
        return {
            "loss": self.loss,
            "steps": self.steps,
            "examples": self.examples,
            "epsilon": self.epsilon,
            "delta": self.delta,
        }


def flat_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Adam's per-parameter state as flat named tensors ("<param index>.<name>"), for
    safetensors."""
    return {
        f"{index}.{name}": value.detach().cpu().clone()
        for index, state in optimizer.state_dict()["state"].items()
        for name, value in state.items()
    }


def load_flat_optimizer_state(
    optimizer: torch.optim.Optimizer, flat: dict[str, torch.Tensor]
) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(
        {"state": state, "param_groups": optimizer.state_dict()["param_groups"]}
    )


@dataclass(frozen=True)
class ProximalPull:
    """FedProx's proximal term, applied as a decoupled pull towards the round's global state.

    After each optimizer step every trainable tensor moves by lr * mu * (global - local). The pull
    depends only on the global state, never on a record, so under DP it is post-processing: it
    costs no privacy and needs no per-sample gradient (a term added to the loss would be dropped
    by Opacus, which only uses per-sample gradients).
    """

    mu: float
    anchor: dict[str, np.ndarray]

    def apply(self, model: PromptClassifier, learning_rate: float) -> None:
        with torch.no_grad():
            for name, tensor in model.exchanged_tensors().items():
                target = torch.from_numpy(self.anchor[name]).to(tensor.device, tensor.dtype)
                tensor.sub_(learning_rate * self.mu * (tensor - target))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class RandomStreams:
    """Independent seeds, derived from one round seed, for each source of randomness in a DP round.

    Poisson sampling and the Gaussian noise must be independent draws: seeded alike, torch's CPU
    generator gives both the same stream, so which records were sampled would be correlated with
    the noise added to them, which the accounting assumes never happens.
    """

    sampling: int
    noise: int
    # Python, NumPy and torch's global generators (dropout is off; nothing private uses them)
    other: int
    canaries: int  # an audit's canaries joining steps (medtune/canaries.py), sampled as records are

    @classmethod
    def from_seed(cls, seed: int) -> "RandomStreams":
        sampling, noise, other, canaries = (
            int(s) for s in np.random.SeedSequence(seed).generate_state(4, dtype=np.uint64)
        )
        return cls(sampling=sampling, noise=noise, other=other, canaries=canaries)


def new_ledger(
    privacy: PrivacyConfig, num_records: int, batch_size: int, planned_passes: int
) -> PrivacyLedger:
    """A fresh ledger whose noise is derived for the hospital's whole participation:
    `planned_passes` over its records in all (in a federation, medtune.config.federation_passes)."""
    plan = SamplingPlan.for_records(num_records, batch_size)
    return PrivacyLedger(
        privacy, plan.sample_rate, planned_steps=planned_passes * plan.steps_per_epoch
    )


def _batch_loss(
    model: PromptClassifier, batch: dict[str, torch.Tensor], device: torch.device
) -> torch.Tensor:
    labels = batch["labels"].to(device)
    logits = model(batch["inputs"].to(device), batch["attention_mask"].to(device))
    # Mean over the records actually sampled; an empty Poisson batch gives a zero loss (still a DP
    # step).
    return F.cross_entropy(logits, labels, reduction="sum") / max(1, labels.shape[0])


def _records_in(batch: dict[str, torch.Tensor] | list[torch.Tensor]) -> int:
    """Records in a batch. Opacus hands an empty Poisson batch over as a list of empty tensors,
    whatever the dataset's items are, so a list is an empty batch."""
    return 0 if isinstance(batch, list) else int(batch["labels"].shape[0])


def _noise_only_step(model: PromptClassifier, device: torch.device) -> torch.Tensor:
    """An empty Poisson batch is still a DP step: zero per-sample gradients, then clip (nothing) and
    noise.

    The encoder cannot run on zero records, so the empty per-sample gradients are set directly.
    """
    for parameter in model.trainable_parameters():
        set_per_sample_gradients(
            parameter, torch.zeros((0, *parameter.shape), device=device, dtype=parameter.dtype)
        )
    return torch.zeros((), device=device)


def _check_plan(
    dataset: RecordInputs, ledger: PrivacyLedger, batch_size: int, passes: int
) -> tuple[SamplingPlan, int]:
    """The call's sampling plan and step count, refused before any step if it would break the
    ledger's promise."""
    plan = SamplingPlan.for_records(len(dataset), batch_size)
    if ledger.config.is_private and not math.isclose(
        plan.sample_rate, ledger.sample_rate, rel_tol=1e-9
    ):
        raise PrivacyBudgetError(
            f"this hospital's ledger was planned for sampling rate {ledger.sample_rate:.6f} but "
            f"its training set now gives {plan.sample_rate:.6f}; its records or batch size changed "
            "mid-federation"
        )
    total_steps = passes * plan.steps_per_epoch
    ledger.check_can_spend(total_steps)
    return plan, total_steps


def _make_private(
    model: PromptClassifier,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    ledger: PrivacyLedger,
    device: torch.device,
    noise_seed: int,
    secure_noise: bool,
) -> tuple[Any, torch.optim.Optimizer, DataLoader]:
    """Opacus's DP-SGD around model, optimizer and loader: Poisson batches, per-sample clipping,
    noise.

    Every step is recorded in the hospital's own ledger, whose noise multiplier was derived for its
    whole participation. The noise comes from a generator seeded by `noise_seed`, sampling from the
    loader's own generator (RandomStreams); `secure_noise` draws the Gaussian noise with Opacus's
    sampler that resists floating-point attacks.
    """
    engine = PrivacyEngine(accountant=ledger.config.accountant)
    engine.accountant = ledger.accountant  # every step lands in the hospital's own ledger
    hooks, private_optimizer, private_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=ledger.noise_multiplier,
        max_grad_norm=ledger.config.max_grad_norm,
        poisson_sampling=True,
        wrap_model=False,
        noise_generator=torch.Generator(device=device).manual_seed(noise_seed),
    )
    # Opacus refuses a seeded generator with its own secure_mode (which needs torchcsprng); the
    # optimizer's flag alone selects its floating-point-safe Gaussian sampler.
    private_optimizer.secure_mode = secure_noise
    return hooks, private_optimizer, private_loader


def _run_steps(
    model: PromptClassifier,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    train: TrainConfig,
    passes: int,
    total_steps: int,
    device: torch.device,
    proximal: ProximalPull | None,
    progress: bool,
    canaries: PlantedCanaries | None = None,
) -> tuple[float, int]:
    """The loop: `passes` passes of (zero grads, loss, backward, [audit canaries], DP step,
    FedProx pull).

    Returns the summed loss and the number of records sampled.
    """
    total_loss, examples = 0.0, 0
    with tqdm(
        total=total_steps, desc="local training", unit="step", disable=not progress, leave=False
    ) as bar:
        for _ in range(passes):
            for batch in loader:
                optimizer.zero_grad(set_to_none=True)
                size = _records_in(batch)
                if size == 0:
                    loss = _noise_only_step(model, device)
                else:
                    loss = _batch_loss(model, batch, device)
                    loss.backward()
                if canaries is not None:
                    canaries.plant(model, size)
                optimizer.step()
                if canaries is not None:  # Opacus divides the noised sum by the expected batch size
                    canaries.observe(
                        model, getattr(optimizer, "expected_batch_size", None) or max(1, size)
                    )
                if proximal is not None:
                    proximal.apply(model, train.learning_rate)
                total_loss += float(loss.detach()) * size
                examples += size
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    return total_loss, examples


def train_local(
    model: PromptClassifier,
    dataset: RecordInputs,
    ledger: PrivacyLedger,
    train: TrainConfig,
    pad_token_id: int,
    seed: int,
    *,
    passes: int,
    progress: bool = True,
    proximal: ProximalPull | None = None,
    optimizer_state: dict[str, torch.Tensor] | None = None,
    secure_noise: bool = False,
    canaries: GradientCanaries | None = None,
) -> TrainResult:
    """Train prompt and head for `passes` passes over `dataset`; refuse if that would pass the
    privacy target.

    A federated site passes its `local_epochs` each round; a hospital alone, its total passes.

    `optimizer_state` continues Adam's moments from the hospital's previous round. Under DP they
    are built only from clipped, noised gradients (post-processing: no privacy cost), and they
    never leave the site. Without them every round would restart Adam, whose first steps are
    sign-like (each moves every coordinate by the full learning rate, mostly along DP noise).
    `seed` seeds sampling and noise, as independent streams; a deployed site passes a secret one
    (medtune/noise.py). `canaries` plants an audit's gradient canaries (medtune/canaries.py;
    simulation only).
    """
    keep_heap_compact()  # else the heap's peak climbs with the steps (medtune/heap.py)
    device = resolve_device(train.device)
    streams = RandomStreams.from_seed(seed)
    seed_everything(streams.other)
    _, total_steps = _check_plan(dataset, ledger, train.batch_size, passes)
    model.to(device).train()
    loader = DataLoader(
        dataset,
        batch_size=train.batch_size,
        shuffle=True,
        collate_fn=PadToLongest(pad_token_id),
        # Opacus's Poisson sampler draws from it
        generator=torch.Generator().manual_seed(streams.sampling),
    )
    adam = torch.optim.Adam(model.trainable_parameters(), lr=train.learning_rate)
    if optimizer_state:
        load_flat_optimizer_state(adam, optimizer_state)
    optimizer: torch.optim.Optimizer = adam
    hooks = None
    if ledger.config.is_private:
        hooks, optimizer, loader = _make_private(
            model, adam, loader, ledger, device, streams.noise, secure_noise
        )
    try:
        planted = (
            None
            if canaries is None
            else PlantedCanaries(canaries, streams.canaries, ledger.config.is_private)
        )
        total_loss, examples = _run_steps(
            model,
            optimizer,
            loader,
            train,
            passes,
            total_steps,
            device,
            proximal,
            progress,
            planted,
        )
    finally:
        if hooks is not None:
            hooks.cleanup()
        for parameter in model.trainable_parameters():
            parameter.grad = None
    if not ledger.config.is_private:
        ledger.record_non_private_steps(total_steps)
    return TrainResult(
        loss=total_loss / max(1, examples),
        steps=total_steps,
        examples=len(dataset),
        epsilon=ledger.epsilon,
        delta=ledger.config.delta,
        optimizer_state=flat_optimizer_state(adam),
        canary_observations=None if planted is None else np.stack(planted.observations),
    )
