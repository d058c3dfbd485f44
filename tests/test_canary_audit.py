"""The one-run epsilon audit (`medtune audit --canaries`): it catches a broken mechanism, it has power without
DP, and under correct DP its bound stays below the ledger's epsilon.

Each test runs a real federation in-process (tiny backbone, one audited hospital answering through its real
ClientApp), then scores it from what the coordinator kept, as `medtune audit --score` does.
"""

from __future__ import annotations

from pathlib import Path

import opacus.optimizers.optimizer as opacus_optimizer
import pytest

from medtune.errors import ConfigError
from medtune.experiments.canary_audit import audit_lines, score_audit
from test_robustness import federate, run_config, task_identity  # noqa: F401 - the fixture is used
from test_secure_aggregation import sites

CANARIES = 200  # of the tiny model's 293 prompt and head coordinates


def audited_run(backbone: Path, out: Path, epsilon: float) -> dict:
    config = run_config(
        backbone, out, hospitals=1, rounds=3, epsilon=epsilon, **{
            "min-hospitals": 1, "records-per-hospital": 320, "local-epochs": 2, "audit-canaries": CANARIES,
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
    assert (f"audited lower bound {bound:.3f} exceeds the ledger's epsilon {report['ledger_epsilon']:.3g}: the "
            "mechanism or the accounting is wrong") in audit_lines(report)


def test_under_correct_dp_the_bound_stays_below_the_ledger_and_without_dp_it_is_clearly_positive(
    tiny_backbone_dir: Path, tmp_path: Path
) -> None:
    private = audited_run(tiny_backbone_dir, tmp_path / "dp", epsilon=1.0)
    assert 0 <= private["white_box"]["epsilon"] <= private["ledger_epsilon"]
    assert 0 <= private["black_box"]["epsilon"] <= private["ledger_epsilon"]
    assert not any("exceeds" in line for line in audit_lines(private))
    open_run = audited_run(tiny_backbone_dir, tmp_path / "no-dp", epsilon=float("inf"))
    assert open_run["white_box"]["epsilon"] >= 1.0, open_run


def test_a_run_without_canaries_is_refused_with_what_an_audit_needs(tiny_backbone_dir: Path, tmp_path: Path) -> None:
    config = run_config(tiny_backbone_dir, tmp_path / "plain", hospitals=1, **{"min-hospitals": 1})
    federate(sites(config, 1), config)
    with pytest.raises(ConfigError, match="a run without canaries cannot be audited"):
        score_audit(tmp_path / "plain")
