"""Flower's Deployment Engine on loopback, as docs/deployment.md runs it at three hospitals.

One scenario, run once for the module: a SuperLink with TLS and SuperNode authentication, three
registered SuperNodes as separate OS processes (each with its own records file, privacy ledger
and Flower home) and one whose key is not registered. Run A (`flwr run . consortium`) plans 3
rounds and stops after 2; hospital h3's SuperNode is killed once round 1 is on record, so round 2
goes on with h1 and h2. h3 is restarted with the same node config and run B resumes for round 3.
Every process is started in its own session and stopped by PID (with all its descendants, which
Flower starts in sessions of their own) however the scenario ends.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_public_key
from flwr.app import Context, RecordDict
from flwr.supercore.exit import ExitCode
from safetensors.numpy import load_file

from medtune.certs import make_node_keys, make_server_certificates
from medtune.errors import ConfigError
from medtune.defaults import PROJECT_DIR, run_defaults
from client.node_config import site_for
from medtune.state import ExchangedStateSpec
from medtune.synth import SynthConfig, write_hospitals
from conftest import tiny_recipe

BIN = Path(sys.executable).parent
HOSPITALS = ("h1", "h2", "h3")
KILLED = "h3"
FLOWER_PROCESSES = "flower-superlink|flower-supernode|flower-superexec|flwr-serverapp|flwr-clientapp"
SPEC = ExchangedStateSpec(prompt_length=4, hidden_size=32, num_labels=5)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def children_by_parent() -> dict[int, list[int]]:
    """The live process tree from /proc (Flower's SuperExec and apps run in sessions of their own)."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def process_tree(pid: int) -> list[int]:
    tree, found, queue = children_by_parent(), [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        queue.extend(tree.get(current, []))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Processes:
    """Every process the test starts, by name; `stop` ends a process and all its descendants by PID."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env={**self.env, **(env or {})},
                cwd=PROJECT_DIR, start_new_session=True,
            )
        self.running[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def wait_for_log(self, name: str, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log(name):
            if self.running[name].poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{name} never logged {text!r}; its log:\n{self.log(name)[-3000:]}")
            time.sleep(0.2)

    def stop(self, name: str) -> None:
        """SIGTERM to every process group in the tree (a SuperNode then signs off), SIGKILL after 10 s."""
        process = self.running.pop(name)
        tree = process_tree(process.pid)
        for pid in tree:
            try:
                group = os.getpgid(pid)
                if group != os.getpgrp():
                    os.killpg(group, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in tree) and time.monotonic() < deadline:
            process.poll()
            time.sleep(0.1)
        for pid in filter(alive, tree):
            os.kill(pid, signal.SIGKILL)
        process.wait(timeout=10)

    def stop_all(self) -> None:
        for name in reversed(list(self.running)):
            self.stop(name)


def leftovers(markers: list[str]) -> list[str]:
    """Flower processes still running whose command line names one of this test's ports or paths."""
    listing = subprocess.run(["pgrep", "-af", FLOWER_PROCESSES], capture_output=True, text=True).stdout
    return [line for line in listing.splitlines() if any(marker in line for marker in markers)]


@dataclass
class Deployment:
    out: Path
    sites: dict[str, Path]
    superlink_log: str
    rogue_exit: int | None
    rogue_log: str
    node_ids: dict[str, str]
    rejoined_node_id: str
    ledger_after_run_a: dict[str, dict]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def run_config(backbone: Path, out: Path, **extra: object) -> str:
    """Tiny settings. The round timeout is only a ceiling: a stopped SuperNode is reported unavailable
    at once, so no round waits for it, and a loaded 2-core machine can take a minute per round."""
    values = {
        **tiny_recipe(backbone), "hospitals": 3, "min-hospitals": 2, "epsilon": 8.0, "rounds": 3, "keep-updates": True, "round-timeout": 120.0, "out": str(out), **extra,
    }
    return "\n".join(f"{key} = {json.dumps(value)}" for key, value in values.items()) + "\n"


def flwr_run(processes: Processes, name: str, config: Path, coordinator_home: Path) -> subprocess.Popen[bytes]:
    args = [str(BIN / "flwr"), "run", str(PROJECT_DIR), "consortium", "--run-config", str(config), "--stream"]
    return processes.start(name, args, env={"FLWR_HOME": str(coordinator_home)})


def finish(processes: Processes, name: str, timeout: float) -> None:
    try:
        code = processes.running[name].wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log = processes.log(name)[-3000:]
        raise AssertionError(f"{name} still running after {timeout} s; its log:\n{log}") from None
    assert code == 0, f"{name} exited with {code}:\n{processes.log(name)[-3000:]}"
    processes.running.pop(name)


def node_id(log: str) -> str:
    return log.split("SuperNode ID: ", 1)[1].split()[0]


@pytest.fixture(scope="module")
def deployment(tiny_backbone_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("deployment")
    coordinator, out, logs = root / "coordinator", root / "coordinator" / "out", root / "logs"
    logs.mkdir()
    link_port = free_port()
    env = {
        **os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
        "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_HOME": str(coordinator / "flwr"),
    }
    processes = Processes(env, logs)
    markers = [str(root), f"127.0.0.1:{link_port}"]
    try:
        # Coordinator: certificates, the SuperLink, the `flwr` connection.
        certs = make_server_certificates(coordinator / "certificates", ["127.0.0.1"])
        processes.start("superlink", [
            str(BIN / "flower-superlink"),
            "--ssl-ca-certfile", str(certs.ca_cert), "--ssl-certfile", str(certs.server_cert),
            "--ssl-keyfile", str(certs.server_key), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation", "--isolation", "subprocess",
            "--database", str(coordinator / "state.db"), "--host", "127.0.0.1", "--port", str(link_port),
        ])
        (coordinator / "flwr").mkdir(parents=True)
        (coordinator / "flwr" / "config.toml").write_text(
            f'[superlink.consortium]\naddress = "127.0.0.1:{link_port}"\nroot-certificates = "{certs.ca_cert}"\n'
        )
        # Sites: records, a key pair each; h1-h3 are registered, "rogue" is not.
        records = write_hospitals(SynthConfig(hospitals=3, mean_records=40, seed=0), root / "synthetic")
        sites = {name: root / f"site-{name}" for name in (*HOSPITALS, "rogue")}
        for (name, site), source in zip(sites.items(), [*records, records[0]]):
            (site / "data").mkdir(parents=True)
            (site / "data" / "notes.csv").write_bytes(source.read_bytes())
            make_node_keys(site / "keys", name)
        processes.wait_for_log("superlink", "Uvicorn running on https://127.0.0.1", timeout=60)
        for name in HOSPITALS:
            processes.start(f"register-{name}", [
                str(BIN / "flwr"), "supernode", "register", str(sites[name] / "keys" / f"{name}.pub"), "consortium",
            ])
        for name in HOSPITALS:
            finish(processes, f"register-{name}", timeout=60)

        def start_supernode(name: str, log_name: str) -> None:
            site, port = sites[name], free_port()
            markers.append(f"127.0.0.1:{port}")
            processes.start(log_name, [
                str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{link_port}",
                "--root-certificates", str(certs.ca_cert),
                "--auth-supernode-private-key", str(site / "keys" / name),
                "--node-config",
                f'hospital="{name}" data-path="{site / "data" / "notes.csv"}" ledger-path="{site / "ledger.json"}"',
                "--host", "127.0.0.1", "--port", str(port),
            ], env={"FLWR_HOME": str(site / "flwr")})

        for name in (*HOSPITALS, "rogue"):
            start_supernode(name, name)
        for name in HOSPITALS:
            processes.wait_for_log(name, "SuperNode ID: ", timeout=60)
        rogue = processes.running["rogue"]
        rogue_exit = rogue.wait(timeout=60)
        processes.running.pop("rogue")
        node_ids = {name: node_id(processes.log(name)) for name in HOSPITALS}

        # Run A: rounds 1-2 of 3; h3's SuperNode is killed as soon as round 1 is on record.
        config_a, config_b = coordinator / "run-a.toml", coordinator / "run-b.toml"
        config_a.write_text(run_config(tiny_backbone_dir, out, **{"until-round": 2}))
        config_b.write_text(run_config(tiny_backbone_dir, out, resume=str(out)))
        flwr_run(processes, "run-a", config_a, coordinator / "flwr")
        deadline = time.monotonic() + 240
        while not ((out / "results.json").is_file() and read_json(out / "results.json")["rounds"]):
            assert processes.running["run-a"].poll() is None, processes.log("run-a")[-3000:]
            assert time.monotonic() < deadline, "round 1 never finished:\n" + processes.log("run-a")[-3000:]
            time.sleep(0.2)
        processes.stop(KILLED)
        finish(processes, "run-a", timeout=240)
        ledger_after_run_a = {name: read_json(sites[name] / "ledger.json") for name in HOSPITALS}

        # h3 comes back with the same node config and key, and run B resumes for round 3.
        start_supernode(KILLED, f"{KILLED}-restarted")
        processes.wait_for_log(f"{KILLED}-restarted", "SuperNode ID: ", timeout=60)
        flwr_run(processes, "run-b", config_b, coordinator / "flwr")
        finish(processes, "run-b", timeout=240)
        yield Deployment(
            out=out,
            sites={name: sites[name] for name in HOSPITALS},
            superlink_log=processes.log("superlink"),
            rogue_exit=rogue_exit,
            rogue_log=processes.log("rogue"),
            node_ids=node_ids,
            rejoined_node_id=node_id(processes.log(f"{KILLED}-restarted")),
            ledger_after_run_a=ledger_after_run_a,
        )
    finally:
        processes.stop_all()
        still_running = leftovers(markers)
        assert not still_running, f"processes left running: {still_running}"


def hospital(round_record: dict, name: str) -> dict:
    return next(h for h in round_record["hospitals"] if h["name"] == name)


@pytest.mark.slow
def test_an_unregistered_supernode_is_refused(deployment: Deployment) -> None:
    assert "Uvicorn running on https://" in deployment.superlink_log  # TLS on every SuperLink API
    # Flower logs its exit code 305, but the SuperNode runs inside uvicorn, whose process exits with 1.
    assert deployment.rogue_exit != 0
    assert f"Exit Code: {int(ExitCode.SUPERNODE_CONNECTION_ERROR)}" in deployment.rogue_log
    assert "Failed to activate SuperNode" in deployment.rogue_log
    assert "No SuperNode found with the given public key" in deployment.superlink_log


@pytest.mark.slow
def test_two_rounds_send_only_the_prompt_and_head(deployment: Deployment) -> None:
    record = read_json(deployment.out / "results.json")
    first, second, third = record["rounds"]
    expected = {name: {"shape": list(shape), "dtype": "float32"} for name, shape in SPEC.shapes.items()}
    assert sorted(h["name"] for h in first["hospitals"] if h["status"] == "trained") == list(HOSPITALS)
    for round_record in (first, second, third):
        assert round_record["aggregated"]
        for trained in (h for h in round_record["hospitals"] if h["status"] == "trained"):
            assert trained["received"] == expected
            assert SPEC.num_bytes() <= trained["bytes_up"] < SPEC.num_bytes() + 3 * 200
            assert trained["bytes_down"] >= 2 * SPEC.num_bytes()  # the global state for training and evaluation
            folder = deployment.out / "updates" / f"round_{round_record['round']:03d}"
            update = load_file(str(folder / f"{trained['name']}.safetensors"))
            assert {name: list(a.shape) for name, a in update.items()} == {n: e["shape"] for n, e in expected.items()}
    assert sorted(p.name for p in (deployment.out / "checkpoints").iterdir()) == ["round_001", "round_002", "round_003"]
    assert not (deployment.out / "sites").exists()  # no ledger, no record at the coordinator


@pytest.mark.slow
def test_each_site_keeps_its_ledger_and_reports_its_epsilon(deployment: Deployment) -> None:
    rounds = read_json(deployment.out / "results.json")["rounds"]
    for name, site in deployment.sites.items():
        ledger = read_json(site / "ledger.json")
        last = hospital(rounds[-1], name)
        assert last["status"] == "trained"
        assert ledger["steps"] == last["steps"]
        assert ledger["epsilon_spent"] == pytest.approx(last["epsilon"], rel=1e-9)
        assert 0 < last["epsilon"] <= 8.0


@pytest.mark.slow
def test_a_killed_site_rejoins_with_its_epsilon_where_it_was(deployment: Deployment) -> None:
    first, second, third = read_json(deployment.out / "results.json")["rounds"]
    assert sorted(h["name"] for h in second["hospitals"] if h["status"] == "trained") == ["h1", "h2"]
    assert second["aggregated"]  # min-hospitals = 2: the run went on without h3
    assert deployment.rejoined_node_id == deployment.node_ids[KILLED]  # the same registered key, the same node
    per_round = {name: hospital(first, name)["steps"] for name in HOSPITALS}
    before = deployment.ledger_after_run_a[KILLED]
    assert before["steps"] == per_round[KILLED]  # killed before it trained round 2
    rejoined = hospital(third, KILLED)
    assert rejoined["steps"] == before["steps"] + per_round[KILLED]  # continued from its ledger, not reset
    assert rejoined["epsilon"] > before["epsilon_spent"] > 0
    for name in ("h1", "h2"):
        steps = [hospital(r, name)["steps"] for r in (first, second, third)]
        assert steps == [per_round[name], 2 * per_round[name], 3 * per_round[name]]


def test_certificates_name_the_superlink_and_keys_are_never_replaced(tmp_path: Path) -> None:
    first = make_server_certificates(tmp_path / "certs", ["127.0.0.1", "superlink.example"])
    ca = first.ca_cert.read_bytes()
    with pytest.raises(ConfigError, match="pass --rotate"):  # a key SuperNodes may have pinned is never replaced silently
        make_server_certificates(tmp_path / "certs", ["10.0.0.5"])
    again = make_server_certificates(tmp_path / "certs", ["10.0.0.5"], rotate=True)  # a new host keeps the consortium CA
    assert again.ca_cert.read_bytes() == ca
    names = x509.load_pem_x509_certificate(again.server_cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert [str(ip) for ip in names.value.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert oct(first.ca_key.stat().st_mode & 0o777) == "0o600"
    keys = make_node_keys(tmp_path / "keys", "h1")
    assert load_ssh_public_key(keys.public_key.read_bytes()).curve.name == "secp384r1"
    with pytest.raises(ConfigError, match="not replaced"):
        make_node_keys(tmp_path / "keys", "h1")


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({"hospital": "h1", "data-path": "notes.csv", "ledger-path": "/srv/ledger.json"}, "must be absolute"),
        ({"hospital": "../h1", "data-path": "/srv/notes.csv", "ledger-path": "/srv/ledger.json"}, "hospital '../h1': use 1-64"),
        ({"hospital": "h1", "data-path": "/srv/notes.csv"}, r"lacks \['ledger-path'\]"),
    ],
)
def test_a_site_with_an_unusable_node_config_is_refused_by_name(node_config: dict, message: str) -> None:
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_defaults())
    with pytest.raises(ConfigError, match=message):
        site_for(context)
