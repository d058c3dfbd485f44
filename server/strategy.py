"""Which Flower strategy combines the hospitals' prompts and heads, what it sees, and its resumable
state.

Flower's own strategies do the arithmetic. FedAvg, FedProx and FedAdam weight each update by its
`num-examples`. FedMedian (coordinate-wise median) and FedTrimmedAvg (coordinate-wise mean after
cutting `trim-fraction` of the replies from each tail) are robust to a few outlying hospitals
and, in Flower 1.41 and 1.42, ignore `num-examples`: every accepted hospital counts once. Only
checked updates reach them (server.validation), each as a fresh message holding the checked arrays
and the example count and nothing else, so no reply's extra content can reach a strategy, and the
median strategies, which empty the messages they aggregate, never touch what a hospital sent.
FedProx sends `proximal-mu` to the hospitals, which apply it as a decoupled pull (see
medtune.train.ProximalPull). FedAdam keeps server-side moments, saved with each checkpoint so a
resumed run continues them exactly; the other strategies keep nothing between rounds.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict

import numpy as np
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from medtune.errors import CheckpointError
from medtune.federation.wire import ARRAYS, METRICS, to_record
from medtune.files import atomic_write_bytes
from medtune.run_config import FederationConfig
from medtune.state import STATE_DTYPE
from server.validation import CheckedUpdate

WEIGHT_KEY = "num-examples"
MOMENT_PREFIXES = ("m_t/", "v_t/")
STRATEGY_FILE = "strategy.safetensors"


class _CommonArguments(TypedDict):
    """The keyword arguments every strategy MedTune builds is given."""

    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_evaluate_nodes: int
    min_available_nodes: int
    weighted_by_key: str


def build_strategy(federation: FederationConfig, local_learning_rate: float) -> FedAvg:
    """The server's strategy. `local_learning_rate` is the hospitals' own (Flower's `eta_l`, which
    FedAdam only reports: the server step is `eta`, `server-learning-rate`)."""
    common = _CommonArguments(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=federation.min_hospitals,
        min_evaluate_nodes=federation.min_hospitals,
        min_available_nodes=federation.min_hospitals,
        weighted_by_key=WEIGHT_KEY,
    )
    if federation.strategy == "fedprox":
        return FedProx(proximal_mu=federation.proximal_mu, **common)
    if federation.strategy == "fedadam":
        # Hospitals' local steps are already Adam steps; a small server step with tau ~ 1e-3 is the
        # setting Reddi et al. recommend for prompt-sized models.
        return FedAdam(eta=federation.server_learning_rate, eta_l=local_learning_rate, **common)
    if federation.strategy == "fedmedian":
        return FedMedian(**common)
    if federation.strategy == "trimmed-mean":
        return FedTrimmedAvg(beta=federation.trim_fraction, **common)
    return FedAvg(**common)


def trimming_note(federation: FederationConfig, hospitals: int) -> str | None:
    """Flower cuts int(trim-fraction x replies) per tail: with few hospitals that may be none at
    all."""
    if federation.strategy != "trimmed-mean" or int(federation.trim_fraction * hospitals) > 0:
        return None
    return (
        f"trimmed-mean with trim-fraction {federation.trim_fraction} cuts nothing from {hospitals} "
        f"hospitals' updates (int({federation.trim_fraction} x {hospitals}) = 0 per tail), so it "
        f"is a plain unweighted mean; set trim-fraction to at least {1 / hospitals:.3f} to cut one "
        "per tail"
    )


def aggregate(
    strategy: FedAvg, server_round: int, updates: list[CheckedUpdate]
) -> dict[str, np.ndarray]:
    """The strategy's new global state from checked updates only, as the exchanged state's float32.

    Updates go in by hospital name, not in the order Flower sampled or received them, so the float
    sums, and with them the run, are the same for the same seed (and a resumed run matches).
    Flower's FedAdam computes its server step in float64 (numpy 2 promotes the float32 arrays by its
    float64 step size), so its result is cast back; the other strategies already return float32.
    """
    messages = [
        Message(
            RecordDict(
                {
                    ARRAYS: to_record(update.arrays),
                    METRICS: MetricRecord({WEIGHT_KEY: update.examples}),
                }
            ),
            dst_node_id=update.node_id,
            message_type=MessageType.TRAIN,
        )
        for update in sorted(updates, key=lambda update: update.hospital)
    ]
    arrays, _ = strategy.aggregate_train(server_round, messages)
    assert isinstance(arrays, ArrayRecord), "a strategy given updates always returns arrays"
    return {name: array.numpy().astype(STATE_DTYPE, copy=False) for name, array in arrays.items()}


def save_strategy_state(strategy: FedAvg, directory: Path) -> None:
    """FedAdam's moments beside the checkpoint, as named arrays (nothing for stateless
    strategies)."""
    state: dict[str, np.ndarray] = {}
    for prefix, attribute in zip(MOMENT_PREFIXES, ("m_t", "v_t"), strict=True):
        for name, array in (getattr(strategy, attribute, None) or {}).items():
            state[prefix + name] = np.asarray(array)
    if state:
        atomic_write_bytes(directory / STRATEGY_FILE, save_safetensors(state))


def restore_strategy_state(strategy: FedAvg, directory: Path) -> None:
    """Continue the moments saved with a checkpoint; a corrupted file stops the resume, naming
    it."""
    path = directory / STRATEGY_FILE
    if not path.is_file():
        return
    try:
        state = load_safetensors(path.read_bytes())
    # safetensors raises its own error types for truncated or garbled files
    except Exception as error:
        raise CheckpointError(f"{path}: corrupted strategy state ({error})") from None
    for prefix, attribute in zip(MOMENT_PREFIXES, ("m_t", "v_t"), strict=True):
        moments = {
            name[len(prefix) :]: array for name, array in state.items() if name.startswith(prefix)
        }
        if moments:
            setattr(strategy, attribute, moments)
