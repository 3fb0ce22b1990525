"""Per-node adapters: dropouts keep their adapter; CLAIR falls back when its solve fails."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord

from clair_flower.client_apps.copy_client import app as client_app
from clair_flower.server_apps.run_config import RunConfig
from clair_flower.server_apps.inprocess import InProcessGrid, simulation_node_configs
from clair_flower.server_apps.runner import initial_adapter
from clair_flower.strategies import clair_aggregator as clair_module
from clair_flower.strategies.clair import ClairStrategy
from clair_flower.strategies.local import LocalOnly
from clair_flower.strategies.records import from_arrayrecord, to_arrayrecord

RUN = {"local-steps": 3}


def _run(strategy, drop=None, rounds: int = 3, nodes: int = 3):  # noqa: ANN001, ANN202
    grid = InProcessGrid(client_app, simulation_node_configs(nodes), RUN, drop=drop)
    sent: dict[int, dict[int, dict]] = {}
    configure = strategy.configure_train

    def spy(server_round, arrays, config, g):  # noqa: ANN001, ANN202
        msgs = list(configure(server_round, arrays, config, g))
        sent[server_round] = {m.metadata.dst_node_id: from_arrayrecord(m.content["arrays"]) for m in msgs}
        return msgs

    strategy.configure_train = spy
    strategy.start(grid, to_arrayrecord(initial_adapter(RunConfig.from_mapping(RUN))), num_rounds=rounds,
                   train_config=ConfigRecord(), evaluate_config=ConfigRecord())
    return sent


def test_dropped_node_gets_its_stored_adapter_back() -> None:
    strategy = LocalOnly(min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2)
    sent = _run(strategy, drop=lambda rnd, node: rnd == 2 and node == 2)
    after_round1 = sent[2][2]  # what node 2 was sent in round 2: its round-1 adapter
    for key, value in after_round1.items():
        np.testing.assert_array_equal(sent[3][2][key], value)  # missed round 2: unchanged


def test_clair_solver_failure_keeps_round_going(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("solver did not converge")

    monkeypatch.setattr(clair_module, "run_clair", broken)
    strategy = ClairStrategy(lora_alpha=8.0)
    sent = _run(strategy, rounds=2)
    assert set(sent[2]) == {1, 2, 3}
    # Fallback: nothing stored, every node is sent the unchanged consensus.
    for key, value in sent[1][1].items():
        np.testing.assert_array_equal(sent[2][3][key], value)
