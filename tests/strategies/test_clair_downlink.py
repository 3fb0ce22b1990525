"""CLAIR's lossless downlink through real Flower messages: adapter plus merged delta is each
client's refined target, and the copy-task client loads both."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord

from clair_flower.client_apps.copy_client import app as client_app
from clair_flower.lora import LORA_A_SUFFIX, LORA_B_SUFFIX, lora_scaling
from clair_flower.server_apps.inprocess import InProcessGrid, simulation_node_configs
from clair_flower.server_apps.run_config import RunConfig
from clair_flower.server_apps.runner import initial_adapter
from clair_flower.strategies.clair import ClairStrategy
from clair_flower.strategies.protocol import MERGED_DELTA_KEY
from clair_flower.strategies.records import from_arrayrecord, to_arrayrecord

RUN = {"local-steps": 3, "num-train": 8, "num-test": 8}


def _product(state: dict, module: str, scaling: float) -> np.ndarray:
    return scaling * (state[module + LORA_B_SUFFIX].astype(np.float64) @ state[module + LORA_A_SUFFIX])


def test_adapter_plus_merged_delta_is_the_refined_target() -> None:
    strategy = ClairStrategy(lora_alpha=8.0, downlink="merged-delta", rank_probe=False)
    captured: dict = {}
    run, evaluate = strategy.clair.run, strategy.configure_evaluate

    def spy_run(server_round, uploads, as_factors):  # noqa: ANN001, ANN202
        captured["factors"] = {u.node_id: as_factors(u) for u in uploads}
        result, metrics = run(server_round, uploads, as_factors)
        captured["result"] = result
        return result, metrics

    def spy_evaluate(server_round, arrays, config, grid):  # noqa: ANN001, ANN202
        msgs = list(evaluate(server_round, arrays, config, grid))
        captured["sent"] = {m.metadata.dst_node_id: m.content for m in msgs}
        return msgs

    strategy.clair.run, strategy.configure_evaluate = spy_run, spy_evaluate
    grid = InProcessGrid(client_app, simulation_node_configs(5), RUN)
    strategy.start(grid, to_arrayrecord(initial_adapter(RunConfig.from_mapping(RUN))), num_rounds=1,
                   train_config=ConfigRecord(), evaluate_config=ConfigRecord())
    result, factors = captured["result"], captured["factors"]
    assert result is not None and len(captured["sent"]) == 5
    scaling = lora_scaling(8.0, RunConfig().lora_rank)
    members = sorted(result.collaborative_set)
    lost = []
    for nid, content in captured["sent"].items():
        adapter, delta = from_arrayrecord(content["arrays"]), from_arrayrecord(content[MERGED_DELTA_KEY])
        for m, report in result.modules.items():
            mean = sum(factors[l][m].dense().astype(np.float64) for l in members) / len(members)
            U = report.U.astype(np.float64)
            P = U @ U.T
            if result.clients[nid].flagged:
                target = mean
            elif result.diagnostics["trusted_get"] == "mean":
                target = mean
            else:
                target = P @ factors[nid][m].dense() + mean - P @ mean
            refit = _product(adapter, m, scaling)
            got = refit + _product(delta, m, 1.0)
            assert np.linalg.norm(got - target) <= 1e-5 * np.linalg.norm(target), (nid, m)
            lost.append(np.linalg.norm(target - refit) / np.linalg.norm(target))
    assert max(lost) > 0.01  # the refit alone does lose something here: the delta is not empty
    detail = strategy.round_details[1]
    assert detail["refit-norm-loss"] == pytest.approx(max(lost), rel=1e-3)
