"""A hospital's own label mix applied to the shared model: Bayes' rule for a shift in label mix,
with the shared model's own mix found from the site's records (medtune/label_mix.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medtune.label_mix import apply_label_mix, label_mix, mix_bias

MEANS = np.array([0.0, 1.0, 2.0])  # three overlapping 1-D classes, unit variance


def _patients(mix: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.choice(len(mix), size=n, p=mix)
    return rng.normal(MEANS[labels], 1.0), labels


def _calibrated_logits(x: np.ndarray, trained_mix: np.ndarray) -> torch.Tensor:
    """A perfectly calibrated model trained on `trained_mix`: log p(x | y) + log pi(y)."""
    return torch.tensor(-0.5 * (x[:, None] - MEANS[None, :]) ** 2 + np.log(trained_mix)[None, :])


def test_label_mix_is_smoothed_label_frequencies() -> None:
    """Add-one smoothing, by hand: (count of the label + 1) / (number of records + number of
    labels)."""
    # 7 records over 3 labels: counts 1, 4, 2; smoothed 2/10, 5/10, 3/10.
    assert label_mix([1, 0, 1, 2, 1, 2, 1], num_labels=3).tolist() == pytest.approx(
        [0.2, 0.5, 0.3], abs=1e-15
    )
    # 4 records over 4 labels: counts 3, 0, 1, 0; the unseen labels 1 and 3 keep 1/8 each.
    assert label_mix([0, 0, 0, 2], num_labels=4).tolist() == pytest.approx(
        [4 / 8, 1 / 8, 2 / 8, 1 / 8], abs=1e-15
    )
    # No records at all: the uniform mix.
    assert label_mix([], num_labels=5).tolist() == pytest.approx([0.2] * 5, abs=1e-15)
    with pytest.raises(ValueError, match="label index 3 is outside the 3 labels"):
        label_mix([0, 3], num_labels=3)


def test_the_matched_bias_makes_the_model_predict_the_sites_mix_on_the_sites_records() -> None:
    logits = 3 * torch.randn(400, 5, generator=torch.Generator().manual_seed(0))
    mix = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    bias = mix_bias(logits, mix)
    assert torch.softmax(apply_label_mix(logits, bias), 1).mean(0).numpy() == pytest.approx(
        mix, abs=1e-5
    )
    assert bias.mean() == pytest.approx(0.0, abs=1e-9)


def test_a_model_that_already_predicts_the_sites_mix_is_left_unchanged() -> None:
    x, _ = _patients(np.array([0.6, 0.3, 0.1]), 5_000, seed=1)
    logits = _calibrated_logits(x, np.array([0.6, 0.3, 0.1]))
    predicted = torch.softmax(logits, 1).mean(0).numpy()
    assert mix_bias(logits, predicted) == pytest.approx(np.zeros(3), abs=1e-4)


def test_the_bias_recovers_bayes_rule_when_the_shared_models_own_mix_is_not_uniform() -> None:
    """The federation's model was trained on mix pi = (0.1, 0.2, 0.7); a site's patients follow
    pi_h = (0.8, 0.15, 0.05). Bayes' rule needs log pi_h - log pi. The matched bias finds it from
    the site's records without being told pi, and scores as the Bayes classifier does; adding log
    pi_h alone (pi taken as uniform) counts the federation's mix twice and scores lower."""
    federation, site = np.array([0.1, 0.2, 0.7]), np.array([0.8, 0.15, 0.05])
    x, labels = _patients(site, 20_000, seed=0)
    logits = _calibrated_logits(x, federation)
    counted = label_mix(labels.tolist(), 3)
    assert counted == pytest.approx(site, abs=0.01)

    bias = mix_bias(logits, counted)
    bayes = np.log(site) - np.log(federation)
    assert bias == pytest.approx(bayes - bayes.mean(), abs=0.1)

    def accuracy(scores: torch.Tensor) -> float:
        return float((scores.argmax(1).numpy() == labels).mean())

    bayes_accuracy = accuracy(apply_label_mix(logits, bayes))
    assert accuracy(apply_label_mix(logits, bias)) == pytest.approx(bayes_accuracy, abs=0.005)
    assert accuracy(apply_label_mix(logits, np.log(counted))) < bayes_accuracy - 0.03
    assert bayes_accuracy > accuracy(logits) + 0.1
    # better than always predicting the site's majority label
    assert bayes_accuracy > (labels == 0).mean()


def test_logits_that_do_not_fit_the_mix_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one of the site's records for 3 labels"):
        mix_bias(torch.zeros(0, 3), np.full(3, 1 / 3))
    with pytest.raises(ValueError, match="for 3 labels"):
        mix_bias(torch.zeros(4, 5), np.full(3, 1 / 3))
