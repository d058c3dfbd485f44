"""A hospital's site file: everything `medtune site run` needs, in one small TOML file at the site.

```toml
hospital = "h1"
superlink = "superlink.consortium.example:9093"
root-certificates = "/srv/medtune/ca.crt"      # the consortium CA certificate
auth-key = "/srv/medtune/keys/h1"              # this SuperNode's private key
                                               # (never leaves the site)
data-path = "/srv/medtune/data/notes.csv"
text-column = "note"                           # the only columns MedTune reads
                                               # (never the coordinator's choice)
label-column = "specialty"
ledger-path = "/srv/medtune/ledger.json"
cache-dir = "/srv/medtune/features"            # optional (default: features/ beside the ledger)
max-epsilon = 8.0                              # required: this site's ceiling for every run
                                               # ("inf": consents to no DP)
max-delta = 1e-5                               # optional (default 1e-5)
share-evaluation-counts = false                # optional: report per-class test counts
                                               # (outside epsilon; default false)
secure-aggregation = false                     # optional: send the prompt and head only masked
                                               # by SecAgg+ (default false)
approved-fabs = []                             # optional: SHA-256 of FABs the site's IT reviewed
                                               # and approved
runtime-port = 9094                            # optional: the SuperNode's local Runtime API port
                                               # (loopback only)
flower-home = "/srv/medtune/flwr"              # optional: the SuperNode's Flower folder (FLWR_HOME)
```

Every key is checked here, once, before anything starts; an error names the file and the key.
The keys the ClientApp needs (hospital, files, columns, privacy terms) reach it as the
SuperNode's node config (client/node_config.py), which is the site's, never the coordinator's.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from medtune.errors import ConfigError
from medtune.site_terms import TERMS_KEYS, SiteTerms
from medtune.state import check_hospital_name

NODE_CONFIG_KEYS = (
    "hospital",
    "data-path",
    "ledger-path",
    "text-column",
    "label-column",
    "cache-dir",
    *TERMS_KEYS,
)
SITE_ONLY_KEYS = (
    "superlink",
    "root-certificates",
    "auth-key",
    "approved-fabs",
    "runtime-port",
    "flower-home",
)
REQUIRED_KEYS = (
    "hospital",
    "superlink",
    "root-certificates",
    "auth-key",
    "data-path",
    "text-column",
    "label-column",
    "ledger-path",
    "max-epsilon",
)
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_RUNTIME_PORT = 9094


@dataclass(frozen=True)
class SiteFile:
    """A checked site file: the node config for the ClientApp, and the SuperNode's own settings."""

    path: Path
    node_config: dict[str, Any]
    superlink: str
    root_certificates: Path
    auth_key: Path
    approved_fabs: frozenset[str]
    runtime_port: int
    flower_home: Path | None
    terms: SiteTerms

    @property
    def hospital(self) -> str:
        return str(self.node_config["hospital"])

    @property
    def ledger_path(self) -> Path:
        return Path(self.node_config["ledger-path"])

    @property
    def refused_fabs_dir(self) -> Path:
        """Where refused FABs are kept for the site's IT to review (beside the ledger, never
        sent)."""
        return self.ledger_path.parent / "refused-fabs"

    def node_config_text(self) -> str:
        """The node config as `flower-supernode --node-config` takes it (TOML values,
        space-separated)."""
        return " ".join(f"{key}={_toml_value(value)}" for key, value in self.node_config.items())


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value == float("inf"):
        return '"inf"'
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def read_site_file(path: Path) -> SiteFile:
    """Read and check a site file; every problem is one ConfigError naming the file and key."""
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: site file not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"{path}: not a readable TOML site file ({error})") from None
    unknown = sorted(set(values) - {*NODE_CONFIG_KEYS, *SITE_ONLY_KEYS})
    if unknown:
        raise ConfigError(
            f"{path}: unknown key(s) {unknown}; known keys: {[*NODE_CONFIG_KEYS, *SITE_ONLY_KEYS]}"
        )
    missing = [key for key in REQUIRED_KEYS if key not in values]
    if missing:
        raise ConfigError(
            f"{path}: missing key(s) {missing} (max-epsilon is the site's own privacy ceiling; "
            "text-column and label-column the only columns MedTune may read)"
        )

    def where(key: str) -> str:
        return f"{path} {key}"

    def text(key: str) -> str:
        value = values[key]
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{where(key)}: {value!r} must be a non-empty string")
        return value.strip()

    def file(key: str, check: Callable[[bytes], object] | None = None) -> Path:
        file_path = Path(text(key)).expanduser()
        if not file_path.is_absolute():
            raise ConfigError(f"{where(key)}: {str(file_path)!r} must be an absolute path")
        if check is not None:
            try:
                check(file_path.read_bytes())
            except OSError as error:
                raise ConfigError(
                    f"{where(key)}: cannot read {file_path} ({error.strerror or error})"
                ) from None
            except (ValueError, TypeError) as error:
                raise ConfigError(
                    f"{where(key)}: {file_path} is not what this key needs ({error})"
                ) from None
        return file_path

    hospital = check_hospital_name(text("hospital"), source=where("hospital"))
    superlink = text("superlink")
    match = _ADDRESS.match(superlink)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ConfigError(
            f"{where('superlink')}: {superlink!r} must be HOST:PORT, e.g. superlink.example:9093"
        )
    root_certificates = file("root-certificates", x509.load_pem_x509_certificate)
    auth_key = file("auth-key", lambda data: load_ssh_private_key(data, password=None))
    data_path = file("data-path")
    if not data_path.is_file():
        raise ConfigError(f"{where('data-path')}: {data_path} is not a file")
    ledger_path = file("ledger-path")
    if not ledger_path.parent.is_dir():
        raise ConfigError(f"{where('ledger-path')}: its folder {ledger_path.parent} does not exist")
    node_config: dict[str, Any] = {
        "hospital": hospital,
        "data-path": str(data_path),
        "ledger-path": str(ledger_path),
        "text-column": text("text-column"),
        "label-column": text("label-column"),
    }
    if "cache-dir" in values:
        node_config["cache-dir"] = str(file("cache-dir"))
    terms = SiteTerms.from_values(values, str(path))
    node_config.update({key: values[key] for key in TERMS_KEYS if key in values})
    node_config["max-epsilon"] = terms.max_epsilon

    approved = values.get("approved-fabs", [])
    if not isinstance(approved, list) or not all(
        isinstance(h, str) and _SHA256.match(h.lower()) for h in approved
    ):
        raise ConfigError(
            f"{where('approved-fabs')}: must be a list of FAB SHA-256 hashes (64 hex digits each)"
        )
    port = values.get("runtime-port", DEFAULT_RUNTIME_PORT)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"{where('runtime-port')}: {port!r} must be a port number")
    flower_home = Path(text("flower-home")).expanduser() if "flower-home" in values else None
    return SiteFile(
        path=path,
        node_config=node_config,
        superlink=superlink,
        root_certificates=root_certificates,
        auth_key=auth_key,
        approved_fabs=frozenset(h.lower() for h in approved),
        runtime_port=port,
        flower_home=flower_home,
        terms=terms,
    )
