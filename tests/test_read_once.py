"""Each value is read once, at the edge: one ClientApp call reads the run config and the run's
epsilon once (and a deployed site's own terms once), and later calls of the same run read neither
again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from call_counts import counting_calls, epsilon_sources
from federation_harness import run_config, site_files, task_identity  # noqa: F401 - the fixture is used
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

import client.app as client_app
import client.node_config as node_config
from medtune.backbone import load_backbone
from medtune.epsilon import read_epsilon
from medtune.federation.wire import ARRAYS, READY, TRAINED, hospital_of, to_record
from medtune.label_prior import initial_model
from medtune.run_config import settings_from_run_config

RUN_EPSILON = "run config 'epsilon'"
SITE_CEILING = "node config max-epsilon"


def _node(kind: str, tmp_path: Path, config: dict[str, Any]) -> dict[str, Any]:
    if kind == "simulated":
        return {"partition-id": 0}
    return {
        "hospital": "hospital_1",
        "data-path": str(site_files(tmp_path)[0]),
        "ledger-path": str(tmp_path / "site" / "ledger.json"),
        "text-column": "text",
        "label-column": "label",
        "max-epsilon": config["epsilon"],
    }


@pytest.mark.parametrize("kind", ["simulated", "deployed"])
def test_a_clientapp_reads_the_run_config_and_epsilon_once_per_run(
    kind: str, tiny_backbone_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = run_config(tiny_backbone_dir, tmp_path / "run", hospitals=2)
    monkeypatch.setattr(node_config, "_latest", None)  # a fresh process: nothing read yet
    context = Context(
        run_id=1,
        node_id=5,
        node_config=_node(kind, tmp_path, config),
        state=RecordDict(),
        run_config=config,
    )
    settings = settings_from_run_config(config)
    backbone = load_backbone(settings.model.backbone, settings.model.num_layers)
    arrays = to_record(
        dict(initial_model(backbone, settings.model, settings.data, seed=0).exchanged_state())
    )

    def ask(kind: str) -> Message:
        content = RecordDict({ARRAYS: arrays, "config": ConfigRecord({"server-round": 1})})
        return client_app.app(Message(content, dst_node_id=5, message_type=kind), context)

    with counting_calls(settings_from_run_config, read_epsilon) as first:
        answer = ask(MessageType.QUERY)
    assert hospital_of(answer, "")[1] == READY
    assert len(first["settings_from_run_config"]) == 1
    # The run's target once; a deployed site's own ceiling once; nothing else is an epsilon yet.
    expected = [RUN_EPSILON] + ([SITE_CEILING] if kind == "deployed" else [])
    assert sorted(epsilon_sources(first)) == sorted(expected)

    with counting_calls(settings_from_run_config, read_epsilon) as later:
        answer = ask(MessageType.TRAIN)
    assert hospital_of(answer, "")[1] == TRAINED
    assert later["settings_from_run_config"] == []
    assert RUN_EPSILON not in epsilon_sources(later)
    assert SITE_CEILING not in epsilon_sources(later)


def test_a_simulation_worker_reads_the_run_once_for_all_the_hospitals_it_serves(
    tiny_backbone_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flower runs many simulated hospitals in one worker process: the run config is read once
    there, and each hospital's site is built once, however its messages interleave."""
    config = run_config(tiny_backbone_dir, tmp_path / "run", hospitals=3)
    monkeypatch.setattr(node_config, "_latest", None)
    contexts = [
        Context(
            run_id=1,
            node_id=10 + partition,
            node_config={"partition-id": partition},
            state=RecordDict(),
            run_config=config,
        )
        for partition in range(3)
    ]
    with counting_calls(settings_from_run_config, read_epsilon) as calls:
        sites = [node_config.site_for(context) for context in contexts + contexts]
    assert len(calls["settings_from_run_config"]) == 1
    assert epsilon_sources(calls) == [RUN_EPSILON]
    assert [site.name for site in sites[:3]] == ["hospital_1", "hospital_2", "hospital_3"]
    assert all(again is first for first, again in zip(sites[:3], sites[3:], strict=True))
