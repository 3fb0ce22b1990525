"""Small in-process federations for the app tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.clientapp import ClientApp

from clair_flower.client_apps.copy_client import app as copy_client_app
from clair_flower.server_apps.inprocess import InProcessGrid, simulation_node_configs
from clair_flower.server_apps.runner import run_federation

FAST = {"num-server-rounds": 2, "local-steps": 5}


def run_inprocess(out: Path, num_nodes: int, client_app: ClientApp = copy_client_app, **config: Any) -> dict:
    """Run the real ServerApp logic over ``num_nodes`` in-process ClientApps."""
    run_config = {**FAST, **config, "output-dir": str(out)}
    grid = InProcessGrid(client_app, simulation_node_configs(num_nodes), run_config)
    return run_federation(grid, run_config)
