"""Which Flower strategy combines the hospitals' prompts and heads, and its resumable state.

Flower's own FedAvg, FedProx and FedAdam do the arithmetic, weighted by each reply's
`num-examples`. Only the exchanged state ever reaches them: the round loop checks every reply
against the exchanged-state spec first. FedProx sends `proximal-mu` to the hospitals, which
apply it as a decoupled pull (see medtune.train.ProximalPull). FedAdam keeps server-side
moments, saved with each checkpoint so a resumed run continues them exactly.
"""

from __future__ import annotations

import numpy as np
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from medtune.settings import FederationConfig

WEIGHT_KEY = "num-examples"
MOMENT_PREFIXES = ("m_t/", "v_t/")


def build_strategy(federation: FederationConfig) -> FedAvg:
    common = dict(
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
        return FedAdam(eta=federation.server_learning_rate, eta_l=federation.server_learning_rate, **common)
    return FedAvg(**common)


def strategy_state(strategy: FedAvg) -> dict[str, np.ndarray]:
    """FedAdam's moments as named arrays (empty for stateless strategies)."""
    state: dict[str, np.ndarray] = {}
    for prefix, attribute in zip(MOMENT_PREFIXES, ("m_t", "v_t"), strict=True):
        for name, array in (getattr(strategy, attribute, None) or {}).items():
            state[prefix + name] = np.asarray(array)
    return state


def restore_strategy_state(strategy: FedAvg, state: dict[str, np.ndarray]) -> None:
    for prefix, attribute in zip(MOMENT_PREFIXES, ("m_t", "v_t"), strict=True):
        moments = {name[len(prefix) :]: array for name, array in state.items() if name.startswith(prefix)}
        if moments:
            setattr(strategy, attribute, moments)
