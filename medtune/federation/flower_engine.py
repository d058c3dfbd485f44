"""The one place MedTune calls Flower's private simulation runtime (tested with flwr 1.41 and 1.42).

`flwr run .` starts a simulation in a separate process through a SuperLink; `medtune simulate`
runs the same federation in its own process (signals, exit codes and one-line errors stay
MedTune's). Flower has no public in-process entry point that takes a run config
(`flwr.simulation.run_simulation` takes no run config and no app directory), so this calls
`_run_simulation`, the function `flwr run`'s simulation process calls, with the run identity
that process would build. Every private name it uses is listed in PRIVATE_NAMES and checked by
tests/test_federation.py against the installed Flower (medtune/federation/private_api.py): a release
that moves or renames one fails that test, not a user's run.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from pathlib import Path
from typing import Any

from medtune.federation.private_api import missing_arguments, missing_names

# (module, attribute path) of every private Flower name used below, down to the fields it sets.
PRIVATE_NAMES = (
    ("flwr.simulation.run_simulation", "_run_simulation"),
    ("flwr.common.constant", "RUN_ID_NUM_BYTES"),
    ("flwr.common.constant", "TASK_ID_NUM_BYTES"),
    ("flwr.common.constant", "SUPERLINK_NODE_ID"),
    ("flwr.server.superlink.linkstate.utils", "generate_rand_int_from_bytes"),
    ("flwr.supercore.constant", "NOOP_FEDERATION_ID"),
    ("flwr.supercore.run", "Run.create_empty"),
    ("flwr.supercore.task_identity", "TaskIdentity.task_id"),
    ("flwr.supercore.task_identity", "TaskIdentity.run_id"),
    ("flwr.supercore.task_identity", "TaskIdentity.node_id"),
    ("flwr.supercore.telemetry", "EventType.PYTHON_API_RUN_SIMULATION_LEAVE"),
)
RUN_FIELDS = ("primary_task_id", "override_config", "federation_id")  # set on Flower's Run below
# The keyword arguments this module passes to `_run_simulation`.
RUN_SIMULATION_ARGUMENTS = (
    "num_supernodes",
    "exit_event",
    "server_app_attr",
    "client_app_attr",
    "backend_name",
    "backend_config",
    "server_app_context",
    "app_dir",
    "run",
    "is_app",
)


def missing_private_names() -> list[str]:
    """Private Flower names this adapter needs that the installed Flower lacks (empty:
    compatible)."""
    missing = missing_names(PRIVATE_NAMES)
    if not missing:
        from flwr.simulation.run_simulation import _run_simulation
        from flwr.supercore.run import Run

        missing += missing_arguments(_run_simulation, "_run_simulation", RUN_SIMULATION_ARGUMENTS)
        fields = {field.name for field in dataclasses.fields(Run)}
        missing += [f"flwr.supercore.run.Run.{name}" for name in RUN_FIELDS if name not in fields]
    return missing


def run_in_process(
    run_config: dict[str, Any],
    hospitals: int,
    server_app: str,
    client_app: str,
    backend_config: dict[str, Any],
    app_dir: Path,
) -> None:
    """One federation on the Ray backend, `hospitals` SuperNodes, in this process; returns when it
    ends."""
    from flwr.app import Context, RecordDict
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.override_config = run_config
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = (
        1,
        run.run_id,
        SUPERLINK_NODE_ID,
    )
    context = Context(
        run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    start_ray(backend_config)
    _run_simulation(
        num_supernodes=hospitals,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        server_app_attr=server_app,
        client_app_attr=client_app,
        backend_name="ray",
        backend_config=backend_config,
        server_app_context=context,
        app_dir=str(app_dir),
        run=run,
        is_app=True,
    )


def start_ray(backend_config: dict[str, Any]) -> None:
    """Start Ray as Flower's RayBackend.init_ray would, before Flower does, and keep MedTune's stop
    handler.

    `ray.init` replaces the process's SIGTERM handler with `sys.exit`. Called by Flower, that would
    unwind a SIGTERM through Flower's clean-up, whose `ray.shutdown()` under threads still waiting
    in `ray.get` aborted the process (status -6, measured). Flower starts Ray only if it is not
    running (checked by tests/test_federation.py), so starting it here, with the same arguments,
    lets the stop handler be put back (medtune/stopping.py) before the federation starts.
    """
    import ray

    from medtune.federation.helper_processes import ray_helpers_marked
    from medtune.stopping import reclaim_signals, stop_now

    if not ray.is_initialized():
        init_args = {"include_dashboard": False, **backend_config.get("init_args", {})}
        # As Flower does: Ray's workers inherit the environment, not this process's sys.path.
        pythonpath = os.pathsep.join(sys.path)
        if os.environ.get("PYTHONPATH"):
            pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
        os.environ["PYTHONPATH"] = pythonpath
        try:
            with ray_helpers_marked():  # Ray's processes end with this one (helper_processes.py)
                ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)
        except SystemExit as ended:
            # Ray's own handler took a SIGTERM while Ray was starting
            if ended.code == signal.SIGTERM:
                stop_now(signal.SIGTERM)
            raise
    reclaim_signals()
