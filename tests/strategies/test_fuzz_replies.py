"""Hostile payloads through whole rounds of ``Strategy.start``: the ServerApp survives, the bad
client is rejected with its reason, and every other client's result is the run without it.

One node (3 of 1..6) sends a broken train reply in every round; the others run a fake
ClientApp whose update depends only on what it received and on its node id, so a run without
node 3 is the reference. Covered for Flower's FedAvg behind :class:`ScreenedStrategy` and for
:class:`ClairStrategy`. ``PAYLOADS`` is the table the README's bad-input section lists.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from clair_flower.server_apps.inprocess import InProcessGrid, simulation_node_configs
from clair_flower.strategies.clair import ClairStrategy
from clair_flower.strategies.records import from_arrayrecord, to_arrayrecord
from clair_flower.strategies.screened import ScreenedStrategy

MODULES = ("m.q_proj", "m.v_proj")
KA, KB = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"
RANK, IN, OUT = 2, 6, 5
NODES = [1, 2, 3, 4, 5, 6]
BAD = 3
ROUNDS = 2


def _initial() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for m in MODULES:
        out[f"{m}.lora_A.weight"] = rng.normal(size=(RANK, IN)).astype(np.float32)
        out[f"{m}.lora_B.weight"] = np.zeros((OUT, RANK), np.float32)
    return out


def _honest(received: dict[str, np.ndarray], node: int, server_round: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([node, server_round])
    return {k: (v + 0.1 * rng.normal(size=v.shape)).astype(np.float32) for k, v in received.items()}


def _fake_client() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        state = _honest(from_arrayrecord(msg.content["arrays"]), context.node_id,
                        int(msg.content["config"]["server-round"]))
        return Message(RecordDict({"arrays": to_arrayrecord(state),
                                   "metrics": MetricRecord({"num-examples": 10 + context.node_id,
                                                            "train-loss": 1.0 / context.node_id})}),
                       reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 4, "eval-loss": float(context.node_id)})}),
                       reply_to=msg)

    return app


# -- payloads: honest state -> the contents the bad node sends (a str: an error reply) ----------
Payload = Callable[[dict[str, np.ndarray]], list[RecordDict | str]]


def _npy(arr: np.ndarray) -> bytes:
    return Array(np.asarray(arr)).data


def _header_only(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    fp = io.BytesIO()
    np.lib.format.write_array_header_1_0(fp, {"descr": descr, "fortran_order": False, "shape": shape})
    return fp.getvalue()


def _content(state: dict, metrics: dict | None = None) -> RecordDict:
    return RecordDict({"arrays": to_arrayrecord(state),
                       "metrics": MetricRecord({"num-examples": 10} if metrics is None else metrics)})


def _with_array(s: dict, key: str, array: Array) -> RecordDict:
    record = to_arrayrecord(s)
    record[key] = array
    return RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": 10})})


def _raw(dtype: str, shape: tuple[int, ...], data: bytes, stype: str = "numpy.ndarray") -> Array:
    return Array(dtype=dtype, shape=shape, stype=stype, data=data)


def _set(key: str, value: Callable[[np.ndarray], np.ndarray]) -> Payload:
    def make(s: dict) -> list[RecordDict | str]:
        s = dict(s)
        s[key] = value(s[key])
        return [_content(s)]
    return make


def _poke(key: str, value: float) -> Callable[[np.ndarray], np.ndarray]:
    def f(a: np.ndarray) -> np.ndarray:
        a = a.copy()
        a[0, 0] = value
        return a
    return f


# (name, payload, reason substring for FedAvg, for CLAIR if it differs)
PAYLOADS: list[tuple[str, Payload, str, str | None]] = [
    # -- bytes that cannot be decoded
    ("dtype tag 'bfloat16' with raw bytes",
     lambda s: [_with_array(s, KA, _raw("bfloat16", (RANK, IN), bytes(2 * RANK * IN)))],
     f"{KA}: cannot decode array: ValueError: the magic string is not correct", None),
    ("garbage bytes",
     lambda s: [_with_array(s, KA, _raw("float32", (RANK, IN), b"\x93NUMPY\x07\xff garbage" * 3))],
     f"{KA}: cannot decode array", None),
    ("empty bytes", lambda s: [_with_array(s, KA, _raw("float32", (RANK, IN), b""))],
     f"{KA}: cannot decode array", None),
    ("unknown stype 'torch.Tensor'",
     lambda s: [_with_array(s, KA, _raw("float32", (RANK, IN), _npy(s[KA]), stype="torch.Tensor"))],
     f"{KA}: cannot decode array: stype 'torch.Tensor'", None),
    ("data 4 bytes short",
     lambda s: [_with_array(s, KA, _raw("float32", (RANK, IN), _npy(s[KA])[:-4]))],
     f"{KA}: cannot decode array: 44 data bytes, expected 48", None),
    ("8 bytes past the data",
     lambda s: [_with_array(s, KA, _raw("float32", (RANK, IN), _npy(s[KA]) + bytes(8)))],
     f"{KA}: cannot decode array: 56 data bytes, expected 48", None),
    ("header declares 2 x 10^12 floats, no data",
     lambda s: [_with_array(s, KA, _raw("float32", (RANK, 10**12), _header_only((RANK, 10**12))))],
     f"{KA}: shape (2, 1000000000000), expected (2, 6)", None),
    ("declared float32, data float64",
     lambda s: [_with_array(s, KA, _raw("float32", (RANK, IN), _npy(s[KA].astype(np.float64))))],
     f"{KA}: cannot decode array: declared dtype float32", None),
    ("object dtype header",
     lambda s: [_with_array(s, KA, _raw("object", (RANK, IN), _header_only((RANK, IN), "|O") + bytes(96)))],
     f"{KA}: dtype object, expected a floating dtype", None),
    # -- decodable, wrong dtype or shape
    ("integer dtype", _set(KA, lambda a: a.astype(np.int32)), f"{KA}: dtype int32, expected a floating dtype", None),
    ("complex dtype", _set(KA, lambda a: a.astype(np.complex64)), f"{KA}: dtype complex64", None),
    ("wrong shape", _set(KA, lambda a: np.zeros((RANK, IN + 1), np.float32)),
     f"{KA}: shape (2, 7), expected (2, 6)", None),
    ("0-d array", lambda s: [_with_array(s, KA, Array(np.array(1.0, np.float32)))], f"{KA}: shape (), expected (2, 6)", None),
    ("empty array (0, 6)", _set(KA, lambda a: np.zeros((0, IN), np.float32)),
     f"{KA}: shape (0, 6), expected (2, 6)", None),
    ("A of rank 3, B of rank 2", _set(KA, lambda a: np.ones((3, IN), np.float32)),
     f"{KA}: shape (3, 6), expected (2, 6)", f"{KA}: rank 3 but its lora_B has rank 2"),
    # -- values
    ("NaN in an array", _set(KA, _poke(KA, np.nan)), f"{KA}: contains NaN or Inf", None),
    ("Inf in an array", _set(KB, _poke(KB, np.inf)), f"{KB}: contains NaN or Inf", None),
    ("float64 1e300 (beyond float32)", _set(KA, lambda a: _poke(KA, 1e300)(a.astype(np.float64))),
     f"{KA}: values beyond the float32 range", None),
    ("huge values (x1e30)", _set(KB, lambda a: a * np.float32(1e30)), "is over 1000x the median", None),
    # -- records
    ("missing LoRA key", lambda s: [_content({k: v for k, v in s.items() if k != KB})], "missing LoRA keys", None),
    ("extra key", lambda s: [_content({**s, "m.k_proj.lora_A.weight": s[KA]})], "unexpected keys", None),
    ("empty ArrayRecord", lambda s: [RecordDict({"arrays": ArrayRecord(),
                                                 "metrics": MetricRecord({"num-examples": 10})})],
     "missing LoRA keys", None),
    ("empty RecordDict", lambda s: [RecordDict()], "no MetricRecord 'metrics'", None),
    ("no ArrayRecord", lambda s: [RecordDict({"metrics": MetricRecord({"num-examples": 10})})],
     "no ArrayRecord 'arrays'", None),
    ("ArrayRecord under another name", lambda s: [RecordDict({"weights": to_arrayrecord(s),
                                                              "metrics": MetricRecord({"num-examples": 10})})],
     "no ArrayRecord 'arrays'", None),
    ("no MetricRecord", lambda s: [RecordDict({"arrays": to_arrayrecord(s)})], "no MetricRecord 'metrics'", None),
    ("two MetricRecords, neither 'metrics'",
     lambda s: [RecordDict({"arrays": to_arrayrecord(s), "m1": MetricRecord({"num-examples": 10}),
                            "m2": MetricRecord({"num-examples": 10})})],
     "no MetricRecord 'metrics'", None),
    ("config instead of metrics", lambda s: [RecordDict({"arrays": to_arrayrecord(s),
                                                        "metrics": ConfigRecord({"num-examples": 10})})],
     "no MetricRecord 'metrics'", None),
    # -- the weight
    ("no num-examples", lambda s: [_content(s, {"train-loss": 1.0})], "MetricRecord lacks a scalar 'num-examples'", None),
    ("num-examples a list", lambda s: [_content(s, {"num-examples": [1, 2]})],
     "MetricRecord lacks a scalar 'num-examples'", None),
    ("num-examples 0", lambda s: [_content(s, {"num-examples": 0})], "'num-examples' must be positive, got 0", None),
    ("num-examples -5", lambda s: [_content(s, {"num-examples": -5})], "'num-examples' must be positive, got -5", None),
    ("num-examples NaN", lambda s: [_content(s, {"num-examples": float("nan")})], "must be positive, got nan", None),
    ("num-examples Inf", lambda s: [_content(s, {"num-examples": float("inf")})], "must be positive, got inf", None),
    # -- replies
    ("error reply", lambda s: ["client crashed"], "error reply: client crashed", None),
    ("two replies, different", lambda s: [_content(s), _content({k: 2 * v for k, v in s.items()})],
     "2 replies in one round", None),
    ("two replies, identical", lambda s: [_content(s), _content(s)], "2 replies in one round", None),
    ("an error reply and a good one", lambda s: ["late error", _content(s)], "2 replies in one round", None),
]


class FuzzGrid(InProcessGrid):
    """In-process grid whose node ``bad`` answers every train message with ``payload``."""

    def __init__(self, node_ids: list[int], payload: Payload | None) -> None:
        super().__init__(_fake_client(), simulation_node_configs(len(node_ids)), {}, node_ids=node_ids)
        self.payload = payload

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        out = []
        for msg in sorted(messages, key=lambda m: m.metadata.dst_node_id):
            nid = msg.metadata.dst_node_id
            reply = self.client_app(msg, self.contexts[nid])
            if nid != BAD or self.payload is None or msg.metadata.message_type != MessageType.TRAIN:
                out.append(reply)
                continue
            honest = from_arrayrecord(reply.content["arrays"])
            for content in self.payload(honest):
                out.append(Message(Error(code=1, reason=content), reply_to=msg) if isinstance(content, str)
                           else Message(content, reply_to=msg))
        return out


def _fedavg() -> ScreenedStrategy:
    return ScreenedStrategy(FedAvg())


STRATEGIES: dict[str, Callable[[], object]] = {
    "fedavg": _fedavg,
    # A fixed penalty solves each module once instead of along the 12-point path: the screen
    # is under test here, and it runs before any of that (the default is tried below).
    "clair": lambda: ClairStrategy(lora_alpha=8.0, c=1.0),
    "clair-default": lambda: ClairStrategy(lora_alpha=8.0),
}


def _run(kind: str, node_ids: list[int], payload: Payload | None):  # noqa: ANN202
    strategy = STRATEGIES[kind]()
    grid = FuzzGrid(node_ids, payload)
    result = strategy.start(grid=grid, initial_arrays=to_arrayrecord(_initial()), num_rounds=ROUNDS)
    return strategy, result


_REFERENCE: dict[str, tuple] = {}


def _reference(kind: str) -> tuple:
    """The run without the bad node (computed once per strategy)."""
    if kind not in _REFERENCE:
        _REFERENCE[kind] = _run(kind, [n for n in NODES if n != BAD], None)
    return _REFERENCE[kind]


def _assert_same_arrays(got: ArrayRecord, want: ArrayRecord) -> None:
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k].numpy(), want[k].numpy(), err_msg=k)


@pytest.mark.parametrize("kind", ["fedavg", "clair"])
@pytest.mark.parametrize(("name", "payload", "reason", "clair_reason"), PAYLOADS, ids=[p[0] for p in PAYLOADS])
def test_bad_payload_costs_only_its_sender(task_identity, kind: str, name: str, payload: Payload,
                                           reason: str, clair_reason: str | None) -> None:
    _check_run(kind, payload, clair_reason if kind == "clair" and clair_reason is not None else reason)


@pytest.mark.parametrize("index", [0])
def test_clair_default_settings_survive_undecodable_arrays(task_identity, index: int) -> None:
    """The issue's case: ClairStrategy as users build it, bytes it cannot decode, two rounds."""
    _check_run("clair-default", PAYLOADS[index][1], PAYLOADS[index][2])


def _check_run(kind: str, payload: Payload, want: str) -> None:
    strategy, result = _run(kind, NODES, payload)  # the ServerApp survives: start() returns
    ref_strategy, ref = _reference(kind)
    assert want in strategy.last_report.rejected[BAD], strategy.last_report.rejected
    assert strategy.last_report.rejected.keys() == {BAD}
    for r in range(1, ROUNDS + 1):
        metrics = result.train_metrics_clientapp[r]
        assert list(strategy.round_details[r]["rejected-node-ids"]) == [BAD], (r, dict(metrics))
        assert all(not isinstance(v, list) for v in metrics.values()), "per-client lists reach Flower's log"
        assert metrics["num-accepted"] == len(NODES) - 1
        assert metrics["duplicate-replies"] == (1 if "2 replies" in want else 0)
        for key, value in ref.train_metrics_clientapp[r].items():
            # Bytes differ by the bad node's messages (tests/strategies/test_communication.py counts them).
            if key not in ("num-rejected", "rejected-node-ids", "duplicate-replies") and "seconds" not in key \
                    and not key.startswith("comm-"):
                assert metrics[key] == value, (r, key)
    _assert_same_arrays(result.arrays, ref.arrays)
    if kind.startswith("clair"):  # every other client's own adapter, not only the consensus
        assert strategy.adapters.keys() == ref_strategy.adapters.keys() == set(NODES) - {BAD}
        for nid, adapter in ref_strategy.adapters.items():
            for k, v in adapter.items():
                np.testing.assert_array_equal(strategy.adapters[nid][k], v, err_msg=f"node {nid} {k}")


def test_evaluate_duplicates_and_bad_weights_cost_only_their_sender(task_identity) -> None:
    """Evaluate replies go through the same screen: duplicates and a NaN weight reject only the sender."""
    from clair_flower.strategies.screen import ReplyScreen

    ins = [Message(RecordDict({"config": ConfigRecord()}), dst_node_id=n, message_type=MessageType.EVALUATE,
                   group_id="1") for n in (1, 2, 3)]
    good = [Message(RecordDict({"metrics": MetricRecord({"num-examples": 4, "loss": 1.0})}), reply_to=m) for m in ins]
    dup = Message(RecordDict({"metrics": MetricRecord({"num-examples": 4, "loss": 9.0})}), reply_to=ins[1])
    nan = Message(RecordDict({"metrics": MetricRecord({"num-examples": float("nan")})}), reply_to=ins[2])
    ok, bad = ReplyScreen().evaluate([good[0], good[1], dup, nan])
    assert [n for n, _ in ok] == [1]
    assert "2 replies in one round" in bad[2] and "must be positive, got nan" in bad[3]
