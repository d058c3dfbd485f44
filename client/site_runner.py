"""`medtune site run`: a hospital's SuperNode that runs only the code the site approved.

It starts `flower-supernode` with the flags a site needs (TLS to the SuperLink, node
authentication, `--isolation process`, no runtime installs, the node config from the site file)
and, in place of Flower's `flwr-clientapp`, claims each task itself
(medtune/federation/site_runtime.py):

- the FAB's Python code equals the installed MedTune's: the installed ClientApp (client/app.py)
  answers, in this process (the backbone and feature cache stay loaded between messages);
- the FAB's hash is in the site's `approved-fabs`: Flower's own runner runs it;
- anything else is refused before any of its code is imported: one line in the site's log, the
  FAB kept under `refused-fabs/` beside the ledger for review, and a `failed` reply with the
  category "code not approved by the site", which the coordinator records like any other failure.
"""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from flwr.app import Context, Message

from client.app import app, failed
from medtune.code_approval import CodePolicy, InstalledCode, fab_hash
from medtune.errors import CodeNotApprovedError, ConfigError
from medtune.files import atomic_write_bytes
from medtune.site_file import SiteFile

log = logging.getLogger("medtune.site")
QUIET_FLOWER = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
PR_SET_PDEATHSIG = 1  # prctl(2), Linux
# the newest refused FABs kept for review; a coordinator cannot fill the site's disk
KEPT_REFUSED_FABS = 20


class SiteAnswer:
    """The site's answer to one message: its installed ClientApp's reply (client.app), or a
    refusal."""

    def __init__(self, site: SiteFile, installed: InstalledCode) -> None:
        self.site, self.installed = site, installed
        self.policy = CodePolicy(site.approved_fabs)

    def __call__(self, message: Message, context: Context, fab: bytes) -> Message:
        try:
            review = self.policy.check(fab, self.installed, source=f"FAB of run {context.run_id}")
        except CodeNotApprovedError as error:
            kept = self.site.refused_fabs_dir / f"{fab_hash(fab)}.fab"
            if not kept.exists():
                atomic_write_bytes(kept, fab)
                by_age = sorted(
                    self.site.refused_fabs_dir.glob("*.fab"), key=lambda path: path.stat().st_mtime
                )
                for old in by_age[:-KEPT_REFUSED_FABS]:
                    old.unlink(missing_ok=True)
            return failed(
                message, context, CodeNotApprovedError(f"{error}; the FAB is kept at {kept}")
            )
        log.debug(review.summary())
        # its handlers turn every failure into a category
        return app(message=message, context=context)


def supernode_command(site: SiteFile, secret_file: Path) -> list[str]:
    """`flower-supernode` as a site runs it: TLS, node authentication, process isolation, no runtime
    installs."""
    return [
        "flower-supernode",
        "--superlink",
        site.superlink,
        "--root-certificates",
        str(site.root_certificates),
        "--auth-supernode-private-key",
        str(site.auth_key),
        "--node-config",
        site.node_config_text(),
        "--isolation",
        "process",
        "--host",
        "127.0.0.1",
        "--port",
        str(site.runtime_port),
        "--superexec-auth-secret-file",
        str(secret_file),
    ]


def _end_with_this_process() -> None:
    """In the SuperNode's process, before exec: SIGTERM it if the site runner dies (even by SIGKILL
    or OOM)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _wait_for_port(port: int, supernode: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if supernode.poll() is not None:
            raise ConfigError(
                f"flower-supernode exited with status {supernode.returncode} before it started"
            )
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise ConfigError(
        f"flower-supernode did not open its Runtime API on 127.0.0.1:{port} within {timeout:.0f} s"
    )


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def run_site(site: SiteFile) -> int:
    """Run the site until SIGINT or SIGTERM, or until its SuperNode exits; returns the exit
    status."""
    from medtune.federation.site_runtime import missing_private_names, serve

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s"
    )
    missing = missing_private_names()
    if missing:
        raise ConfigError(
            f"the installed Flower lacks what `medtune site` runs on: {missing}; install flwr 1.42"
        )
    if not _port_free(site.runtime_port):
        raise ConfigError(
            f"{site.path} runtime-port: 127.0.0.1:{site.runtime_port} is in use; "
            "choose another port"
        )
    installed = InstalledCode.read()
    site.refused_fabs_dir.mkdir(parents=True, exist_ok=True)
    secret_file = site.ledger_path.parent / f".{site.hospital}.superexec-secret"
    # signs task claims: no other local process may take them
    atomic_write_bytes(secret_file, secrets.token_bytes(32))
    os.chmod(secret_file, 0o600)
    os.environ.update(QUIET_FLOWER)
    # shared by the SuperNode and Flower's runner of an approved FAB
    if site.flower_home is not None:
        os.environ["FLWR_HOME"] = str(site.flower_home)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # Its own session: a Ctrl-C reaches this runner, which ends the SuperNode after the current
    # task.
    supernode = subprocess.Popen(
        supernode_command(site, secret_file),
        start_new_session=True,
        preexec_fn=_end_with_this_process if sys.platform == "linux" else None,
    )

    def stop_when_supernode_ends() -> None:
        supernode.wait()
        stop.set()

    threading.Thread(target=stop_when_supernode_ends, daemon=True).start()
    try:
        _wait_for_port(site.runtime_port, supernode, timeout=120)
        approved = f" and {len(site.approved_fabs)} approved FAB(s)" if site.approved_fabs else ""
        print(
            f"site {site.hospital}: SuperNode started (pid {supernode.pid}); running only the "
            f"installed MedTune{approved}",
            file=sys.stderr,
            flush=True,
        )
        answer = SiteAnswer(site, installed)
        serve(
            f"127.0.0.1:{site.runtime_port}",
            secret_file.read_bytes(),
            answer,
            answer.policy.approves_hash,
            stop,
        )
    finally:
        if supernode.poll() is None:
            supernode.terminate()
            try:
                supernode.wait(timeout=15)
            except subprocess.TimeoutExpired:
                supernode.kill()
                supernode.wait()
        secret_file.unlink(missing_ok=True)
    if supernode.returncode in (0, -signal.SIGTERM):
        return 0
    print(
        f"site {site.hospital}: its SuperNode exited with status {supernode.returncode} (its log "
        "is above)",
        file=sys.stderr,
        flush=True,
    )
    return int(supernode.returncode or 1)
