"""Where a hospital's records and privacy ledger come from: simulation or a real site.

Simulation: Flower gives each node `partition-id`; the hospital is that partition of the
scenario's data source and its ledger lives at `<out>/sites/<hospital>/ledger.json`.
Deployment: the SuperNode's node config names the hospital and its files:
`hospital`, `data-path`, `ledger-path`, and optionally `text-column` / `label-column`.
The paths must be absolute: a relative ledger path would follow the working directory of
whichever process runs the ClientApp, so a SuperNode restarted from elsewhere would start a
fresh ledger and reset the hospital's epsilon.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from flwr.app import Context

from medtune.data import read_records, warn_if_thin
from medtune.errors import ConfigError
from medtune.state import check_hospital_name
from medtune.hospitals import simulated_hospital
from medtune.run_config import RunSettings, settings_from_run_config
from medtune.site import Site

PARTITION_ID = "partition-id"
DEPLOYMENT_KEYS = ("hospital", "data-path", "ledger-path")

_sites: dict[str, Site] = {}


def simulated_ledger_path(out: Path, hospital: str) -> Path:
    return out / "sites" / hospital / "ledger.json"


def _deployed_site(settings: RunSettings, node_config: dict[str, Any]) -> Site:
    missing = [key for key in DEPLOYMENT_KEYS if not node_config.get(key)]
    if missing:
        raise ConfigError(
            f"this SuperNode's node config lacks {missing}; start it with "
            "--node-config 'hospital=\"<name>\" data-path=\"<records file>\" ledger-path=\"<ledger.json>\"'"
        )
    hospital = check_hospital_name(str(node_config["hospital"]), source="node config hospital")
    paths = {key: Path(str(node_config[key])).expanduser() for key in ("data-path", "ledger-path")}
    relative = [f"{key}={str(path)!r}" for key, path in paths.items() if not path.is_absolute()]
    if relative:
        raise ConfigError(
            f"hospital {hospital}: node config {', '.join(relative)} must be absolute, so that a SuperNode "
            "restarted from another directory still finds the same records and privacy ledger"
        )
    data = settings.data
    columns = {
        "text_column": str(node_config.get("text-column") or data.text_column),
        "label_column": str(node_config.get("label-column") or data.label_column),
    }
    data = replace(data, **columns)
    records = read_records(paths["data-path"], data)
    # The coordinator's run config never names a path on a site's disk: the cache goes where the
    # node config says, or beside the ledger.
    cache = Path(str(node_config["cache-dir"])).expanduser() if node_config.get("cache-dir") else None
    site = Site(hospital, records, replace(settings, data=data), paths["ledger-path"], cache)
    warn_if_thin(hospital, site.train_set.labels.tolist())
    return site


def site_for(context: Context) -> Site:
    """This node's hospital, built once per process and reused across rounds."""
    run_config, node_config = dict(context.run_config), dict(context.node_config)
    key = json.dumps([run_config, node_config], sort_keys=True, default=str)
    if key not in _sites:
        settings = settings_from_run_config(run_config)
        if PARTITION_ID in node_config:
            hospital = simulated_hospital(settings, int(node_config[PARTITION_ID]))
            ledger = simulated_ledger_path(settings.out, hospital.name)
            _sites[key] = Site(hospital.name, hospital.records, settings, ledger, settings.cache_dir)
        else:
            _sites[key] = _deployed_site(settings, node_config)
    return _sites[key]
