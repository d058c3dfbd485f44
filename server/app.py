"""The coordinator's Flower ServerApp: read the run config, run the federation.

A MedTuneError (no hospital ever trained, a damaged checkpoint, a bad setting) leaves `main` as it
is: Flower then ends the run as failed (`flwr ls`: finished:failed, the message as its details;
exit code 201) and logs it as one line, `ServerApp raised an exception: <message>`, without the
traceback (quiet_libraries, medtune/logs.py). `medtune simulate` prints the same error as its one
`error:` line.
"""

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
