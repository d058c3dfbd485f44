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
from dataclasses import dataclass, field, replace
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


def site_terms(node_config: dict[str, Any]) -> SiteTerms:
    """A deployed node's privacy terms, after refusing any key this reader does not know."""
    unknown = sorted(set(node_config) - {*DEPLOYMENT_KEYS, *OPTIONAL_KEYS})
    if unknown:
        raise ConfigError(
            f"node config key(s) {unknown} are not MedTune's; known keys: "
            f"{[*DEPLOYMENT_KEYS, *OPTIONAL_KEYS]}"
        )
    return SiteTerms.from_values(node_config, "node config")


def deployed_terms(node_config: dict[str, Any]) -> SiteTerms:
    """A deployed node's privacy terms, once its node config names everything a site needs."""
    missing = [key for key in DEPLOYMENT_KEYS if not node_config.get(key)]
    if missing:
        raise ConfigError(
            f"this SuperNode's node config lacks {missing}; start the site with `medtune site run "
            "<site file>`"
        )
    return site_terms(node_config)


def _deployed_site(
    settings: RunSettings, node_config: dict[str, Any], terms: SiteTerms | None = None
) -> Site:
    """A deployed hospital's site; `terms` are its privacy terms when already read (else read
    here)."""
    terms = terms or deployed_terms(node_config)
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
    # canaries would bend this site's training to the coordinator's design
    if settings.audit.canaries:
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


@dataclass(frozen=True)
class NodeSetup:
    """What this node takes part under: the run's settings, and a deployed site's own privacy terms
    (None for a simulated site, which has none of its own)."""

    settings: RunSettings
    terms: SiteTerms | None


@dataclass
class _LatestRun:
    """What one process has read and built for the run it serves now: the run config, read once,
    and each of its nodes' setup and site (a simulation's worker serves many hospitals of one run).

    A long-lived site runner (`medtune site run`) serves run after run: a new run config (a new
    seed, say) replaces all of it.
    """

    key: str
    settings: RunSettings
    setups: dict[str, NodeSetup] = field(default_factory=dict)
    sites: dict[str, Site] = field(default_factory=dict)


_latest: _LatestRun | None = None


def _run_of(context: Context) -> _LatestRun:
    """This process's reading of `context`'s run, read anew only when the run config changes."""
    global _latest
    run_config = dict(context.run_config)
    key = json.dumps(run_config, sort_keys=True, default=str)
    if _latest is None or key != _latest.key:
        _latest = _LatestRun(key, settings_from_run_config(run_config))
    return _latest


def _node_key(context: Context) -> str:
    return json.dumps(dict(context.node_config), sort_keys=True, default=str)


def node_setup(context: Context) -> NodeSetup:
    """This node's settings and terms: the run config read once per process and run, a deployed
    site's node config once per run."""
    return _setup_in(_run_of(context), _node_key(context), context)


def _setup_in(run: _LatestRun, node: str, context: Context) -> NodeSetup:
    if node not in run.setups:
        node_config = dict(context.node_config)
        terms = None if PARTITION_ID in node_config else deployed_terms(node_config)
        run.setups[node] = NodeSetup(run.settings, terms)
    return run.setups[node]


def check_evaluation_shared(context: Context) -> None:
    """A deployed site whose terms withhold per-class test counts refuses to evaluate (simulated
    sites share them)."""
    terms = node_setup(context).terms
    if terms is not None:
        terms.check_evaluation_shared()


def check_sent_in_clear(context: Context) -> None:
    """A deployed site whose terms require secure aggregation refuses a plain round (simulated sites
    accept it)."""
    terms = node_setup(context).terms
    if terms is not None:
        terms.check_sent_in_clear()


def site_for(context: Context) -> Site:
    """This node's hospital, built once per process and reused across the rounds of one run (a
    site that could not be built is tried again on the next message)."""
    run, key = _run_of(context), _node_key(context)
    setup, sites = _setup_in(run, key, context), run.sites
    if key not in sites:
        settings, node_config = setup.settings, dict(context.node_config)
        if setup.terms is not None:
            sites[key] = _deployed_site(settings, node_config, setup.terms)
        else:
            hospital = simulated_hospital(settings, int(node_config[PARTITION_ID]))
            ledger = simulated_ledger_path(settings.out, hospital.name)
            noise = NoiseSource.seeded(settings.seed, hospital.name)
            audited = settings.audit.canaries > 0 and hospital.name == settings.audit.hospital
            sites[key] = Site(
                hospital.name,
                hospital.records,
                settings,
                ledger,
                noise=noise,
                cache_dir=settings.cache_dir,
                audited=audited,
            )
    return sites[key]
