"""The real ServerApp and ClientApp, end to end through the in-process Grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp

from clair_flower.client_apps import copy_client
from clair_flower.server_apps.run_config import ConfigError, RunConfig
from clair_flower.server_apps.runner import initial_adapter
from clair_flower.strategies.records import from_arrayrecord, to_arrayrecord
from tests.apps.helpers import run_inprocess


def _context(pid: int = 0, n: int = 4, **run_config: object) -> Context:
    return Context(run_id=1, node_id=pid + 1, node_config={"partition-id": pid, "num-partitions": n},
                   state=RecordDict(), run_config=dict(run_config))


def _train_message(arrays: dict | None) -> Message:
    content = RecordDict({"config": ConfigRecord({"server-round": 1})})
    if arrays is not None:
        content["arrays"] = to_arrayrecord(arrays)
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN, group_id="1")


def test_same_seed_same_metrics(tmp_path) -> None:
    a = run_inprocess(tmp_path / "a", 4, strategy="fedavg", seed=3)
    b = run_inprocess(tmp_path / "b", 4, strategy="fedavg", seed=3)
    assert [r["benign-token-acc"] for r in a["rounds"]] == [r["benign-token-acc"] for r in b["rounds"]]
    ra = [json.loads(x)["clients"] for x in (tmp_path / "a" / "rounds.jsonl").read_text().splitlines()]
    rb = [json.loads(x)["clients"] for x in (tmp_path / "b" / "rounds.jsonl").read_text().splitlines()]
    assert ra == rb


def test_results_land_in_output_dir(tmp_path) -> None:
    summary = run_inprocess(tmp_path, 3, strategy="local")
    for name in ("rounds.jsonl", "summary.json", "summary.md", "benign_accuracy.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert summary["num-rounds"] == 2
    assert json.loads((tmp_path / "summary.json").read_text())["strategy"] == "local"


def test_train_without_arrays_gets_error_reply(task_identity) -> None:
    reply = copy_client.train(_train_message(None), _context())
    assert reply.has_error()
    assert "ArrayRecord 'arrays'" in reply.error.reason


def test_train_with_wrong_shape_names_the_key(task_identity) -> None:
    arrays = initial_adapter(RunConfig())
    key = sorted(k for k in arrays if k.endswith("lora_A.weight"))[0]
    arrays[key] = np.zeros((arrays[key].shape[0] + 1, arrays[key].shape[1]), np.float32)
    reply = copy_client.train(_train_message(arrays), _context())
    assert reply.has_error()
    assert key in reply.error.reason and "shape" in reply.error.reason


def test_train_reply_follows_flowertune_convention(task_identity) -> None:
    arrays = initial_adapter(RunConfig())
    reply = copy_client.train(_train_message(arrays), _context(**{"local-steps": 2}))
    assert not reply.has_error()
    sent = from_arrayrecord(reply.content["arrays"])
    assert set(sent) == set(arrays)
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] > 0 and metrics["partition-id"] == 0 and "train-loss" in metrics


def _corrupting_app(bad_partition: int, corrupt) -> ClientApp:  # noqa: ANN001
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = copy_client.train(msg, context)
        if context.node_config["partition-id"] == bad_partition:
            reply.content["arrays"] = to_arrayrecord(corrupt(from_arrayrecord(reply.content["arrays"])))
        return reply

    app.evaluate()(copy_client.evaluate_adapter)
    return app


def _with_nan(state: dict) -> dict:
    key = sorted(state)[0]
    state[key] = state[key].copy()
    state[key][0, 0] = np.nan
    return state


@pytest.mark.parametrize("strategy", ["fedavg", "local"])
def test_bad_client_does_not_take_the_round_down(tmp_path, strategy: str) -> None:
    summary = run_inprocess(tmp_path, 4, client_app=_corrupting_app(2, _with_nan), strategy=strategy)
    rounds = [json.loads(x) for x in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert len(rounds) == 2
    for r in rounds:
        assert "NaN" in r["rejected"]["2"]
        assert r["num-replies"] == 4 and r["train-metrics"]["num-accepted"] == 3
    assert summary["final-benign-token-acc"] is not None


def test_config_errors_are_readable() -> None:
    with pytest.raises(ConfigError, match="did you mean 'lora-rank'"):
        RunConfig.from_mapping({"lora-rnak": 4})
    with pytest.raises(ConfigError, match="lora-rank must be an integer"):
        RunConfig.from_mapping({"lora-rank": "four"})
    with pytest.raises(ConfigError, match="strategy must be one of"):
        RunConfig.from_mapping({"strategy": "fedavgg"})
    with pytest.raises(ConfigError, match="absolute"):
        RunConfig.from_mapping({"output-dir": "relative/dir"})
