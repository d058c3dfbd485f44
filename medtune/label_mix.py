"""A hospital's own label mix, applied to the shared model at the site: personalisation at home.

Under label skew the federation's model predicts with some label mix pi, while a hospital's patients
follow their own mix pi_h. When only the mix differs, Bayes' rule (Saerens et al., 2002) turns the
model into one for the site: p_h(y|x) is proportional to p(y|x) pi_h(y) / pi(y), i.e. the bias
log pi_h - log pi added to the logits.

A site knows pi_h from its own training labels but not pi: the mix the model learned is not even the
pooled label mix, since FedAvg averages updates trained on skewed mixes. So the site finds the bias
the rule implies from its own records: the b for which the model's mean predicted mix over those
records equals pi_h (a correctly re-weighted model predicts the site's mix on the site's patients).
This is the fixed point of Saerens' EM with the new mix known, solved by its iteration.

Chosen on validation parts of Medical Abstracts' training splits against adding log pi_h alone
(docs/benchmarks.md, "How the defaults were chosen").

Privacy: pi_h and b come from the site's own records without noise. Nothing of them is sent, so the
prompt and head that leave the site keep their epsilon, but the re-weighted model itself is not
covered by epsilon (its predictions reveal the site's label mix): it is for use inside the hospital.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

log = logging.getLogger("medtune.label_mix")


def label_mix(labels: Sequence[int], num_labels: int) -> np.ndarray:
    """Label frequencies with add-one smoothing: a label the site has never seen keeps some mass."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_labels)
    if len(counts) != num_labels:
        raise ValueError(f"label index {len(counts) - 1} is outside the {num_labels} labels")
    return (counts + 1.0) / (counts.sum() + num_labels)


def mix_bias(
    site_logits: torch.Tensor,
    mix: np.ndarray,
    tolerance: float = 1e-6,
    max_iterations: int = 10_000,
) -> np.ndarray:
    """The per-label bias b with mean softmax(site_logits + b) = mix: the model re-weighted to the
    site's mix.

    `site_logits` are the shared model's logits on the site's own records (those `mix` was counted
    from). Each step moves b by the log ratio of the wanted to the predicted mix; the mean is over
    records, so b is defined up to a constant and is returned with mean 0.
    """
    if site_logits.ndim != 2 or site_logits.shape[0] == 0 or site_logits.shape[1] != len(mix):
        raise ValueError(
            f"need the model's logits on at least one of the site's records for {len(mix)} labels"
        )
    logits = site_logits.detach().to(torch.float64).cpu()
    if not torch.isfinite(logits).all():
        raise ValueError(
            "the model's logits on the site's records are not all finite; the checkpoint is damaged"
        )
    wanted = torch.log(torch.as_tensor(mix, dtype=torch.float64))
    bias = torch.zeros(len(mix), dtype=torch.float64)
    for _ in range(max_iterations):
        predicted = torch.logsumexp(torch.log_softmax(logits + bias, dim=1), dim=0) - np.log(
            len(logits)
        )
        step = wanted - predicted
        bias += step
        if float(step.abs().max()) < tolerance:
            break
    else:
        log.warning(
            "the label-mix bias did not settle in %d steps (last change %.2g); using it as it is",
            max_iterations,
            float(step.abs().max()),
        )
    return (bias - bias.mean()).numpy()


def apply_label_mix(logits: torch.Tensor, bias: np.ndarray) -> torch.Tensor:
    """The shared model's logits re-weighted to a site's label mix, given its `mix_bias`."""
    return logits + torch.as_tensor(bias, dtype=logits.dtype, device=logits.device)
