"""`medtune site`: one site file, checked up front, gives the SuperNode the flags a hospital
needs."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from medtune.certs import make_node_keys, make_server_certificates
from medtune.cli import main
from medtune.errors import ConfigError
from medtune.federation import site_runtime
from medtune.site_file import read_site_file


@pytest.fixture()
def site(tmp_path: Path) -> dict[str, object]:
    certs = make_server_certificates(tmp_path / "certs", ["127.0.0.1"])
    keys = make_node_keys(tmp_path / "keys", "h1")
    (tmp_path / "notes.csv").write_text("text,label\nchest pain,cardiology\n")
    return {
        "hospital": "h1",
        "superlink": "superlink.example:9093",
        "root-certificates": str(certs.ca_cert),
        "auth-key": str(keys.private_key),
        "data-path": str(tmp_path / "notes.csv"),
        "ledger-path": str(tmp_path / "ledger.json"),
        "max-epsilon": 8.0,
        "text-column": "note",
        "label-column": "label",
    }


def write(tmp_path: Path, values: dict[str, object]) -> Path:
    path = tmp_path / "site.toml"
    path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items()))
    return path


def test_the_site_file_becomes_the_node_config_and_a_supernode_that_trusts_only_the_site(
    site: dict[str, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, {**site, "max-epsilon": "inf", "share-evaluation-counts": False})
    checked = read_site_file(path)
    assert parse_config_args([checked.node_config_text()]) == {
        "hospital": "h1",
        "data-path": site["data-path"],
        "ledger-path": site["ledger-path"],
        "text-column": "note",
        "label-column": "label",
        "max-epsilon": "inf",
        "share-evaluation-counts": False,
    }
    assert main(["site", "check", str(path)]) == 0
    command = shlex.split(capsys.readouterr().out.splitlines()[-1])
    flags = dict(zip(command[1::2], command[2::2]))
    assert (
        command[0] == "flower-supernode"
        and flags["--isolation"] == "process"
        and flags["--host"] == "127.0.0.1"
    )
    assert flags["--root-certificates"] == site["root-certificates"]  # TLS to the SuperLink
    assert flags["--auth-supernode-private-key"] == site["auth-key"]  # node authentication
    assert "--insecure" not in command and "--allow-runtime-dependency-installation" not in command


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max-epsilon": None}, r"missing key\(s\) \['max-epsilon'\]"),
        # the site, not the run, names its columns
        ({"label-column": None}, r"missing key\(s\) \['label-column'\]"),
        ({"max_epsilon": 8.0}, r"unknown key\(s\) \['max_epsilon'\]"),
        ({"max-epsilon": -1}, "site.toml max-epsilon: epsilon -1 must be positive"),
        ({"data-path": "notes.csv"}, "site.toml data-path: 'notes.csv' must be an absolute path"),
        (
            {"superlink": "superlink.example"},
            "site.toml superlink: 'superlink.example' must be HOST:PORT",
        ),
        ({"auth-key": "ROOT_CA"}, "site.toml auth-key: .*ca.crt is not what this key needs"),
        (
            {"approved-fabs": ["abc"]},
            "site.toml approved-fabs: must be a list of FAB SHA-256 hashes",
        ),
        ({"hospital": "../h1"}, "site.toml hospital '../h1': use 1-64 letters"),
        ({"runtime-port": 0}, "site.toml runtime-port: 0 must be a port number"),
    ],
)
def test_every_key_is_checked_before_anything_starts(
    site: dict[str, object], tmp_path: Path, change: dict[str, object], message: str
) -> None:
    values = {
        key: site["root-certificates"] if value == "ROOT_CA" else value
        for key, value in {**site, **change}.items()
    }
    # None: the key is left out
    values = {key: value for key, value in values.items() if value is not None}
    with pytest.raises(ConfigError, match=message):
        read_site_file(write(tmp_path, values))


def test_a_missing_site_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["site", "run", str(tmp_path / "nowhere.toml")]) == 2
    assert re.fullmatch(r"error: .*nowhere\.toml: site file not found\n", capsys.readouterr().err)


def test_the_runner_names_every_private_flower_name_it_relies_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert site_runtime.missing_private_names() == []
    gone = (
        *site_runtime.PRIVATE_NAMES,
        ("flwr.supernode.runtime.run_clientapp", "pull_task_input_v2"),
    )
    monkeypatch.setattr(site_runtime, "PRIVATE_NAMES", gone)
    assert site_runtime.missing_private_names() == [
        "flwr.supernode.runtime.run_clientapp.pull_task_input_v2"
    ]
    monkeypatch.setattr(site_runtime, "PRIVATE_NAMES", site_runtime.PRIVATE_NAMES[:-1])
    monkeypatch.setattr(
        site_runtime, "CLIENT_ARGUMENTS", (*site_runtime.CLIENT_ARGUMENTS, "renamed")
    )
    assert site_runtime.missing_private_names() == [
        "RuntimeHttpClient.from_server_address(renamed=...)"
    ]
