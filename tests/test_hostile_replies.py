"""Hostile replies: the coordinator refuses what is wrong, says where, and goes on with the others;
robust strategies outvote an update that is far off but passes the checks.

server/federation.py is driven in-process through a fake Grid (tests/federation_harness.py) whose
nodes send crafted replies. The real Simulation Engine is exercised in test_federation.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from federation_harness import (
    Arrays,
    CraftedHospital,
    FakeGrid,
    Tamper,
    federate,
    hospitals_of,
    run_config,
    task_identity,  # noqa: F401 - the autouse fixture, for every test here
)
from flower_internals import serverapp_runtime_logs_exceptions_as_replayed, set_source_node
from flwr.app import Context, Error, Message, RecordDict
from safetensors.numpy import load_file

from medtune.checkpoint import load_checkpoint
from medtune.errors import ConfigError, FederationError
from medtune.federation.overrides import resolve_run_config
from medtune.federation.wire import FAILED, REJECTED
from medtune.run_config import settings_from_run_config
from server.federation import checkpoint_dir


def _rename(arrays: Arrays, metrics: dict[str, Any]) -> None:
    arrays["head.bias_"] = arrays.pop("head.bias")


def _extra_array(arrays: Arrays, metrics: dict[str, Any]) -> None:
    arrays["embeddings.word_embeddings.weight"] = np.zeros((8, 32), np.float32)


def _shape(arrays: Arrays, metrics: dict[str, Any]) -> None:
    arrays["prompt"] = arrays["prompt"][:-1]


def _dtype(arrays: Arrays, metrics: dict[str, Any]) -> None:
    arrays["head.weight"] = arrays["head.weight"].astype(np.float64)


def _nan(arrays: Arrays, metrics: dict[str, Any]) -> None:
    arrays["prompt"][0, 0] = np.nan


def _inf(arrays: Arrays, metrics: dict[str, Any]) -> None:
    arrays["head.weight"][1, 2] = np.inf


def _huge(arrays: Arrays, metrics: dict[str, Any]) -> None:
    arrays["prompt"] += np.float32(1e3)


def _examples(value: Any) -> Tamper:
    def tamper(arrays: Arrays, metrics: dict[str, Any]) -> None:
        metrics["num-examples"] = value

    return tamper


def _extra_metric(arrays: Arrays, metrics: dict[str, Any]) -> None:
    metrics["per-record-loss"] = [0.1, 0.2]


HOSTILE = {
    "wrong name": (_rename, "missing ['head.bias'], unexpected ['head.bias_']"),
    "extra array": (_extra_array, "unexpected ['embeddings.word_embeddings.weight']"),
    "wrong shape": (_shape, "'prompt' has shape (3, 32), expected (4, 32)"),
    "wrong dtype": (_dtype, "'head.weight' has dtype float64, expected float32"),
    "NaN": (_nan, "'prompt' contains NaN or infinite values"),
    "Inf": (_inf, "'head.weight' contains NaN or infinite values"),
    "huge norm": (_huge, "more than max-update-norm=100"),
    "negative example count": (_examples(-5), "claims -5 training examples"),
    "zero example count": (_examples(0), "claims 0 training examples"),
    "implausible example count": (_examples(10**9), "claims 1000000000 training examples"),
    "fractional example count": (_examples(12.5), "num-examples must be a whole number, got 12.5"),
    "extra metric": (_extra_metric, "metrics must be exactly"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_reply_is_rejected_and_the_others_are_aggregated(
    case: str, tiny_backbone_dir: Path, tmp_path: Path
) -> None:
    tamper, reason = HOSTILE[case]
    good = {1: CraftedHospital("hospital_1", 100), 2: CraftedHospital("hospital_2", 300)}
    grid = FakeGrid({**good, 3: CraftedHospital("hospital_3", 200, tamper)})
    results = federate(grid, run_config(tiny_backbone_dir, tmp_path, hospitals=3))

    seen = hospitals_of(results, 1)
    assert seen["hospital_3"]["status"] == "rejected"
    assert (
        "update from hospital_3" in seen["hospital_3"]["reason"]
        and reason in seen["hospital_3"]["reason"]
    )
    assert any(
        e.startswith("round 1: rejected the update from hospital_3") for e in results["events"]
    )
    assert [seen[f"hospital_{i}"]["status"] for i in (1, 2)] == ["trained", "trained"]
    assert results["rounds"][0]["aggregated"] is True
    aggregate = load_checkpoint(checkpoint_dir(tmp_path, 1)).arrays
    # the example-weighted mean of the two honest updates alone
    for name, array in aggregate.items():
        expected = 0.25 * good[1].sent[1][name] + 0.75 * good[2].sent[1][name]
        np.testing.assert_allclose(array, expected, rtol=1e-6, atol=1e-7)


def test_a_reply_with_a_path_for_a_name_is_rejected(
    tiny_backbone_dir: Path, tmp_path: Path
) -> None:
    nodes = {1: CraftedHospital("hospital_1", 100), 2: CraftedHospital("hospital_2", 100)}
    # would be kept as out/updates/round_001/../../hospital_3
    nodes[3] = CraftedHospital("../../hospital_3", 100)
    config = run_config(tiny_backbone_dir, tmp_path / "run", hospitals=3, **{"keep-updates": True})
    results = federate(FakeGrid(nodes), config)
    assert "not a valid hospital name" in hospitals_of(results, 1)["../../hospital_3"]["reason"]
    assert sorted(p.name for p in (tmp_path / "run" / "updates" / "round_001").iterdir()) == [
        "_sent.safetensors",  # the global state the round sent
        "hospital_1.safetensors",
        "hospital_2.safetensors",
    ]
    assert not (tmp_path / "run" / "hospital_3.safetensors").exists()


class DiesAfterRound1(CraftedHospital):
    """Answers round 1, then dies: its node either yields the SuperLink's error reply or falls
    silent."""

    def __init__(self, name: str, examples: int, silent: bool) -> None:
        super().__init__(name, examples)
        self.silent = silent

    def __call__(self, message: Message) -> Message | None:
        if int(message.content["config"]["server-round"]) == 1:
            return super().__call__(message)
        if self.silent:
            return None
        reply = Message(Error(code=0, reason="the SuperNode stopped"), reply_to=message)
        set_source_node(reply, 1)  # as in deployment: the SuperLink answers for a dead node
        return reply


def test_a_node_that_dies_is_named_by_its_hospital(tiny_backbone_dir: Path, tmp_path: Path) -> None:
    nodes = {
        11: CraftedHospital("hospital_1", 100),
        12: DiesAfterRound1("hospital_2", 100, silent=False),
        13: DiesAfterRound1("hospital_3", 100, silent=True),
    }
    results = federate(
        FakeGrid(nodes),
        run_config(
            tiny_backbone_dir,
            tmp_path,
            hospitals=3,
            rounds=2,
            # the silent node is given up on after this long with no new reply
            **{"min-hospitals": 1, "round-timeout": 0.5},
        ),
    )
    second = hospitals_of(results, 2)
    assert (
        second["hospital_2"]["status"] == FAILED
        and second["hospital_2"]["reason"] == "the SuperNode stopped"
    )
    assert (
        second["hospital_3"]["status"] == FAILED
        and second["hospital_3"]["reason"] == "no reply to the readiness query"
    )
    assert "node 1" not in second
    assert "round 2: hospital_2 failed: the SuperNode stopped" in results["events"]
    assert "round 2: no readiness reply within 0.5 s from hospital_3" in results["events"]
    assert results["rounds"][1]["aggregated"]  # hospital_1 alone meets min-hospitals=1


def _nan_from_round_2(arrays: Arrays, metrics: dict[str, Any]) -> None:
    if metrics["steps"] > 3:
        _nan(arrays, metrics)


def test_too_few_valid_updates_skip_the_round_and_keep_the_global_state(
    tiny_backbone_dir: Path, tmp_path: Path
) -> None:
    hostile = CraftedHospital("hospital_2", 100, _nan_from_round_2)
    grid = FakeGrid(
        {
            1: CraftedHospital("hospital_1", 100),
            2: hostile,
            3: CraftedHospital("hospital_3", 100, _huge),
        }
    )
    config = run_config(tiny_backbone_dir, tmp_path, hospitals=3, rounds=2)
    results = federate(grid, config)

    # min-hospitals = 2, one valid update in round 2
    assert [r["aggregated"] for r in results["rounds"]] == [True, False]
    assert (
        "round 2: 1 valid update(s), fewer than min-hospitals=2; round skipped, "
        "the global state is kept" in results["events"]
    )
    after_round_1 = load_checkpoint(checkpoint_dir(tmp_path, 1)).arrays
    # the run went on, and the global state stayed
    kept = load_checkpoint(checkpoint_dir(tmp_path, 2)).arrays
    for name, array in after_round_1.items():
        np.testing.assert_array_equal(kept[name], array)
    assert hospitals_of(results, 2)["hospital_1"]["status"] == "trained"


def test_a_federation_in_which_no_hospital_ever_trains_fails_and_leaves_no_checkpoint(
    tiny_backbone_dir: Path, tmp_path: Path
) -> None:
    grid = FakeGrid({i: CraftedHospital(f"hospital_{i}", 100, _nan) for i in (1, 2, 3)})
    config = run_config(tiny_backbone_dir, tmp_path, hospitals=3, rounds=2)
    with pytest.raises(FederationError, match="no hospital trained in any round"):
        federate(grid, config)
    assert not (tmp_path / "checkpoints").exists()  # nothing that `medtune predict` would serve
    recorded = json.loads((tmp_path / "results.json").read_text())
    assert [r["aggregated"] for r in recorded["rounds"]] == [False, False]
    assert all(h["status"] == REJECTED for r in recorded["rounds"] for h in r["hospitals"])


def test_a_federation_error_ends_the_server_app_as_failed_with_one_line_and_no_traceback(
    tiny_backbone_dir: Path, tmp_path: Path
) -> None:
    """As a SuperLink runs it: Flower calls the ServerApp, catches what it raises (the run is then
    finished:failed, exit code 201) and logs it; a MedTuneError is logged as one line."""
    import io
    import logging

    from flwr.server.run_serverapp import run as run_server_app
    from flwr.supercore.logger import log as flower_log

    import server.app

    # The call in Flower's ServerApp runtime this test replays (a release that logs otherwise fails
    # here).
    assert serverapp_runtime_logs_exceptions_as_replayed()
    grid = FakeGrid({i: CraftedHospital(f"hospital_{i}", 100, _nan) for i in (1, 2)})
    context = Context(
        run_id=1,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=run_config(tiny_backbone_dir, tmp_path, hospitals=2),
    )
    shown = io.StringIO()
    # formats as Flower's console does: a traceback, if any, follows
    handler = logging.StreamHandler(shown)
    logging.getLogger("flwr").addHandler(handler)
    try:
        with pytest.raises(FederationError) as raised:  # raised, so Flower marks the run as failed
            run_server_app(grid, context, server_app_dir="", loaded_server_app=server.app.app)  # type: ignore[arg-type]
        flower_log(logging.ERROR, "%s raised an exception", "ServerApp", exc_info=raised.value)
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    assert shown.getvalue() == f"ServerApp raised an exception: {raised.value}\n"
    assert (
        "no hospital trained in any round" in shown.getvalue()
        and "Traceback" not in shown.getvalue()
    )


# --- robust aggregation ---------------------------------------------------------------------------


def _outlier(arrays: Arrays, metrics: dict[str, Any]) -> None:
    """Far from the others but within max-update-norm: the case robust aggregation is for."""
    for array in arrays.values():
        array += np.float32(2.0)


@pytest.mark.parametrize(
    ("strategy", "combine"), [("fedmedian", np.median), ("trimmed-mean", None)]
)
def test_robust_strategies_aggregate_only_the_checked_updates_unweighted(
    strategy: str, combine: Any, tiny_backbone_dir: Path, tmp_path: Path
) -> None:
    nodes = {i: CraftedHospital(f"hospital_{i}", 100 * i) for i in (1, 2, 3)}
    nodes[4] = CraftedHospital("hospital_4", 10**6, _outlier)  # also claims the most examples
    nodes[5] = CraftedHospital("hospital_5", 100, _nan)  # rejected before any strategy sees it
    config = run_config(
        tiny_backbone_dir,
        tmp_path,
        hospitals=5,
        strategy=strategy,
        **{"trim-fraction": 0.25, "keep-updates": True},
    )
    results = federate(FakeGrid(nodes), config)

    assert hospitals_of(results, 1)["hospital_5"]["status"] == "rejected"
    # accepted: robustness is the strategy's job
    assert hospitals_of(results, 1)["hospital_4"]["update_norm"] > 30
    sent = [nodes[i].sent[1] for i in (1, 2, 3, 4)]
    aggregate = load_checkpoint(checkpoint_dir(tmp_path, 1)).arrays
    for name, array in aggregate.items():
        stacked = np.stack([s[name] for s in sent])
        if combine is None:  # cut one of four per tail, per coordinate; examples do not weigh
            expected = np.sort(stacked, axis=0)[1:3].mean(axis=0)
        else:
            expected = combine(stacked, axis=0)
        np.testing.assert_allclose(array, expected, rtol=1e-6, atol=1e-7)
        # outlier ignored
        assert np.all(np.abs(array - np.stack([s[name] for s in sent[:3]]).mean(axis=0)) < 0.05)
    # the strategy consumed its own copies: what each hospital sent is kept intact
    for i in (1, 2, 3, 4):
        kept = load_file(str(tmp_path / "updates" / "round_001" / f"hospital_{i}.safetensors"))
        for name, array in nodes[i].sent[1].items():
            np.testing.assert_array_equal(kept[name], array)


def test_trimmed_mean_says_when_it_cuts_nothing(tiny_backbone_dir: Path, tmp_path: Path) -> None:
    nodes = {i: CraftedHospital(f"hospital_{i}", 100) for i in (1, 2, 3)}
    results = federate(
        FakeGrid(nodes),
        run_config(tiny_backbone_dir, tmp_path, hospitals=3, strategy="trimmed-mean"),
    )
    assert any("trim-fraction 0.2 cuts nothing from 3 hospitals" in e for e in results["events"])


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("trim-fraction", 0.5, "trim-fraction must be in \\[0, 0.5\\)"),
        ("max-update-norm", 0.0, "max-update-norm must be positive"),
        ("max-examples", 0, "max-examples must be at least 1"),
        ("strategy", "krum", "strategy must be one of"),
    ],
)
def test_robustness_settings_are_validated(
    key: str, value: Any, message: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=message):
        settings_from_run_config(resolve_run_config(None, {key: value, "out": str(tmp_path)}))
