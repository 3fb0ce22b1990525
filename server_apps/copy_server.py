"""ServerApp: ``flwr run .`` starts here; the strategy is picked by run config ``strategy``."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from clair_flower.server_apps.runner import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by the run config and write its results."""
    run_federation(grid, context.run_config)
