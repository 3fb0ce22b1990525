"""Checkpoint and resume through the real apps on the in-process Grid.

A run of 4 rounds must equal a run of ``k`` rounds followed by a resumed run up to round 4,
metric for metric. The resumed half gets new node ids (as Ray and deployment assign), so
per-node state must travel by partition id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp

from clair_flower.server_apps.checkpoint_format import CheckpointError, latest_checkpoint
from clair_flower.server_apps.run_config import ConfigError, RunConfig
from clair_flower.client_apps import copy_client
from clair_flower.client_apps.copy_client import app as copy_client_app
from clair_flower.server_apps.checkpointing import query_partitions
from clair_flower.server_apps.inprocess import InProcessGrid, simulation_node_configs
from clair_flower.server_apps.runner import run_federation

TINY = {"local-steps": 2, "num-train": 16, "num-test": 16, "batch-size": 8,
        "attack": "random", "attack-fraction": 0.25}
NODES = 4
NEW_IDS = [7_000_000_001 + 13 * i for i in range(NODES)]  # a new run, new (64-bit) node ids
# Differ between runs by nature: wall-clock times, and node ids (compared as partitions).
VOLATILE = ("seconds", "node-ids")


def _run(out: Path, strategy: str, rounds: int, *, resume: bool = False, node_ids: list[int] | None = None,
         client_app: Any = copy_client_app, **extra: Any) -> dict:  # noqa: ANN401
    run_config = {**TINY, "strategy": strategy, "num-server-rounds": rounds, "output-dir": str(out),
                  "resume": resume, **extra}
    grid = InProcessGrid(client_app, simulation_node_configs(NODES), run_config, node_ids=node_ids)
    return run_federation(grid, run_config)


def _rounds(out: Path) -> list[dict]:
    return [_stable(json.loads(line)) for line in (out / "rounds.jsonl").read_text().splitlines()]


def _stable(value: object) -> object:
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if not any(s in k for s in VOLATILE)}
    return value


@pytest.mark.parametrize(("strategy", "split"), [
    ("fedavg", 2), ("clair", 2), ("rolora", 2),
    ("rolora", 1),        # odd split: the phase counter, not the round number, picks A
    ("clair-rolora", 1),  # refined factors and flag history per partition
    ("local", 2),
])
def test_resumed_run_equals_uninterrupted_run(tmp_path: Path, strategy: str, split: int) -> None:
    _run(tmp_path / "full", strategy, 4)
    _run(tmp_path / "split", strategy, split)
    summary = _run(tmp_path / "split", strategy, 4, resume=True, node_ids=NEW_IDS)
    full, resumed = _rounds(tmp_path / "full"), _rounds(tmp_path / "split")
    assert [r["round"] for r in resumed] == [1, 2, 3, 4]
    assert resumed == full
    assert summary["num-rounds"] == 4 and summary["resumed-after-round"] == split
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3, 4]


def test_checkpoint_keys_state_by_partition(tmp_path: Path) -> None:
    _run(tmp_path, "clair-rolora", 1)
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    assert ckpt is not None and ckpt.round == 1 and ckpt.strategy == "clair-rolora"
    assert ckpt.state.meta["completed-aggregations"] == 1
    assert set(ckpt.state.per_client_meta["flag-history"]) == set(range(NODES))  # partitions, not node ids
    assert set(ckpt.state.per_client["refined"]) <= set(range(NODES))
    assert ckpt.config["strategy"] == "clair-rolora" and ckpt.info["num-nodes"] == NODES


class _Interrupt(BaseException):
    """Stands for a Ctrl-C or a killed process: not an error reply, it ends the ServerApp."""


def _crashing_app(at_round: int) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if int(msg.content.config_records["config"]["server-round"]) == at_round:  # type: ignore[arg-type]
            raise _Interrupt
        return copy_client.train(msg, context)

    app.evaluate()(copy_client.evaluate_adapter)
    app.query()(copy_client.identify)
    return app


def test_interrupted_run_resumes_where_it_stopped(tmp_path: Path) -> None:
    _run(tmp_path / "full", "clair", 4)
    with pytest.raises(_Interrupt):
        _run(tmp_path / "crash", "clair", 4, client_app=_crashing_app(3))
    assert [json.loads(x)["round"] for x in (tmp_path / "crash" / "rounds.jsonl").read_text().splitlines()] == [1, 2]
    _run(tmp_path / "crash", "clair", 4, resume=True, node_ids=NEW_IDS)
    assert _rounds(tmp_path / "crash") == _rounds(tmp_path / "full")


def test_resume_without_checkpoint_starts_afresh(tmp_path: Path) -> None:
    summary = _run(tmp_path, "fedavg", 1, resume=True)
    assert summary["num-rounds"] == 1 and "resumed-after-round" not in summary
    assert latest_checkpoint(tmp_path / "checkpoints").round == 1


def test_resume_when_every_round_is_done_only_rewrites_the_summary(tmp_path: Path) -> None:
    _run(tmp_path, "fedavg", 1)
    before = _rounds(tmp_path)
    summary = _run(tmp_path, "fedavg", 1, resume=True)
    assert _rounds(tmp_path) == before and summary["num-rounds"] == 1


def test_fresh_run_drops_old_checkpoints(tmp_path: Path) -> None:
    _run(tmp_path, "fedavg", 2)
    _run(tmp_path, "fedavg", 1)
    assert latest_checkpoint(tmp_path / "checkpoints").round == 1


@pytest.mark.parametrize(("strategy", "rounds", "extra", "message"), [
    ("rolora", 3, {}, "written by strategy 'fedavg', this run uses 'rolora'"),
    ("fedavg", 3, {"lora-rank": 8}, "lora-rank: checkpoint 4, now 8"),
    ("fedavg", 1, {}, "past num-server-rounds=1"),
])
def test_resume_refuses_another_run(tmp_path: Path, strategy: str, rounds: int, extra: dict,
                                    message: str) -> None:
    _run(tmp_path, "fedavg", 2)
    with pytest.raises(CheckpointError, match=message):
        _run(tmp_path, strategy, rounds, resume=True, **extra)
    assert [r["round"] for r in _rounds(tmp_path)] == [1, 2]  # nothing lost
    assert latest_checkpoint(tmp_path / "checkpoints").round == 2


def test_resume_needs_an_output_dir(tmp_path) -> None:
    with pytest.raises(ConfigError, match="resume needs output-dir"):
        RunConfig.from_mapping({"resume": True})
    with pytest.raises(ConfigError, match="resume must be true or false"):
        RunConfig.from_mapping({"resume": "yes", "output-dir": str(tmp_path)})


def _query(node_config: dict) -> Message:
    msg = Message(content=RecordDict(), dst_node_id=1, message_type=MessageType.QUERY, group_id="0")
    ctx = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    return copy_client_app(msg, ctx)


def test_query_answers_the_partition(task_identity: None) -> None:
    reply = _query({"partition-id": 3, "num-partitions": 4})
    assert reply.content["metrics"]["partition-id"] == 3
    assert "node config lacks 'partition-id'" in _query({}).error.reason


def test_query_failure_names_the_node(task_identity: None) -> None:
    no_query = ClientApp()
    no_query.train()(copy_client.train)
    grid = InProcessGrid(no_query, simulation_node_configs(2), {})
    with pytest.raises(CheckpointError, match=r"node 1: .*No query function registered"):
        query_partitions(grid, grid.get_node_ids(), timeout=5)


@pytest.mark.slow
def test_resume_on_ray(tmp_path: Path) -> None:
    """``flwr run`` twice: new node ids, the QUERY round through the real runtime."""
    import subprocess
    import sys

    from clair_flower.server_apps.local_superlink import stop_pids, superlink_pids
    from tests.apps.test_flwr_run import ROOT, flwr_env

    from clair_flower.server_apps.runner import initial_adapter

    home, out = tmp_path / "flwr-home", tmp_path / "out"
    flwr = str(Path(sys.executable).with_name("flwr"))
    tiny = {k: v for k, v in TINY.items() if not k.startswith("attack")}
    initial_adapter(RunConfig.from_mapping(tiny))  # pre-train the base model here, not on Ray
    settings = " ".join(f"{k}={v}" for k, v in tiny.items())

    def flwr_run(rounds: int, resume: bool) -> None:
        cmd = [flwr, "run", ".", "--stream", "--run-config",
               f"{settings} num-server-rounds={rounds} strategy='clair' output-dir='{out}' "
               f"resume={str(resume).lower()}",
               "--federation-config", "num-supernodes=3 client-resources-num-cpus=1"]
        proc = subprocess.run(cmd, cwd=ROOT, env=flwr_env(home), capture_output=True, text=True, timeout=540)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    try:
        flwr_run(1, resume=False)
        flwr_run(2, resume=True)
    finally:
        stop_pids(superlink_pids(home))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num-rounds"] == 2 and summary["resumed-after-round"] == 1
    assert [json.loads(x)["round"] for x in (out / "rounds.jsonl").read_text().splitlines()] == [1, 2]
    ckpt = latest_checkpoint(out / "checkpoints")
    assert ckpt.round == 2 and set(ckpt.state.per_client["adapters"]) == {0, 1, 2}
