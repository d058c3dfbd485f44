"""The coordinator's Flower ServerApp: read the run config, run the federation."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from medtune.logs import quiet_libraries
from medtune.run_config import settings_from_run_config
from server.federation import run_federation

quiet_libraries()
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, settings_from_run_config(dict(context.run_config)))
