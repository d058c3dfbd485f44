"""Where a hospital's records and privacy ledger come from: simulation or a real site.

Simulation: Flower gives each node `partition-id`; the hospital is that partition of the
scenario's data source and its ledger lives at `<out>/sites/<hospital>/ledger.json`.
Deployment: the SuperNode's node config (written by `medtune site` from the site file) names the
hospital, its files, the columns it lets MedTune read and its privacy terms: `hospital`,
`data-path`, `ledger-path`, `text-column`, `label-column`, optionally `cache-dir`, and the terms
`max-epsilon`, `max-delta`, `share-evaluation-counts`, `secure-aggregation` (medtune/site_terms.py).
Any other key is refused, so a misspelt ceiling is never silently ignored. The terms are checked
against the run config before any record is read. The paths must be absolute: a relative ledger path
would follow the working directory of whichever process runs the ClientApp, so a SuperNode restarted
from elsewhere would start a fresh ledger and reset the hospital's epsilon. A deployed site draws
secret noise (medtune/noise.py); a simulated one draws noise seeded by the run seed.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from flwr.app import Context

from medtune.data import read_records, warn_if_thin
from medtune.errors import ConfigError
from medtune.federation.partitions import simulated_hospital
from medtune.hospitals import simulated_ledger_path
from medtune.noise import NoiseSource
from medtune.run_config import RunSettings, settings_from_run_config
from medtune.site import Site
from medtune.site_terms import TERMS_KEYS, SiteTerms
from medtune.state import check_hospital_name

PARTITION_ID = "partition-id"
# The site names the columns it lets MedTune read: the coordinator's run config never chooses them.
DEPLOYMENT_KEYS = ("hospital", "data-path", "ledger-path", "text-column", "label-column")
OPTIONAL_KEYS = ("cache-dir", *TERMS_KEYS)

_sites: dict[str, Site] = {}


def site_terms(node_config: dict[str, Any]) -> SiteTerms:
    """A deployed node's privacy terms, after refusing any key this reader does not know."""
    unknown = sorted(set(node_config) - {*DEPLOYMENT_KEYS, *OPTIONAL_KEYS})
    if unknown:
        raise ConfigError(
            f"node config key(s) {unknown} are not MedTune's; known keys: "
            f"{[*DEPLOYMENT_KEYS, *OPTIONAL_KEYS]}"
        )
    return SiteTerms.from_values(node_config, "node config")


def _deployed_site(settings: RunSettings, node_config: dict[str, Any]) -> Site:
    missing = [key for key in DEPLOYMENT_KEYS if not node_config.get(key)]
    if missing:
        raise ConfigError(
            f"this SuperNode's node config lacks {missing}; start the site with `medtune site run "
            "<site file>`"
        )
    terms = site_terms(node_config)
    hospital = check_hospital_name(str(node_config["hospital"]), source="node config hospital")
    paths = {key: Path(str(node_config[key])).expanduser() for key in ("data-path", "ledger-path")}
    relative = [f"{key}={str(path)!r}" for key, path in paths.items() if not path.is_absolute()]
    if relative:
        raise ConfigError(
            f"hospital {hospital}: node config {', '.join(relative)} must be absolute, so that a "
            "SuperNode restarted from another directory still finds the same records and privacy "
            "ledger"
        )
    # The site's terms are checked before any record is read: a refused run leaves no trace at the
    # site.
    terms.check(settings.privacy)
    if (
        settings.audit.canaries
    ):  # canaries would bend this site's training to the coordinator's design
        raise ConfigError(
            f"hospital {hospital}: the run config asks for audit canaries (audit-canaries = "
            f"{settings.audit.canaries}); only a simulated hospital plants them (`medtune audit`), "
            "a deployed site never does"
        )
    data = replace(
        settings.data,
        text_column=str(node_config["text-column"]),
        label_column=str(node_config["label-column"]),
    )
    records = read_records(paths["data-path"], data)
    # The coordinator's run config never names a path on a site's disk: the cache goes where the
    # node config says, or beside the ledger.
    cache = (
        Path(str(node_config["cache-dir"])).expanduser() if node_config.get("cache-dir") else None
    )
    site = Site(
        hospital,
        records,
        replace(settings, data=data),
        paths["ledger-path"],
        noise=NoiseSource.secret(hospital),
        cache_dir=cache,
    )
    warn_if_thin(hospital, site.train_set.labels.tolist())
    return site


def deployed_terms(context: Context) -> SiteTerms | None:
    """A deployed site's privacy terms (None for a simulated site, which has none of its own)."""
    node_config = dict(context.node_config)
    return None if PARTITION_ID in node_config else site_terms(node_config)


def check_evaluation_shared(context: Context) -> None:
    """A deployed site whose terms withhold per-class test counts refuses to evaluate (simulated
    sites share them)."""
    terms = deployed_terms(context)
    if terms is not None:
        terms.check_evaluation_shared()


def check_sent_in_clear(context: Context) -> None:
    """A deployed site whose terms require secure aggregation refuses a plain round (simulated sites
    accept it)."""
    terms = deployed_terms(context)
    if terms is not None:
        terms.check_sent_in_clear()


def site_for(context: Context) -> Site:
    """This node's hospital, built once per process and reused across the rounds of one run.

    Only the latest run's site is kept: a long-lived site runner (`medtune site run`) serves run
    after run, and each run config (a new seed, say) builds a site of its own.
    """
    run_config, node_config = dict(context.run_config), dict(context.node_config)
    key = json.dumps([run_config, node_config], sort_keys=True, default=str)
    if key not in _sites:
        _sites.clear()
        settings = settings_from_run_config(run_config)
        if PARTITION_ID in node_config:
            hospital = simulated_hospital(settings, int(node_config[PARTITION_ID]))
            ledger = simulated_ledger_path(settings.out, hospital.name)
            noise = NoiseSource.seeded(settings.seed, hospital.name)
            audited = settings.audit.canaries > 0 and hospital.name == settings.audit.hospital
            _sites[key] = Site(
                hospital.name,
                hospital.records,
                settings,
                ledger,
                noise=noise,
                cache_dir=settings.cache_dir,
                audited=audited,
            )
        else:
            _sites[key] = _deployed_site(settings, node_config)
    return _sites[key]
