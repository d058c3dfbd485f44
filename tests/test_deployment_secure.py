"""Secure aggregation on Flower's Deployment Engine, on loopback: TLS, node authentication, `medtune
site`.

A SuperLink and three registered sites whose site files require secure aggregation. A plain run is
refused by every site before any record is read; a secure run of 2 rounds completes, and the
coordinator keeps only the aggregate of each round.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_deployment import (
    BIN,
    HOSPITALS,
    coordinator_processes,
    finish,
    flwr_run,
    free_port,
    leftovers,
    read_json,
    run_config,
    site_file,
    start_superlink,
)

from medtune.certs import make_node_keys
from medtune.synth import SynthConfig, write_hospitals

pytestmark = pytest.mark.slow


@dataclass
class SecureDeployment:
    secure: Path  # the secure run's out directory
    plain: Path  # the plain run's, refused by every site
    sites: dict[str, Path]
    site_logs: dict[str, str]


@pytest.fixture(scope="module")
def secure_deployment(
    tiny_backbone_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SecureDeployment]:
    root = tmp_path_factory.mktemp("secure-deployment")
    coordinator = root / "coordinator"
    link_port = free_port()
    processes = coordinator_processes(root)
    markers = [str(root), f"127.0.0.1:{link_port}"]
    try:
        certs = start_superlink(processes, coordinator, link_port)
        records = write_hospitals(
            SynthConfig(hospitals=3, mean_records=40, seed=0), root / "synthetic"
        )
        sites = {name: root / f"site-{name}" for name in HOSPITALS}
        for (name, site), source in zip(sites.items(), records, strict=True):
            (site / "data").mkdir(parents=True)
            (site / "data" / "notes.csv").write_bytes(source.read_bytes())
            make_node_keys(site / "keys", name)
        processes.wait_for_log("superlink", "Uvicorn running on https://127.0.0.1", timeout=60)
        for name in HOSPITALS:
            processes.start(
                f"register-{name}",
                [
                    str(BIN / "flwr"),
                    "supernode",
                    "register",
                    str(sites[name] / "keys" / f"{name}.pub"),
                    "consortium",
                ],
            )
            finish(processes, f"register-{name}", timeout=60)
        for name in HOSPITALS:
            path = site_file(
                sites[name], name, link_port, certs.ca_cert, **{"secure-aggregation": True}
            )
            markers.append(str(path))
            processes.start(name, [str(BIN / "medtune"), "site", "run", str(path)])
        for name in HOSPITALS:
            processes.wait_for_log(name, "SuperNode ID: ", timeout=90)

        plain, secure = coordinator / "plain", coordinator / "secure"
        (coordinator / "plain.toml").write_text(
            run_config(tiny_backbone_dir, plain, rounds=1, **{"min-hospitals": 3})
        )
        flwr_run(processes, "run-plain", coordinator / "plain.toml", coordinator / "flwr")
        finish(processes, "run-plain", timeout=240, expect_success=False)
        (coordinator / "secure.toml").write_text(
            run_config(
                tiny_backbone_dir,
                secure,
                rounds=2,
                **{"min-hospitals": 3, "secure-aggregation": True},
            )
        )
        flwr_run(processes, "run-secure", coordinator / "secure.toml", coordinator / "flwr")
        finish(processes, "run-secure", timeout=400)
        yield SecureDeployment(
            secure=secure,
            plain=plain,
            sites=sites,
            site_logs={name: processes.log(name) for name in HOSPITALS},
        )
    finally:
        processes.stop_all()
        still_running = leftovers(markers)
        assert not still_running, f"processes left running: {still_running}"


def test_a_site_that_requires_secure_aggregation_refuses_a_plain_round(
    secure_deployment: SecureDeployment,
) -> None:
    results = read_json(secure_deployment.plain / "results.json")
    # no one was asked to train: all three refused at the readiness query
    assert not results["rounds"]
    assert any("privacy terms refused" in event for event in results["events"])
    for name in HOSPITALS:
        assert "only through secure aggregation" in secure_deployment.site_logs[name]


def test_a_secure_run_with_tls_and_authentication_completes_two_rounds(
    secure_deployment: SecureDeployment,
) -> None:
    results = read_json(secure_deployment.secure / "results.json")
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert all(r["aggregated"] for r in results["rounds"])
    for record in results["rounds"]:
        rows = {h["name"]: h for h in record["hospitals"]}
        assert [rows[name]["status"] for name in HOSPITALS] == ["trained"] * 3
        assert all(rows[name]["examples"] == 0 and not rows[name]["received"] for name in HOSPITALS)
        # the clear report the ledger record needs
        assert all(rows[name]["steps"] > 0 for name in HOSPITALS)
    for server_round in (1, 2):
        kept = sorted(
            p.name
            for p in (secure_deployment.secure / "updates" / f"round_{server_round:03d}").iterdir()
        )
        # the state it sent, and only the sum
        assert kept == ["_sent.safetensors", "secure-aggregate.safetensors"]
    for name, site in secure_deployment.sites.items():
        assert read_json(site / "ledger.json")["trained_rounds"] == [1, 2], name
