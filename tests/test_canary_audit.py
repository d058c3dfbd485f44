"""The one-run epsilon audit (`medtune audit --canaries`): it catches a broken mechanism, it has
power without DP, and under correct DP its bound stays below the ledger's epsilon.

Each test runs a real federation in-process (tiny backbone, one audited hospital answering through
its real ClientApp), then scores it from what the coordinator kept, as `medtune audit --score` does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import opacus.optimizers.optimizer as opacus_optimizer
import pytest
from federation_harness import federate, real_grid, run_config, site_files, task_identity  # noqa: F401 - the fixture is used
from test_secure_aggregation import sites

from medtune.errors import ConfigError, FederationError
from medtune.experiments.canary_audit import audit_lines, score_audit

CANARIES = 200  # of the tiny model's 293 prompt and head coordinates


def audited_run(backbone: Path, out: Path, epsilon: float) -> dict:
    config = run_config(
        backbone,
        out,
        hospitals=1,
        rounds=3,
        epsilon=epsilon,
        **{
            "min-hospitals": 1,
            "records-per-hospital": 320,
            "local-epochs": 2,
            "audit-canaries": CANARIES,
            "keep-updates": True,
        },
    )
    federate(sites(config, 1), config)
    return score_audit(out)


def test_the_audit_catches_noise_cut_to_a_tenth_of_what_the_ledger_claims(
    tiny_backbone_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = opacus_optimizer._generate_noise

    def a_tenth(std, reference, generator=None, secure_mode=False):  # noqa: ANN001, ANN202 - Opacus's signature
        return original(std / 10, reference, generator=generator, secure_mode=secure_mode)

    monkeypatch.setattr(opacus_optimizer, "_generate_noise", a_tenth)
    report = audited_run(tiny_backbone_dir, tmp_path / "broken", epsilon=1.0)
    bound = report["white_box"]["epsilon"]
    assert report["ledger_epsilon"] == pytest.approx(1.0, abs=0.01)
    assert bound > report["ledger_epsilon"], report
    assert (
        f"audited lower bound {bound:.3f} exceeds the ledger's epsilon "
        f"{report['ledger_epsilon']:.3g}: the mechanism or the accounting is wrong"
    ) in audit_lines(report)


def test_under_correct_dp_the_bound_stays_below_the_ledger_and_without_dp_it_is_clearly_positive(
    tiny_backbone_dir: Path, tmp_path: Path
) -> None:
    private = audited_run(tiny_backbone_dir, tmp_path / "dp", epsilon=1.0)
    assert 0 <= private["white_box"]["epsilon"] <= private["ledger_epsilon"]
    assert 0 <= private["black_box"]["epsilon"] <= private["ledger_epsilon"]
    assert not any("exceeds" in line for line in audit_lines(private))
    open_run = audited_run(tiny_backbone_dir, tmp_path / "no-dp", epsilon=float("inf"))
    # near the most 200 canaries can certify
    assert open_run["white_box"]["epsilon"] >= 2.5, open_run


def test_a_run_without_canaries_is_refused_with_what_an_audit_needs(
    tiny_backbone_dir: Path, tmp_path: Path
) -> None:
    config = run_config(tiny_backbone_dir, tmp_path / "plain", hospitals=1, **{"min-hospitals": 1})
    federate(sites(config, 1), config)
    with pytest.raises(ConfigError, match="a run without canaries cannot be audited"):
        score_audit(tmp_path / "plain")


def test_a_deployed_site_refuses_a_run_config_that_asks_for_canaries(
    tiny_backbone_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Canaries bend a site's training to the coordinator's design: only a simulated hospital
    plants them."""
    config = run_config(tiny_backbone_dir, tmp_path / "run", hospitals=3, **{"audit-canaries": 10})
    with pytest.raises(FederationError, match="site configuration refused"):
        federate(real_grid(site_files(tmp_path), tmp_path, config), config)
    assert "only a simulated hospital plants them" in caplog.text
    # refused before any ledger was made
    assert not list((tmp_path / "sites").glob("*/ledger.json"))


def test_bad_audit_requests_are_refused_in_one_line_before_anything_runs(
    tiny_backbone_dir: Path, tmp_path: Path
) -> None:
    from medtune.experiments.canary_audit import audit_overrides, check_audit_settings
    from medtune.run_config import settings_from_run_config

    def settings(canaries: int, mode: str, hospital: str = "hospital_1", **extra: object):  # noqa: ANN202
        return settings_from_run_config(
            run_config(
                tiny_backbone_dir,
                tmp_path,
                hospitals=3,
                **audit_overrides(canaries, hospital, mode),
                **extra,
            )
        )

    with pytest.raises(ConfigError, match="--canaries must be at least 2"):
        audit_overrides(1, "hospital_1", "both")
    with pytest.raises(ConfigError, match="is more than hospital_1's .* training records"):
        check_audit_settings(settings(5000, "black-box"))
    # gradient canaries need coordinates, not records
    check_audit_settings(settings(250, "white-box"))
    with pytest.raises(ConfigError, match="'hospital_9' is not in this federation"):
        check_audit_settings(settings(10, "white-box", hospital="hospital_9"))
    # The site's own steps are audited under secure aggregation too; only the coordinator's view is
    # not.
    check_audit_settings(
        settings(10, "white-box", **{"secure-aggregation": True, "min-hospitals": 3})
    )


@pytest.mark.parametrize("epsilon", [2.0, float("inf")])
def test_the_white_box_reading_of_a_step_is_the_canaries_part_plus_the_noise(
    tiny_backbone, epsilon: float, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the noise switched off, what the auditor reads at a canary's coordinate, the records'
    part taken away, is C times the number of times the canary was sampled that step: nothing of
    the records is left, and a canary that is out reads 0 at every step."""
    import torch
    from test_train import MODEL, _records

    from medtune.canaries import GradientCanaries
    from medtune.config import PrivacyConfig, TrainConfig
    from medtune.features import record_inputs
    from medtune.model import PromptClassifier
    from medtune.synth import LABELS
    from medtune.train import SamplingPlan, new_ledger, train_local

    monkeypatch.setattr(
        opacus_optimizer, "_generate_noise", lambda std, reference, **_: torch.zeros_like(reference)
    )
    dataset = record_inputs(tiny_backbone, MODEL, _records(count=96), tmp_path)
    train, passes = TrainConfig(batch_size=16), 2
    model = PromptClassifier(tiny_backbone, MODEL, len(LABELS), seed=0)
    clip = 0.5
    canaries = GradientCanaries.draw(
        40,
        model.spec,
        seed=3,
        hospital="h",
        clip=clip,
        sample_rate=SamplingPlan.for_records(len(dataset), 16).sample_rate,
    )
    ledger = new_ledger(
        PrivacyConfig(epsilon=epsilon, max_grad_norm=clip), len(dataset), train.batch_size, passes
    )
    result = train_local(
        model,
        dataset,
        ledger,
        train,
        tiny_backbone.tokenizer.pad_token_id,
        seed=1,
        passes=passes,
        progress=False,
        canaries=canaries,
    )
    readings = result.canary_observations
    assert readings.shape == (result.steps, 40)
    samplings = readings / clip  # Opacus scales a norm-C row by C / (C + 1e-6): the same to 1e-5
    np.testing.assert_allclose(samplings, np.round(samplings), atol=1e-4)
    assert np.all(np.round(samplings[:, ~canaries.included]) == 0)
    assert np.round(samplings[:, canaries.included]).sum() > 0
