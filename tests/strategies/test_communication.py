"""Communication accounting: every strategy counts exactly the array bytes that cross the wire.

A numpy ClientApp records, per round, the serialised bytes of every array it received and
sent (``len(Array.data)``, what FlowerTune's tracker counts); the strategy's round metrics,
per-round state and totals must equal those sums, for train and evaluate, both ways, and a
rejected reply's bytes count too (they were received). A budget logs one WARNING once past.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from clair_flower.server_apps.inprocess import InProcessGrid, simulation_node_configs
from clair_flower.strategies.clair import ClairStrategy
from clair_flower.strategies.clair_rolora import ClairRoLoRA
from clair_flower.strategies.communication import (BYTES_DOWN, BYTES_DOWN_CUMULATIVE, BYTES_UP,
                                                   BYTES_UP_CUMULATIVE, MB, MB_CUMULATIVE, STATE_KEY,
                                                   CommunicationTracker, message_bytes)
from clair_flower.strategies.ffa_lora import FFALoRA
from clair_flower.strategies.local import LocalOnly
from clair_flower.strategies.protocol import BOTH_FACTORS, UPLOAD_FACTORS
from clair_flower.strategies.rolora import RoLoRA
from clair_flower.strategies.records import to_arrayrecord
from clair_flower.strategies.screened import ScreenedStrategy

NODES, ROUNDS, RANK = 4, 3, 4
MODULES = [f"base_model.model.layers.{i}.self_attn.q_proj" for i in range(2)]
BAD_NODE = 4  # sends NaN: rejected by the screen, its bytes received all the same


def _initial() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for m in MODULES:
        out[f"{m}.lora_A.weight"] = rng.normal(size=(RANK, 12)).astype(np.float32)
        out[f"{m}.lora_B.weight"] = np.zeros((16, RANK), np.float32)
    return out


def _bytes(record: ArrayRecord) -> int:
    return sum(len(a.data) for a in record.values())


class Wire:
    """What every node received and sent, per (round, phase, direction)."""

    def __init__(self) -> None:
        self.bytes: dict[tuple[int, str, str], int] = defaultdict(int)

    def app(self) -> ClientApp:
        app = ClientApp()

        @app.train()
        def train(msg: Message, context: Context) -> Message:
            rnd = int(msg.content["config"]["server-round"])
            received = msg.content["arrays"]
            self.bytes[rnd, "train", "down"] += _bytes(received)
            pid = int(context.node_config["partition-id"])
            rng = np.random.default_rng([pid, rnd])
            which = str(msg.content["config"].get(UPLOAD_FACTORS, BOTH_FACTORS))
            state = {}
            for k, a in received.items():
                if which != BOTH_FACTORS and not k.endswith(f"lora_{which}.weight"):
                    continue
                v = a.numpy() + 0.1 * rng.normal(size=a.shape).astype(np.float32)
                if context.node_id == BAD_NODE:
                    v[0, 0] = np.nan
                state[k] = v
            arrays = to_arrayrecord(state)
            self.bytes[rnd, "train", "up"] += _bytes(arrays)
            return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 10 + pid})}),
                           reply_to=msg)

        @app.evaluate()
        def evaluate(msg: Message, context: Context) -> Message:
            rnd = int(msg.content["config"]["server-round"])
            self.bytes[rnd, "evaluate", "down"] += _bytes(msg.content["arrays"])
            return Message(RecordDict({"metrics": MetricRecord({"num-examples": 5, "loss": 1.0})}), reply_to=msg)

        return app


STRATEGIES = {
    "clair": lambda: ClairStrategy(lora_alpha=8, min_train_nodes=NODES, min_available_nodes=NODES),
    "local": lambda: LocalOnly(),
    "rolora": lambda: RoLoRA(),
    "ffa-lora": lambda: FFALoRA(),
    "clair-rolora": lambda: ClairRoLoRA(lora_alpha=8),
    "screened-fedavg": lambda: ScreenedStrategy(FedAvg()),
}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_byte_counts_equal_the_arrays_sent_and_received(name: str) -> None:
    wire = Wire()
    strategy = STRATEGIES[name]()
    grid = InProcessGrid(wire.app(), simulation_node_configs(NODES), {})
    result = strategy.start(grid, to_arrayrecord(_initial()), num_rounds=ROUNDS,
                            train_config=ConfigRecord(), evaluate_config=ConfigRecord())
    comm = strategy.communication
    down_total = up_total = 0
    for rnd in range(1, ROUNDS + 1):
        train_down, train_up = wire.bytes[rnd, "train", "down"], wire.bytes[rnd, "train", "up"]
        eval_down = wire.bytes[rnd, "evaluate", "down"]
        assert train_down > 0 and train_up > 0 and eval_down > 0
        # Round metrics of each phase, and the running totals at its end.
        down_total, up_total = down_total + train_down, up_total + train_up
        train = result.train_metrics_clientapp[rnd]
        assert (train[BYTES_DOWN], train[BYTES_UP]) == (train_down, train_up), rnd
        assert (train[BYTES_DOWN_CUMULATIVE], train[BYTES_UP_CUMULATIVE]) == (down_total, up_total), rnd
        down_total += eval_down
        evaluate = result.evaluate_metrics_clientapp[rnd]
        assert (evaluate[BYTES_DOWN], evaluate[BYTES_UP]) == (eval_down, 0), rnd
        assert (evaluate[BYTES_DOWN_CUMULATIVE], evaluate[BYTES_UP_CUMULATIVE]) == (down_total, up_total)
        assert evaluate[MB_CUMULATIVE] == pytest.approx((down_total + up_total) / MB)
        # The strategy's state: per round, both phases.
        assert (comm.rounds[rnd].down, comm.rounds[rnd].up) == (train_down + eval_down, train_up), rnd
    assert (comm.bytes_down, comm.bytes_up) == (down_total, up_total)
    # The rejected node's upload counts: it was received.
    assert BAD_NODE in strategy.last_report.rejected


def test_arrays_and_declared_payload_agree() -> None:
    """``len(Array.data)`` is the numpy payload plus the npy header: what goes over the wire."""
    state = _initial()
    msg = Message(RecordDict({"arrays": to_arrayrecord(state)}), dst_node_id=1,
                  message_type="train")
    payload = sum(v.nbytes for v in state.values())
    assert payload < message_bytes(msg) <= payload + 128 * len(state)


def test_budget_warns_once_past_it(caplog: pytest.LogCaptureFixture) -> None:
    wire = Wire()
    strategy = LocalOnly(comm_budget_mb=1e-3)  # about 1 kB: past it with round 1's downlink
    grid = InProcessGrid(wire.app(), simulation_node_configs(NODES), {})
    with caplog.at_level(logging.WARNING, logger="flwr"):
        strategy.start(grid, to_arrayrecord(_initial()), num_rounds=ROUNDS,
                       train_config=ConfigRecord(), evaluate_config=ConfigRecord())
    warnings = [r for r in caplog.records if "past the budget" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert strategy.communication.warned
    assert wire.bytes[1, "train", "down"] / MB > 1e-3


def test_no_warning_under_budget(caplog: pytest.LogCaptureFixture) -> None:
    tracker = CommunicationTracker(budget_mb=1.0)
    msg = Message(RecordDict({"arrays": to_arrayrecord(_initial())}), dst_node_id=1,
                  message_type="train")
    with caplog.at_level(logging.WARNING, logger="flwr"):
        tracker.start_phase()
        tracker.sent(1, [msg] * 3)
    assert not tracker.warned and not [r for r in caplog.records if "budget" in r.getMessage()]


def test_totals_survive_a_checkpoint() -> None:
    strategy = LocalOnly(comm_budget_mb=10.0)
    strategy.communication.start_phase()
    msg = Message(RecordDict({"arrays": to_arrayrecord(_initial())}), dst_node_id=1,
                  message_type="train")
    strategy.communication.sent(1, [msg])
    state = strategy.export_state()
    fresh = LocalOnly(comm_budget_mb=10.0)
    fresh.restore_state(state)
    assert fresh.communication.bytes_down == strategy.communication.bytes_down > 0
    assert fresh.communication.rounds[1].down == strategy.communication.bytes_down
    # A checkpoint of older code (no totals) or a mangled entry starts from zero, no exception.
    for meta in ({}, {STATE_KEY: {"bytes-down": "many"}}, {STATE_KEY: [1, 2]}):
        other = LocalOnly()
        state.meta = dict(meta)
        other.restore_state(state)
        assert other.communication.bytes_down == 0


def test_bad_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="comm_budget_mb"):
        LocalOnly(comm_budget_mb=0)
