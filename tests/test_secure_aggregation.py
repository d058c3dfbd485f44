"""Secure aggregation (SecAgg+): the coordinator gets the weighted mean, never one hospital's arrays
or count.

Real ClientApps (tiny backbone, seeded simulated sites) answer the real SecAgg+ workflow through an
in-process grid that records every reply the server-side code receives.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from federation_harness import FakeGrid, federate, run_config, task_identity  # noqa: F401 - the fixture is used
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from rich.console import Console

import client.app as client_app
from medtune.checkpoint import load_checkpoint
from medtune.errors import ConfigError
from medtune.federation.private_api import missing_names
from medtune.federation.results import RunResults, round_table
from medtune.federation.secure_aggregation import CLIPPING_RANGE, LEGACY_NAMES, QUANTIZATION_RANGE
from medtune.own_evaluations import simulated_scores
from medtune.run_config import settings_from_run_config
from server.federation import checkpoint_dir

ALLOWED_CLEAR = {"hospital", "status", "epsilon", "delta", "steps"}


class SimulatedSite:
    """A simulated hospital's real ClientApp, mods included, as Flower's simulation runs it."""

    def __init__(
        self, node_id: int, partition: int, config: dict[str, Any], drops_at: str | None = None
    ) -> None:
        self.context = Context(
            run_id=1,
            node_id=node_id,
            node_config={"partition-id": partition},
            state=RecordDict(),
            run_config=config,
        )
        self.drops_at = drops_at  # a SecAgg+ stage at which this site dies (never answers)

    def __call__(self, message: Message) -> Message | None:
        stage = message.content.config_records.get(RECORD_KEY_CONFIGS, {}).get(Key.STAGE)
        if self.drops_at is not None and stage == self.drops_at:
            return None
        return client_app.app(message, self.context)


class RecordingGrid(FakeGrid):
    """Keeps every reply the server-side code receives."""

    def __init__(self, nodes: dict) -> None:
        super().__init__(nodes)
        self.received: list[Message] = []

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
        replies = super().pull_messages(message_ids)
        self.received.extend(replies)
        return replies


def sites(config: dict[str, Any], count: int, drops: dict[int, str] | None = None) -> RecordingGrid:
    return RecordingGrid(
        {i + 1: SimulatedSite(i + 1, i, config, (drops or {}).get(i + 1)) for i in range(count)}
    )


def test_every_legacy_flower_name_used_is_present() -> None:
    assert missing_names(LEGACY_NAMES) == []


def test_strategies_that_need_single_updates_are_refused_in_one_line(tmp_path: Path) -> None:
    for strategy in ("fedmedian", "trimmed-mean"):
        with pytest.raises(
            ConfigError, match=f"strategy={strategy} needs each hospital's own update"
        ):
            settings_from_run_config(
                run_config(
                    tmp_path,
                    tmp_path,
                    hospitals=3,
                    strategy=strategy,
                    **{"secure-aggregation": True, "min-hospitals": 3},
                )
            )
    with pytest.raises(ConfigError, match="secure-aggregation needs min-hospitals >= 3"):
        settings_from_run_config(
            run_config(tmp_path, tmp_path, hospitals=3, **{"secure-aggregation": True})
        )


def test_the_secure_mean_is_plain_fedavg_and_the_server_sees_no_single_update(
    tiny_backbone_dir: Path, tmp_path: Path
) -> None:
    common = {"min-hospitals": 3, "keep-updates": True}
    plain = run_config(tiny_backbone_dir, tmp_path / "plain", hospitals=3, **common)
    secure = run_config(
        tiny_backbone_dir,
        tmp_path / "secure",
        hospitals=3,
        **common,
        **{"secure-aggregation": True},
    )
    federate(sites(plain, 3), plain)
    grid = sites(secure, 3)
    results = federate(grid, secure)

    # The same seeded sites trained the same updates; the secure mean is their FedAvg up to
    # quantisation.
    expected = load_checkpoint(checkpoint_dir(tmp_path / "plain", 1)).arrays
    got = load_checkpoint(checkpoint_dir(tmp_path / "secure", 1)).arrays
    step = 2 * CLIPPING_RANGE / QUANTIZATION_RANGE
    for name, array in expected.items():
        error = float(np.max(np.abs(got[name] - array)))
        assert error < 1e-4, (name, error, step)
    assert results["rounds"][0]["aggregated"]
    assert {h["name"]: h["status"] for h in results["rounds"][0]["hospitals"]} == {
        f"hospital_{i}": "trained" for i in (1, 2, 3)
    }
    # Evaluation counts are summed the same way: the pooled figures equal the plain run's, exactly
    # (whole counts), while no hospital's own accuracy reaches the coordinator.
    plain_round = json.loads((tmp_path / "plain" / "results.json").read_text())["rounds"][0]
    secure_round = results["rounds"][0]
    assert (secure_round["accuracy"], secure_round["macro_f1"]) == (
        plain_round["accuracy"],
        plain_round["macro_f1"],
    )
    assert abs(secure_round["loss"] - plain_round["loss"]) < 1e-3
    assert all(h["accuracy"] is None and h["test_examples"] == 0 for h in secure_round["hospitals"])
    # Each hospital's bytes over every SecAgg+ stage: more than the plain exchange, as the masked
    # vector is 64-bit integers and each hospital also receives its neighbours' keys and shares.
    plain_rows = {h["name"]: h for h in plain_round["hospitals"]}
    for h in secure_round["hospitals"]:
        assert h["bytes_up"] > plain_rows[h["name"]]["bytes_up"] > 0 and h["bytes_down"] > 0
    # Each site kept its own score, the one a plain run's coordinator sees; the coordinator's table
    # says "hidden".
    own = simulated_scores(tmp_path / "secure", 3)
    assert {name: scores[1].accuracy for name, scores in own.items()} == {
        h["name"]: h["accuracy"] for h in plain_round["hospitals"]
    }
    # the table as shown, kept off the test's output
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(round_table(RunResults.load(tmp_path / "secure", 1).rounds[0], 1))
    assert "worst hospital hidden" in console.export_text()

    # What the server-side code received: no arrays in clear, no example count, only the allowed
    # clear report.
    plain_updates = [
        np.concatenate([a.ravel() for a in load_arrays(path).values()])
        for path in sorted(
            (tmp_path / "plain" / "updates" / "round_001").glob("hospital_*.safetensors")
        )
    ]
    assert len(plain_updates) == 3
    for reply in grid.received:
        if reply.has_error():
            continue
        for record in reply.content.array_records.values():
            assert len(record) == 0, "an array crossed in clear"
        for name, record in reply.content.metric_records.items():
            if name == "fitres.num_examples":
                assert record["num_examples"] == 0
        if "fitres.metrics" in reply.content.config_records:
            assert set(reply.content.config_records["fitres.metrics"]) <= ALLOWED_CLEAR
        # no plain evaluation reply: no per-class counts
        assert "metrics" not in reply.content.metric_records
    kept = sorted(p.name for p in (tmp_path / "secure" / "updates" / "round_001").iterdir())
    # the state it sent, and only the sum
    assert kept == ["_sent.safetensors", "secure-aggregate.safetensors"]


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(path)


def test_a_hospital_that_dies_mid_round_does_not_stall_it(
    tiny_backbone_dir: Path, tmp_path: Path
) -> None:
    """4 hospitals, threshold 3: one dies after sharing its keys; the round completes with the other
    three."""
    config = run_config(
        tiny_backbone_dir,
        tmp_path / "run",
        hospitals=4,
        **{"min-hospitals": 3, "secure-aggregation": True},
    )
    results = federate(sites(config, 4, drops={2: Stage.COLLECT_MASKED_VECTORS}), config)
    first = {h["name"]: h for h in results["rounds"][0]["hospitals"]}
    assert results["rounds"][0]["aggregated"]
    assert (
        first["hospital_2"]["status"] == "failed" and "dropped out" in first["hospital_2"]["reason"]
    )
    assert [first[f"hospital_{i}"]["status"] for i in (1, 3, 4)] == ["trained"] * 3


def test_a_site_requiring_secure_aggregation_refuses_a_plain_round_and_a_weak_setup(
    tiny_backbone_dir: Path, tmp_path: Path
) -> None:
    from federation_harness import site_files

    files = site_files(tmp_path)
    config = run_config(tiny_backbone_dir, tmp_path / "run", hospitals=1, **{"min-hospitals": 1})
    node_config = {
        "hospital": "hospital_1",
        "data-path": str(files[0]),
        "ledger-path": str(tmp_path / "ledger.json"),
        "text-column": "text",
        "label-column": "label",
        "max-epsilon": 8.0,
        "secure-aggregation": True,
    }
    context = Context(
        run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=config
    )
    from client.node_config import site_for
    from medtune.federation.wire import ARRAYS, to_record
    from medtune.label_prior import initial_model

    site = site_for(context)
    arrays = dict(
        initial_model(
            site.backbone, site.settings.model, site.settings.data, seed=0
        ).exchanged_state()
    )
    plain = Message(
        RecordDict({ARRAYS: to_record(arrays), "config": ConfigRecord({"server-round": 1})}),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )
    reply = client_app.app(plain, context)
    assert reply.content.config_records["hospital"]["reason"].startswith("privacy terms refused")
    assert not (tmp_path / "ledger.json").exists()  # nothing trained

    weak = {
        Key.STAGE: Stage.SETUP,
        Key.SAMPLE_NUMBER: 3,
        Key.SHARE_NUMBER: 3,
        Key.THRESHOLD: 1,
        Key.CLIPPING_RANGE: 8.0,
        Key.TARGET_RANGE: 2**22,
        Key.MOD_RANGE: 2**32,
        Key.MAX_WEIGHT: 1000.0,
    }
    setup = Message(
        RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(weak)}),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )
    reply = client_app.app(setup, context)
    assert reply.has_error() and reply.error.reason.startswith("privacy terms refused")
    assert "threshold" not in json.dumps(reply.error.reason)  # the details stay in the site's log
