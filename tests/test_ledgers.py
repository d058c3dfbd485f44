"""Privacy never under-counted: a damaged, deleted, rolled-back, edited or shared ledger fails its
hospital, never starts afresh; a round sent again costs nothing; no hospital spends on a round that
cannot run.

Real ClientApp handlers on per-hospital files and ledgers, through the fake grid of
tests/federation_harness.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from federation_harness import (
    RealHospital,
    federate,
    first_round_of,
    hospitals_of,
    ledger_path,
    real_grid,
    run_config,
    site_files,
    task_identity,  # noqa: F401 - the autouse fixture, for every test here
)
from safetensors.numpy import load_file

from medtune.errors import FederationError, LedgerError
from medtune.federation.wire import FAILED
from medtune.run_config import settings_from_run_config
from medtune.site import Instruction


def test_a_corrupted_ledger_makes_its_hospital_fail_never_restart_at_zero(
    tiny_backbone_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files, resume = first_round_of(tiny_backbone_dir, tmp_path, rounds=2)
    damaged = ledger_path(tmp_path, 2)
    # a torn write from an older tool
    garbled = damaged.read_bytes()[: len(damaged.read_bytes()) // 2]
    damaged.write_bytes(garbled)

    results = federate(real_grid(files, tmp_path, resume), resume)
    seen = hospitals_of(results, 2)
    assert seen["hospital_2"]["status"] == FAILED
    assert (
        seen["hospital_2"]["reason"]
        == "privacy ledger refused; the details are in the site's own log"
    )
    assert (
        f"{damaged}: unreadable privacy ledger" in caplog.text
        and "refusing to start a fresh one" in caplog.text
    )
    assert damaged.read_bytes() == garbled  # left as found, for a person to inspect
    assert [seen[f"hospital_{i}"]["status"] for i in (1, 3)] == ["trained", "trained"]
    assert results["rounds"][1]["aggregated"] is True


def test_a_ledger_whose_history_was_cut_is_refused(tmp_path: Path) -> None:
    from medtune.config import PrivacyConfig
    from medtune.ledger_file import load_or_create_ledger
    from medtune.privacy import PrivacyLedger, ledger_checksum

    privacy = PrivacyConfig(epsilon=8.0, accountant="rdp")
    ledger = PrivacyLedger(privacy, sample_rate=0.25, planned_steps=8)
    for _ in range(4):
        ledger.accountant.step(noise_multiplier=ledger.noise_multiplier, sample_rate=0.25)
    state = ledger.state_dict()
    state["history"] = []  # valid JSON, but the spending it recorded is gone
    path = tmp_path / "ledger.json"
    path.write_text(json.dumps(state))
    with pytest.raises(LedgerError, match=f"{re.escape(str(path))}: damaged privacy ledger"):
        load_or_create_ledger(
            path, privacy, 40, batch_size=10, planned_passes=10, hospital="h", records="r"
        )
    # an editor who fixed the checksum
    path.write_text(json.dumps({**state, "checksum": ledger_checksum(state)}))
    with pytest.raises(
        LedgerError,
        match=f"{re.escape(str(path))}: corrupted ledger .* adds up to 0 steps but it records 4",
    ):
        load_or_create_ledger(
            path, privacy, 40, batch_size=10, planned_passes=10, hospital="h", records="r"
        )


def test_a_deleted_ledger_makes_its_hospital_fail_never_start_afresh(
    tiny_backbone_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files, resume = first_round_of(tiny_backbone_dir, tmp_path, rounds=2)
    deleted = ledger_path(tmp_path, 1)
    deleted.unlink()

    results = federate(real_grid(files, tmp_path, resume), resume)
    seen = hospitals_of(results, 2)
    assert seen["hospital_1"]["status"] == FAILED and seen["hospital_1"]["reason"].startswith(
        "privacy ledger refused"
    )
    assert f"{deleted}: privacy ledger missing" in caplog.text
    assert not deleted.exists()  # no fresh ledger was started in its place
    assert [seen[f"hospital_{i}"]["status"] for i in (2, 3)] == ["trained", "trained"]


def _wipe(path: Path) -> None:
    """The site's folder wiped to free disk: the ledger and the optimizer state beside it are
    gone."""
    path.unlink()
    path.with_name("ledger.optimizer.safetensors").unlink()


def _restore_fresh(path: Path) -> None:
    """The ledger replaced by a backup taken before round 1: well-formed, with a valid checksum, and
    behind."""
    from medtune.privacy import ledger_checksum

    state = json.loads(path.read_text())
    fresh = {**state, "history": [], "steps": 0, "epsilon_spent": 0.0, "trained_rounds": []}
    path.write_text(json.dumps({**fresh, "checksum": ledger_checksum(fresh)}))


def _claim_more_noise(path: Path) -> None:
    """The past steps edited to claim noise multiplier 1000 (lower epsilon), checksum recomputed by
    the editor."""
    from medtune.privacy import ledger_checksum

    state = json.loads(path.read_text())
    edited = {**state, "history": [[1000.0, rate, steps] for _, rate, steps in state["history"]]}
    path.write_text(json.dumps({**edited, "checksum": ledger_checksum(edited)}))


@pytest.mark.parametrize(
    "tamper, logged",
    [
        (_wipe, "privacy ledger missing, but the coordinator records"),
        (
            _restore_fresh,
            "privacy ledger is behind: it records 0 steps, but the coordinator records",
        ),
        (_claim_more_noise, "privacy ledger's history gives epsilon=0.0"),
    ],
)
def test_a_ledger_that_disagrees_with_the_coordinators_record_is_refused_before_any_step(
    tamper: Callable[[Path], None],
    logged: str,
    tiny_backbone_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Wiped, rolled back or edited: the site refuses before training, naming the path; no step is
    taken."""
    files, resume = first_round_of(tiny_backbone_dir, tmp_path, rounds=3)
    tampered = ledger_path(tmp_path, 1)
    reported = hospitals_of(json.loads((tmp_path / "run" / "results.json").read_text()), 1)[
        "hospital_1"
    ]
    assert reported["steps"] > 0
    tamper(tampered)
    before = tampered.read_bytes() if tampered.exists() else None

    results = federate(real_grid(files, tmp_path, resume), resume)
    for server_round in (2, 3):
        seen = hospitals_of(results, server_round)
        assert seen["hospital_1"]["status"] == FAILED and seen["hospital_1"]["reason"].startswith(
            "privacy ledger refused"
        )
        assert [seen[f"hospital_{i}"]["status"] for i in (2, 3)] == ["trained", "trained"]
    assert f"{tampered}: {logged}" in caplog.text
    after = tampered.read_bytes() if tampered.exists() else None
    # no DP step was taken on it, and no fresh ledger was started in its place
    assert after == before
    assert str(tmp_path) not in json.dumps(results["rounds"])  # the path stays in the site's log


def test_a_round_sent_again_gets_the_update_already_sent_at_no_cost(
    tiny_backbone_dir: Path, tmp_path: Path
) -> None:
    """A coordinator that stopped after its sites replied sends the same round again: the site
    resends, spending nothing; the same round from another global state trains afresh, counted, with
    fresh noise."""
    from client.node_config import _deployed_site
    from medtune.label_prior import initial_model

    files = site_files(tmp_path)
    config = run_config(
        tiny_backbone_dir,
        tmp_path / "run",
        hospitals=1,
        rounds=3,
        **{"min-hospitals": 1, "epsilon": 8.0},
    )
    node = {
        "hospital": "hospital_1",
        "data-path": str(files[0]),
        "ledger-path": str(ledger_path(tmp_path, 1)),
        "max-epsilon": 8.0,
        "text-column": "text",
        "label-column": "label",
    }
    site = _deployed_site(settings_from_run_config(config), node)
    arrays = dict(
        initial_model(
            site.backbone, site.settings.model, site.settings.data, seed=0
        ).exchanged_state()
    )
    first = site.train_round(Instruction(arrays, server_round=1))
    steps = json.loads(ledger_path(tmp_path, 1).read_text())["steps"]
    again = site.train_round(Instruction(arrays, server_round=1))  # same round, same global state
    assert again.resent and not first.resent
    for name, array in first.arrays.items():
        # the same output: no new noise drawn
        np.testing.assert_array_equal(again.arrays[name], array)
    # nothing spent
    assert json.loads(ledger_path(tmp_path, 1).read_text())["steps"] == steps == again.ledger.steps

    moved = {name: array + np.float32(0.01) for name, array in arrays.items()}
    # same round, another global state: trained
    other = site.train_round(Instruction(moved, server_round=1))
    assert other.trained and not other.resent
    assert not np.allclose(first.arrays["prompt"], other.arrays["prompt"])
    ledger = json.loads(ledger_path(tmp_path, 1).read_text())
    assert ledger["steps"] == 2 * steps  # every DP step taken is counted
    assert ledger["trained_rounds"] == [1, 1]
    assert ledger["events"] and ledger["events"][0].startswith(
        f"round 1 trained again from step {steps}"
    )

    site.train_round(Instruction(other.arrays, server_round=2))
    assert site.sent_update.read().round == 2  # the next round's start replaced the kept update
    # round 1's answer is gone
    assert not site.train_round(Instruction(other.arrays, server_round=1)).resent


def test_a_ledger_serves_one_hospital_and_one_process(
    tiny_backbone_dir: Path, tmp_path: Path
) -> None:
    from client.node_config import _deployed_site
    from medtune.label_prior import initial_model
    from medtune.locks import LockedError, exclusive

    files = site_files(tmp_path)
    settings = settings_from_run_config(
        run_config(tiny_backbone_dir, tmp_path / "run", hospitals=2, **{"min-hospitals": 1})
    )
    shared = ledger_path(tmp_path, 1)
    terms = {"max-epsilon": 8.0, "text-column": "text", "label-column": "label"}
    first = _deployed_site(
        settings,
        {"hospital": "hospital_1", "data-path": str(files[0]), "ledger-path": str(shared), **terms},
    )
    arrays = dict(
        initial_model(first.backbone, settings.model, settings.data, seed=0).exchanged_state()
    )
    trained = first.train_round(Instruction(arrays, server_round=1))
    steps = json.loads(shared.read_text())["steps"]
    assert (
        steps == trained.ledger.steps and json.loads(shared.read_text())["hospital"] == "hospital_1"
    )

    other = _deployed_site(
        settings,
        {"hospital": "hospital_2", "data-path": str(files[1]), "ledger-path": str(shared), **terms},
    )
    with pytest.raises(
        LedgerError,
        match=f"{re.escape(str(shared))} is the privacy ledger of hospital 'hospital_1'",
    ):
        other.train_round(Instruction(arrays, server_round=1))
    # flock: another open file, as another process
    with exclusive(shared, "a ledger held by another SuperNode"):
        with pytest.raises(
            LockedError,
            match=f"{re.escape(str(shared))}: hospital_1's privacy ledger is in use by pid",
        ):
            first.train_round(Instruction(arrays, server_round=2))
    # neither refused attempt charged or lost a step
    assert json.loads(shared.read_text())["steps"] == steps


def test_no_hospital_spends_on_a_round_that_cannot_reach_min_hospitals(
    tiny_backbone_dir: Path, tmp_path: Path
) -> None:
    files = site_files(tmp_path)
    # hospital_2's file is refused
    files[1].write_text("text,label\nchest pain,cardio\n", encoding="utf-8")
    config = run_config(
        tiny_backbone_dir, tmp_path / "run", hospitals=3, rounds=3, **{"min-hospitals": 3}
    )
    with pytest.raises(
        FederationError,
        match=r"round 1: only 2 hospital\(s\) can take part \(hospital_1, hospital_3\), fewer than "
        r"min-hospitals=3, so no hospital was asked to spend budget. Not taking part: "
        r"hospital_2: records file refused",
    ):
        federate(real_grid(files, tmp_path, config), config)
    # no step taken anywhere
    assert not ledger_path(tmp_path, 1).exists() and not ledger_path(tmp_path, 3).exists()


def test_a_second_node_with_a_hospitals_name_is_refused_and_spends_nothing(
    tiny_backbone_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = site_files(tmp_path)
    config = run_config(
        tiny_backbone_dir, tmp_path / "run", hospitals=3, rounds=2, **{"keep-updates": True}
    )
    grid = real_grid(files, tmp_path, config)
    # its own file, key and ledger
    impostor = {**grid.nodes[2].context.node_config, "hospital": "hospital_1"}
    grid.nodes[2] = RealHospital(2, impostor, config)
    results = federate(grid, config)

    for server_round in (1, 2):
        seen = hospitals_of(results, server_round)
        assert seen["hospital_1"]["status"] == "trained" and seen["hospital_1"]["node"] == "1"
        assert seen["hospital_1 (node 2)"]["status"] == FAILED
        assert seen["hospital_1 (node 2)"]["reason"].startswith(
            "hospital name held by another node"
        )
    assert "round 1: node 2 also calls itself hospital_1, which is node 1 in this run" in " ".join(
        results["events"]
    )
    assert "another site already calls itself by this name" in caplog.text
    assert not ledger_path(tmp_path, 2).exists()  # the second node never took a step
    sent = load_file(tmp_path / "run" / "updates" / "round_001" / "hospital_1.safetensors")
    # one hospital_1 update, from node 1
    assert sent.keys() == {"prompt", "head.weight", "head.bias"}
