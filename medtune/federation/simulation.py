"""`medtune simulate`: the same federation `flwr run .` starts, on Flower's Simulation Engine,
in-process.

It takes the settings its command read once (medtune.run_config.run_settings: the defaults, then
the scenario, then overrides, fused as Flower fuses them) and hands an app directory to Flower's
simulation runtime, which loads `server.app:app` and `client.app:app` named in its pyproject.toml
and gives every simulated SuperNode its `partition-id`. That pyproject.toml is written from the
installed package (flower_app_dir), so a wheel without the source tree simulates as a checkout
does. Nothing is installed, nothing is
downloaded, and no SuperLink is left running afterwards: the whole federation lives and ends
inside this process (Ray workers included).

Flower offers no public in-process entry point that takes a run config, so the one call into
Flower's private simulation runtime lives in medtune/federation/flower_engine.py, with a test
that fails loudly when a Flower release changes it.
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medtune.checkpoint import check_resume_location
from medtune.defaults import defaults_text
from medtune.errors import ConfigError, MedTuneError
from medtune.federation.flower_engine import run_in_process
from medtune.federation.partitions import check_hospitals
from medtune.federation.results import RESULTS_FILE
from medtune.locks import exclusive
from medtune.run_config import RunSettings
from medtune.stopping import stop_on_signals

# The ServerApp and the ClientApp, as [tool.flwr.app.components] of pyproject.toml names them for
# `flwr run .` (tests/test_packaging.py checks that the two agree).
COMPONENTS = {"serverapp": "server.app:app", "clientapp": "client.app:app"}
# Flower's runtime requires each of these fields, but in process it installs no FAB: it reads only
# the components and the config table (each simulated hospital's run config is this run's, fused
# onto that table).
_APP_MANIFEST = """\
# Written by `medtune simulate` (medtune/federation/simulation.py) for Flower's in-process runtime.
[project]
name = "medtune"
version = "0"

[tool.flwr.app]
publisher = "medtune"

[tool.flwr.app.components]
serverapp = "{serverapp}"
clientapp = "{clientapp}"

[tool.flwr.app.config]
{config}"""


def simulation_backend(
    num_cpus_per_hospital: float, num_gpus_per_hospital: float = 0.0
) -> dict[str, Any]:
    """Ray resources per simulated hospital; torch inside each worker uses that many threads.

    A GPU share (`gpus-per-hospital`, e.g. 0.5 = two hospitals per GPU) makes Ray run no more
    hospitals at once than the GPUs hold; with 0 every worker still sees the GPUs (training takes
    one when present), but Ray does not limit how many share it.
    """
    return {
        "client_resources": {"num_cpus": num_cpus_per_hospital, "num_gpus": num_gpus_per_hospital},
        "init_args": {
            "include_dashboard": False,
            "logging_level": logging.ERROR,
            "log_to_driver": True,
        },
    }


def simulate(settings: RunSettings, cpus_per_hospital: float = 1.0) -> Path:
    """Run a federation to completion from settings read once (`run_settings`); returns the path
    of results.json."""
    if cpus_per_hospital <= 0:
        raise ConfigError(
            "cpus-per-hospital must be positive (Ray CPUs per simulated hospital), got "
            f"{cpus_per_hospital}"
        )
    check_machine(settings)
    check_hospitals(settings)
    check_out_directory(settings)
    settings.out.mkdir(parents=True, exist_ok=True)
    afterwards = (
        f"the rounds recorded before it are in {settings.out}; continue with `medtune simulate "
        f"--resume {settings.out}` and the same --run-config"
    )
    with exclusive(settings.out, "this run's out directory"), stop_on_signals(afterwards):
        _simulate(settings, cpus_per_hospital)
    results = settings.out / RESULTS_FILE
    if not results.is_file():
        raise MedTuneError(f"the simulation ended without writing {results}; see the log above")
    return results


def _simulate(settings: RunSettings, cpus_per_hospital: float) -> None:
    """Flower's simulation runtime over this run's settings, its errors surfaced as MedTune's."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ["OMP_NUM_THREADS"] = str(max(1, int(cpus_per_hospital)))
    # Flower loads the ServerApp and the ClientApp in two threads at once. Importing both here
    # first, in one thread, keeps the libraries they pull in (Opacus imports torch.distributed
    # lazily) from being half-imported by two threads at once, which failed a resume as "cannot
    # import name '_CUSTOM_SHARDED_OPS'" (found by tests/hostile_catalogue.py).
    for reference in COMPONENTS.values():
        importlib.import_module(reference.split(":")[0])
    try:
        with flower_app_dir() as app_dir:
            run_in_process(
                settings.run_config,
                hospitals=settings.source.hospitals,
                server_app=COMPONENTS["serverapp"],
                client_app=COMPONENTS["clientapp"],
                backend_config=simulation_backend(cpus_per_hospital, settings.gpus_per_hospital),
                app_dir=app_dir,
            )
    except MedTuneError:
        raise
    except RuntimeError as error:
        cause = error.__cause__
        if isinstance(cause, MedTuneError):
            raise cause from None
        raise


def check_out_directory(settings: RunSettings) -> None:
    """A run never overwrites another's history: an existing run is continued with --resume, or
    moved aside."""
    out = settings.out
    if settings.resume is not None:
        check_resume_location(out, settings.resume)
        return
    earlier = [
        path for path in (out / RESULTS_FILE, out / "checkpoints", out / "sites") if path.exists()
    ]
    if earlier:
        raise ConfigError(
            f"{out} already holds a run ({earlier[0].name}); continue it with --resume {out}, or "
            "give another --out (or move that directory aside) to start a new one"
        )


def check_machine(settings: RunSettings) -> None:
    """A GPU share needs a GPU: checked before Flower starts a worker, since Ray would wait for
    ever for a GPU it cannot place a hospital on."""
    if settings.gpus_per_hospital > 0:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"gpus-per-hospital = {settings.gpus_per_hospital:g}, but this machine has no CUDA "
                "GPU; use 0"
            )


@contextmanager
def flower_app_dir() -> Iterator[Path]:
    """A Flower app directory for this run: a pyproject.toml written from the installed MedTune.

    Flower's runtime reads `<app dir>/pyproject.toml`, which an installed wheel does not have; the
    one written here holds the shipped defaults (medtune/run_defaults.toml) and COMPONENTS, from a
    source checkout and from a wheel alike. It is removed when the run ends.
    """
    manifest = _APP_MANIFEST.format(config=defaults_text(), **COMPONENTS)
    with tempfile.TemporaryDirectory(prefix="medtune-app-") as folder:
        (Path(folder) / "pyproject.toml").write_text(manifest, encoding="utf-8")
        yield Path(folder)
