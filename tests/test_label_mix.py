"""A hospital's own label mix applied to the shared model: Bayes' rule for a shift in label mix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medtune.label_mix import apply_label_mix, label_mix


def test_label_mix_is_smoothed_label_frequencies() -> None:
    mix = label_mix([0, 0, 0, 2], num_labels=4)
    assert mix == pytest.approx([4 / 8, 1 / 8, 2 / 8, 1 / 8])  # add-one: the unseen labels 1 and 3 keep mass
    assert mix.sum() == pytest.approx(1.0)


def test_a_uniform_mix_changes_no_probability() -> None:
    logits = torch.randn(10, 5, generator=torch.Generator().manual_seed(0))
    adjusted = apply_label_mix(logits, np.full(5, 0.2))
    assert torch.allclose(torch.softmax(adjusted, 1), torch.softmax(logits, 1), atol=1e-6)


def test_the_mix_turns_a_balanced_model_into_the_bayes_classifier_of_a_skewed_site() -> None:
    """Three overlapping 1-D classes. A model trained on a balanced mix outputs log p(x | y) + const;
    at a site where 80% of patients have label 0, adding log pi_h gives the Bayes-optimal decisions,
    which beat both the balanced model and always predicting the site's majority label."""
    rng = np.random.default_rng(0)
    site_mix = np.array([0.8, 0.15, 0.05])
    means = np.array([0.0, 1.0, 2.0])
    labels = rng.choice(3, size=20_000, p=site_mix)
    x = rng.normal(means[labels], 1.0)
    balanced_logits = torch.tensor(-0.5 * (x[:, None] - means[None, :]) ** 2)
    counted = label_mix(labels.tolist(), 3)

    assert counted == pytest.approx(site_mix, abs=0.01)

    adjusted = apply_label_mix(balanced_logits, counted)
    posterior = np.exp(balanced_logits.numpy()) * counted  # Bayes: p(y | x) proportional to p(x | y) pi_h(y)
    posterior /= posterior.sum(axis=1, keepdims=True)
    assert torch.softmax(adjusted, 1).numpy() == pytest.approx(posterior, abs=1e-6)

    raw_accuracy = (balanced_logits.argmax(1).numpy() == labels).mean()
    adjusted_accuracy = (adjusted.argmax(1).numpy() == labels).mean()
    majority_accuracy = (labels == 0).mean()
    assert adjusted_accuracy > raw_accuracy + 0.1
    assert adjusted_accuracy > majority_accuracy
