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
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import tiny_recipe
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_public_key
from flwr.app import Context, RecordDict
from flwr.supercore.exit import ExitCode
from safetensors.numpy import load_file

from client.node_config import check_evaluation_shared, site_for
from medtune.certs import ServerCertificates, make_node_keys, make_server_certificates
from medtune.code_approval import APP_PACKAGES
from medtune.defaults import run_defaults
from medtune.errors import ConfigError, EvaluationWithheldError, PrivacyTermsError
from medtune.federation.wire import failure_reason
from medtune.state import ExchangedStateSpec
from medtune.synth import SynthConfig, write_hospitals

BIN = Path(sys.executable).parent
PROJECT_DIR = Path(__file__).resolve().parents[1]  # the checkout `flwr run` packs into a FAB
HOSPITALS = ("h1", "h2", "h3")
APPROVING = "h4"  # registered, started only at the end, with the modified FAB in its approved-fabs
KILLED = "h3"
SITE_MAX_EPSILON = 8.0  # every site's own ceiling (its site file)
STRICTER_EPSILON = 4.0  # what the honest runs ask for: below the ceiling, so it is honoured
FLOWER_PROCESSES = (
    "flower-superlink|flower-supernode|flower-superexec|flwr-serverapp|flwr-clientapp|"
    "medtune site run"
)
SPEC = ExchangedStateSpec(prompt_length=4, hidden_size=32, num_labels=5)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def children_by_parent() -> dict[int, list[int]]:
    """The live process tree from /proc (Flower's SuperExec and apps run in sessions of their
    own)."""
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
    """Every process the test starts, by name; `stop` ends a process and all its descendants by
    PID."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(
        self, name: str, args: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**self.env, **(env or {})},
                cwd=PROJECT_DIR,
                start_new_session=True,
            )
        self.running[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def wait_for_log(self, name: str, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log(name):
            if self.running[name].poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"{name} never logged {text!r}; its log:\n{self.log(name)[-3000:]}"
                )
            time.sleep(0.2)

    def stop(self, name: str) -> None:
        """SIGTERM to every process group in the tree (a SuperNode then signs off), SIGKILL after
        10 s."""
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
    listing = subprocess.run(
        ["pgrep", "-af", FLOWER_PROCESSES], capture_output=True, text=True, timeout=60
    ).stdout
    return [line for line in listing.splitlines() if any(marker in line for marker in markers)]


@dataclass
class Deployment:
    out: Path
    sites: dict[str, Path]
    superlink_log: str
    site_logs: dict[str, str]
    rogue_exit: int | None
    rogue_log: str
    node_ids: dict[str, str]
    rejoined_node_id: str
    ledger_after_run_a: dict[str, dict]
    refused: dict[str, Path]  # out directory of each refused run, by case
    # sites where the coordinator's modified code ran before any approval
    markers_after_refusals: list[str]
    approved: Path  # out directory of the modified FAB's run once h4 approved it
    approving_site: Path
    # files any site had after the refused runs (none expected but its keys)
    left_by_refused_runs: list[str]
    modified_fab_hash: str
    # before the approved run (h1-h3 refuse it, so nothing changes)
    ledgers_after_run_b: dict[str, dict]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def run_config(backbone: Path, out: Path, **extra: object) -> str:
    """Tiny settings. The round timeout is only a ceiling: a stopped SuperNode is reported
    unavailable at once, so no round waits for it, and a loaded 2-core machine can take a minute
    per round."""
    values = {
        **tiny_recipe(backbone),
        "hospitals": 3,
        "min-hospitals": 2,
        "epsilon": STRICTER_EPSILON,
        "rounds": 3,
        "keep-updates": True,
        "round-timeout": 120.0,
        "out": str(out),
        **extra,
    }
    return "\n".join(f"{key} = {json.dumps(value)}" for key, value in values.items()) + "\n"


def flwr_run(
    processes: Processes, name: str, config: Path, coordinator_home: Path, app: Path = PROJECT_DIR
) -> None:
    args = [
        str(BIN / "flwr"),
        "run",
        str(app),
        "consortium",
        "--run-config",
        str(config),
        "--stream",
    ]
    processes.start(name, args, env={"FLWR_HOME": str(coordinator_home)})


def finish(processes: Processes, name: str, timeout: float, expect_success: bool = True) -> None:
    try:
        code = processes.running[name].wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log = processes.log(name)[-3000:]
        raise AssertionError(f"{name} still running after {timeout} s; its log:\n{log}") from None
    if expect_success:
        assert code == 0, f"{name} exited with {code}:\n{processes.log(name)[-3000:]}"
    processes.running.pop(name)


def node_id(log: str) -> str:
    return log.split("SuperNode ID: ", 1)[1].split()[0]


MARKER = "coordinator-code-ran-here"


def modified_app(root: Path) -> Path:
    """The coordinator's copy of MedTune whose client/app.py has one extra line: it writes MARKER
    at the site that imports it (in the site's folder, the parent of its Flower home)."""
    copy = root / "coordinator-modified-app"
    copy.mkdir()
    shutil.copy(PROJECT_DIR / "pyproject.toml", copy / "pyproject.toml")
    for package in APP_PACKAGES:
        shutil.copytree(
            PROJECT_DIR / package, copy / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    app = copy / "client" / "app.py"
    app.write_text(
        app.read_text() + "\nimport os as _os, pathlib as _p\n"
        f"_p.Path(_os.environ['FLWR_HOME']).parent.joinpath({MARKER!r}).write_text('ran')\n"
    )
    return copy


def site_file(
    site: Path,
    name: str,
    link_port: int,
    ca: Path,
    approved_fabs: tuple[str, ...] = (),
    **terms: object,
) -> Path:
    """A hospital's site file, as docs/deployment.md writes it (`terms`: more of the site's own
    keys)."""
    values = {
        "hospital": name,
        "superlink": f"127.0.0.1:{link_port}",
        "root-certificates": str(ca),
        "auth-key": str(site / "keys" / name),
        "data-path": str(site / "data" / "notes.csv"),
        "text-column": "text",
        "label-column": "label",
        "ledger-path": str(site / "ledger.json"),
        "max-epsilon": SITE_MAX_EPSILON,
        "runtime-port": free_port(),
        "flower-home": str(site / "flwr"),
        "approved-fabs": list(approved_fabs),
        **terms,
    }
    path = site / "site.toml"
    path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items()))
    return path


def site_files_now(sites: dict[str, Path]) -> list[str]:
    """Every file at the sites beyond their keys, records, site file and Flower home (the runner's
    claim secret and kept FABs included)."""
    kept = {"keys", "data", "site.toml", "flwr"}
    return sorted(
        str(path.relative_to(site.parent))
        for site in sites.values()
        for path in site.rglob("*")
        if path.is_file() and path.relative_to(site).parts[0] not in kept
    )


def coordinator_processes(root: Path) -> Processes:
    """The scenario's process table: logs under root/logs, the coordinator's Flower home under
    root/coordinator."""
    (root / "logs").mkdir()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_HOME": str(root / "coordinator" / "flwr"),
    }
    return Processes(env, root / "logs")


def start_superlink(processes: Processes, coordinator: Path, link_port: int) -> ServerCertificates:
    """The coordinator: certificates, a SuperLink with TLS and node authentication, the `flwr`
    connection."""
    certs = make_server_certificates(coordinator / "certificates", ["127.0.0.1"])
    processes.start(
        "superlink",
        [
            str(BIN / "flower-superlink"),
            "--ssl-ca-certfile",
            str(certs.ca_cert),
            "--ssl-certfile",
            str(certs.server_cert),
            "--ssl-keyfile",
            str(certs.server_key),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--isolation",
            "subprocess",
            "--database",
            str(coordinator / "state.db"),
            "--host",
            "127.0.0.1",
            "--port",
            str(link_port),
        ],
    )
    (coordinator / "flwr").mkdir(parents=True)
    (coordinator / "flwr" / "config.toml").write_text(
        f'[superlink.consortium]\naddress = "127.0.0.1:{link_port}"\nroot-certificates = '
        f'"{certs.ca_cert}"\n'
    )
    return certs


@pytest.fixture(scope="module")
def deployment(
    tiny_backbone_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("deployment")
    coordinator, out = root / "coordinator", root / "coordinator" / "out"
    link_port = free_port()
    processes = coordinator_processes(root)
    markers = [str(root), f"127.0.0.1:{link_port}"]
    try:
        certs = start_superlink(processes, coordinator, link_port)
        # Sites: records, a key pair and a site file each; h1-h3 are registered, "rogue" is not.
        records = write_hospitals(
            SynthConfig(hospitals=3, mean_records=40, seed=0), root / "synthetic"
        )
        sites = {name: root / f"site-{name}" for name in (*HOSPITALS, "rogue", APPROVING)}
        for (name, site), source in zip(sites.items(), [*records, records[0], records[1]]):
            (site / "data").mkdir(parents=True)
            (site / "data" / "notes.csv").write_bytes(source.read_bytes())
            make_node_keys(site / "keys", name)
        processes.wait_for_log("superlink", "Uvicorn running on https://127.0.0.1", timeout=60)
        for name in (*HOSPITALS, APPROVING):
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
        for name in (*HOSPITALS, APPROVING):
            finish(processes, f"register-{name}", timeout=60)

        def start_site(name: str, log_name: str, approved_fabs: tuple[str, ...] = ()) -> None:
            """`medtune site run site.toml`, the one command docs/deployment.md gives a site (its
            port picked now)."""
            path = site_file(sites[name], name, link_port, certs.ca_cert, approved_fabs)
            markers.append(str(path))
            processes.start(log_name, [str(BIN / "medtune"), "site", "run", str(path)])

        for name in (*HOSPITALS, "rogue"):
            start_site(name, name)
        for name in HOSPITALS:
            processes.wait_for_log(name, "SuperNode ID: ", timeout=90)
        rogue = processes.running["rogue"]
        rogue_exit = rogue.wait(timeout=90)
        processes.running.pop("rogue")
        node_ids = {name: node_id(processes.log(name)) for name in HOSPITALS}

        # Runs the sites refuse, before any honest run: the coordinator's modified code, then
        # privacy requests above the sites' terms. Each is one round; no site may read a record or
        # take a step.
        modified = modified_app(root)
        refused = {
            case: coordinator / f"refused-{case}"
            for case in ("modified-code", "no-dp", "above-ceiling")
        }
        cases = {
            "modified-code": ({}, modified),
            "no-dp": ({"epsilon": "inf"}, PROJECT_DIR),
            "above-ceiling": ({"epsilon": 2 * SITE_MAX_EPSILON}, PROJECT_DIR),
        }
        for case, (extra, app) in cases.items():
            config = coordinator / f"{case}.toml"
            config.write_text(run_config(tiny_backbone_dir, refused[case], rounds=1, **extra))
            flwr_run(processes, f"run-{case}", config, coordinator / "flwr", app=app)
            finish(processes, f"run-{case}", timeout=240, expect_success=False)
        left_by_refused_runs = site_files_now({name: sites[name] for name in HOSPITALS})
        markers_after_refusals = sorted(
            name for name, site in sites.items() if (site / MARKER).exists()
        )
        modified_fab_hash = next((sites["h1"] / "refused-fabs").glob("*.fab")).stem

        # Run A: round 1 of 3 with every site; then h3's SuperNode is killed, and the run resumes
        # for round 2 without it (a short round-timeout: the coordinator need not wait long for
        # a site it will not hear from).
        config_a, config_b = coordinator / "run-a.toml", coordinator / "run-b.toml"
        config_a2 = coordinator / "run-a2.toml"
        config_a.write_text(run_config(tiny_backbone_dir, out, **{"until-round": 1}))
        config_a2.write_text(
            run_config(
                tiny_backbone_dir,
                out,
                resume=str(out),
                **{"until-round": 2, "round-timeout": 15.0},
            )
        )
        config_b.write_text(run_config(tiny_backbone_dir, out, resume=str(out)))
        flwr_run(processes, "run-a", config_a, coordinator / "flwr")
        finish(processes, "run-a", timeout=240)
        processes.stop(KILLED)
        flwr_run(processes, "run-a2", config_a2, coordinator / "flwr")
        finish(processes, "run-a2", timeout=240)
        ledger_after_run_a = {name: read_json(sites[name] / "ledger.json") for name in HOSPITALS}

        # h3 comes back with the same site file and key, and run B resumes for round 3.
        start_site(KILLED, f"{KILLED}-restarted")
        processes.wait_for_log(f"{KILLED}-restarted", "SuperNode ID: ", timeout=90)
        flwr_run(processes, "run-b", config_b, coordinator / "flwr")
        finish(processes, "run-b", timeout=240)
        ledgers_after_run_b = {name: read_json(sites[name] / "ledger.json") for name in HOSPITALS}

        # h4's IT reviewed the modified FAB (kept by h1 under refused-fabs/) and listed its hash:
        # the same FAB sent again runs as its own code at h4 only, under Flower's runner; h1-h3
        # still refuse it.
        start_site(APPROVING, APPROVING, approved_fabs=(modified_fab_hash,))
        processes.wait_for_log(APPROVING, "SuperNode ID: ", timeout=90)
        approved = coordinator / "approved-at-h4"
        config = coordinator / "approved.toml"
        config.write_text(
            run_config(tiny_backbone_dir, approved, rounds=1, hospitals=4, **{"min-hospitals": 1})
        )
        flwr_run(processes, "run-approved", config, coordinator / "flwr", app=modified)
        finish(processes, "run-approved", timeout=240, expect_success=False)
        yield Deployment(
            out=out,
            sites={name: sites[name] for name in HOSPITALS},
            superlink_log=processes.log("superlink"),
            site_logs={name: processes.log(name) for name in HOSPITALS},
            rogue_exit=rogue_exit,
            rogue_log=processes.log("rogue"),
            node_ids=node_ids,
            rejoined_node_id=node_id(processes.log(f"{KILLED}-restarted")),
            ledger_after_run_a=ledger_after_run_a,
            refused=refused,
            markers_after_refusals=markers_after_refusals,
            approved=approved,
            approving_site=sites[APPROVING],
            left_by_refused_runs=left_by_refused_runs,
            modified_fab_hash=modified_fab_hash,
            ledgers_after_run_b=ledgers_after_run_b,
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
    # Flower logs its exit code 305, but the SuperNode runs inside uvicorn, whose process exits
    # with 1.
    assert deployment.rogue_exit != 0
    assert f"Exit Code: {int(ExitCode.SUPERNODE_CONNECTION_ERROR)}" in deployment.rogue_log
    assert "Failed to activate SuperNode" in deployment.rogue_log
    assert "No SuperNode found with the given public key" in deployment.superlink_log


def refused_reasons(out: Path) -> dict[str, str]:
    """Each hospital's status and reason in a one-round run, as the coordinator recorded them: in
    its round, or, when too few were ready and no one was asked to train, in the readiness query's
    events."""
    results = read_json(out / "results.json")
    if results["rounds"]:
        (only_round,) = results["rounds"]
        return {h["name"]: f"{h['status']}: {h['reason']}" for h in only_round["hospitals"]}
    failed = (re.fullmatch(r"round 1: (\S+) failed: (.+)", event) for event in results["events"])
    return {match[1]: f"failed: {match[2]}" for match in failed if match}


@pytest.mark.slow
def test_the_coordinators_modified_code_is_refused_before_it_is_imported(
    deployment: Deployment,
) -> None:
    # the extra line in the coordinator's client/app.py never ran
    assert deployment.markers_after_refusals == []
    reasons = refused_reasons(deployment.refused["modified-code"])
    assert sorted(reasons) == list(HOSPITALS)
    for reason in reasons.values():
        assert (
            reason == "failed: code not approved by the site; the details are in the site's own log"
        )
    for name, log in deployment.site_logs.items():
        lines = [
            line for line in log.splitlines() if "code differs from the installed MedTune" in line
        ]
        # one per message: the readiness query (h3's log is its first process's, killed in run A)
        assert lines
        assert all(
            "1 changed (client/app.py)" in line and "refused before any of it was imported" in line
            for line in lines
        )
        kept = deployment.sites[name] / "refused-fabs" / f"{deployment.modified_fab_hash}.fab"
        assert kept.is_file()  # kept for the site's IT: `medtune site review`
    assert not (deployment.refused["modified-code"] / "checkpoints").exists()


@pytest.mark.slow
def test_a_fab_the_site_approved_by_hash_runs_as_its_own_code_there_only(
    deployment: Deployment,
) -> None:
    reasons = refused_reasons(deployment.approved)
    # h4 listed the FAB's hash: Flower's runner ran it
    assert reasons[APPROVING].startswith("trained")
    assert {reasons[name] for name in HOSPITALS} == {
        "failed: code not approved by the site; the details are in the site's own log"
    }
    assert (deployment.approving_site / MARKER).is_file()
    assert not [name for name, site in deployment.sites.items() if (site / MARKER).exists()]
    for name, site in deployment.sites.items():  # a refused run charges nothing
        assert read_json(site / "ledger.json") == deployment.ledgers_after_run_b[name]


@pytest.mark.slow
def test_privacy_requests_above_a_sites_terms_are_refused_and_a_stricter_one_is_honoured(
    deployment: Deployment,
) -> None:
    for case, key in (
        ("no-dp", "epsilon=inf (no DP)"),
        ("above-ceiling", f"epsilon={2 * SITE_MAX_EPSILON:g}"),
    ):
        reasons = refused_reasons(deployment.refused[case])
        assert set(reasons.values()) == {
            "failed: privacy terms refused; the details are in the site's own log"
        }
        for log in deployment.site_logs.values():
            assert any(key in line and "max-epsilon" in line for line in log.splitlines()), case
    # No refused run left a ledger, a feature cache or anything else at a site: no record was read,
    # no step taken.
    left = [
        f
        for f in deployment.left_by_refused_runs
        if "refused-fabs" not in f and not f.endswith(".superexec-secret")
    ]
    assert left == []
    for name, site in deployment.sites.items():
        ledger = read_json(site / "ledger.json")
        # the run's stricter request, under the ceiling of 8
        assert ledger["epsilon_target"] == STRICTER_EPSILON
        assert 0 < ledger["epsilon_spent"] <= STRICTER_EPSILON


@pytest.mark.slow
def test_two_rounds_send_only_the_prompt_and_head(deployment: Deployment) -> None:
    record = read_json(deployment.out / "results.json")
    first, second, third = record["rounds"]
    expected = {
        name: {"shape": list(shape), "dtype": "float32"} for name, shape in SPEC.shapes.items()
    }
    assert sorted(h["name"] for h in first["hospitals"] if h["status"] == "trained") == list(
        HOSPITALS
    )
    for round_record in (first, second, third):
        assert round_record["aggregated"]
        for trained in (h for h in round_record["hospitals"] if h["status"] == "trained"):
            assert trained["received"] == expected
            # No site consented to share its test counts (the default): none reached the
            # coordinator.
            assert trained["accuracy"] is None and trained["test_examples"] == 0
            assert (
                trained["reason"]
                == "evaluation counts withheld by the site's terms; the details are in the site's "
                "own log"
            )
            assert "train_loss" not in trained  # computed without noise: it stays at the site
            assert SPEC.num_bytes() <= trained["bytes_up"] < SPEC.num_bytes() + 3 * 200
            # the global state for training and evaluation
            assert trained["bytes_down"] >= 2 * SPEC.num_bytes()
            folder = deployment.out / "updates" / f"round_{round_record['round']:03d}"
            update = load_file(str(folder / f"{trained['name']}.safetensors"))
            assert {name: list(a.shape) for name, a in update.items()} == {
                n: e["shape"] for n, e in expected.items()
            }
    assert sorted(p.name for p in (deployment.out / "checkpoints").iterdir()) == [
        "round_001",
        "round_002",
        "round_003",
    ]
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
        assert 0 < last["epsilon"] <= STRICTER_EPSILON


@pytest.mark.slow
def test_a_killed_site_rejoins_with_its_epsilon_where_it_was(deployment: Deployment) -> None:
    first, second, third = read_json(deployment.out / "results.json")["rounds"]
    assert sorted(h["name"] for h in second["hospitals"] if h["status"] == "trained") == [
        "h1",
        "h2",
    ]
    assert second["aggregated"]  # min-hospitals = 2: the run went on without h3
    # the same registered key, the same node
    assert deployment.rejoined_node_id == deployment.node_ids[KILLED]
    per_round = {name: hospital(first, name)["steps"] for name in HOSPITALS}
    before = deployment.ledger_after_run_a[KILLED]
    assert before["steps"] == per_round[KILLED]  # killed before it trained round 2
    rejoined = hospital(third, KILLED)
    # continued from its ledger, not reset
    assert rejoined["steps"] == before["steps"] + per_round[KILLED]
    assert rejoined["epsilon"] > before["epsilon_spent"] > 0
    for name in ("h1", "h2"):
        steps = [hospital(r, name)["steps"] for r in (first, second, third)]
        assert steps == [per_round[name], 2 * per_round[name], 3 * per_round[name]]


def test_certificates_name_the_superlink_and_keys_are_never_replaced(tmp_path: Path) -> None:
    first = make_server_certificates(tmp_path / "certs", ["127.0.0.1", "superlink.example"])
    ca = first.ca_cert.read_bytes()
    # a key SuperNodes may have pinned is never replaced silently
    with pytest.raises(ConfigError, match="pass --rotate"):
        make_server_certificates(tmp_path / "certs", ["10.0.0.5"])
    # a new host keeps the consortium CA
    again = make_server_certificates(tmp_path / "certs", ["10.0.0.5"], rotate=True)
    assert again.ca_cert.read_bytes() == ca
    names = x509.load_pem_x509_certificate(
        again.server_cert.read_bytes()
    ).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert [str(ip) for ip in names.value.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert oct(first.ca_key.stat().st_mode & 0o777) == "0o600"
    keys = make_node_keys(tmp_path / "keys", "h1")
    assert load_ssh_public_key(keys.public_key.read_bytes()).curve.name == "secp384r1"
    with pytest.raises(ConfigError, match="not replaced"):
        make_node_keys(tmp_path / "keys", "h1")


SITE = {
    "hospital": "h1",
    "data-path": "/srv/notes.csv",
    "ledger-path": "/srv/ledger.json",
    "text-column": "note",
    "label-column": "specialty",
}


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({**SITE, "data-path": "notes.csv"}, "must be absolute"),
        ({**SITE, "hospital": "../h1"}, "hospital '../h1': use 1-64"),
        (
            {"hospital": "h1", "data-path": "/srv/notes.csv"},
            r"lacks \['ledger-path', 'text-column', 'label-column'\]",
        ),
        # never ignored
        ({**SITE, "maxepsilon": 8.0}, r"node config key\(s\) \['maxepsilon'\] are not MedTune's"),
        ({**SITE, "max-epsilon": 0}, "node config max-epsilon: epsilon 0 must be positive"),
        (
            {**SITE, "max-epsilon": 8.0, "max-delta": 1.5},
            "node config max-delta: 1.5 must be a number strictly between",
        ),
    ],
)
def test_a_site_with_an_unusable_node_config_is_refused_by_name(
    node_config: dict, message: str
) -> None:
    context = Context(
        run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_defaults()
    )
    with pytest.raises(ConfigError, match=message):
        site_for(context)


@pytest.mark.parametrize(
    ("max_epsilon", "asked", "refusal"),
    [
        (None, 8.0, "this site has set no max-epsilon, so it trains for no run"),
        (
            8.0,
            "inf",
            "the run config asks for epsilon=inf \\(no DP\\); this site's max-epsilon is 8, and "
            'training without DP needs max-epsilon = "inf"',
        ),
        (8.0, 8.5, "the run config asks for epsilon=8.5, above this site's max-epsilon 8"),
    ],
)
def test_a_run_above_the_sites_privacy_terms_is_refused_before_its_records_are_read(
    max_epsilon: float | None, asked: object, refusal: str, tmp_path: Path
) -> None:
    # absent: reading it would be a DataError
    node_config = {**SITE, "data-path": str(tmp_path / "never-read.csv")}
    if max_epsilon is not None:
        node_config["max-epsilon"] = max_epsilon
    context = Context(
        run_id=1,
        node_id=1,
        node_config=node_config,
        state=RecordDict(),
        run_config={**run_defaults(), "epsilon": asked},
    )
    with pytest.raises(PrivacyTermsError, match=refusal):
        site_for(context)
    assert (
        failure_reason(PrivacyTermsError(refusal))
        == "privacy terms refused; the details are in the site's own log"
    )


# None: the key left out, whose default keeps them at the site
@pytest.mark.parametrize("share", [None, False])
def test_a_site_that_withholds_its_evaluation_counts_sends_a_category_only(
    share: bool | None,
) -> None:
    node_config = {
        **SITE,
        "max-epsilon": 8.0,
        **({} if share is None else {"share-evaluation-counts": share}),
    }
    context = Context(
        run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_defaults()
    )
    with pytest.raises(
        EvaluationWithheldError, match="share-evaluation-counts is false"
    ) as refused:
        check_evaluation_shared(context)
    assert (
        failure_reason(refused.value)
        == "evaluation counts withheld by the site's terms; the details are in the site's own log"
    )
    # consent: no refusal
    check_evaluation_shared(
        Context(
            run_id=1,
            node_id=1,
            node_config={**node_config, "share-evaluation-counts": True},
            state=RecordDict(),
            run_config=run_defaults(),
        )
    )
