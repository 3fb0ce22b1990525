"""Every kind of bad client reply is rejected for that client only, with its reason."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from clair_flower.strategies.records import to_arrayrecord
from clair_flower.strategies.screen import ReplyScreen
from clair_flower.strategies.screened import ScreenedStrategy

KEY_A, KEY_B = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"


def _good_state(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {KEY_A: rng.normal(size=(2, 6)).astype(np.float32), KEY_B: rng.normal(size=(5, 2)).astype(np.float32)}


def _reply(node: int, content: RecordDict | None = None, error: str | None = None) -> Message:
    ins = Message(content=RecordDict({"config": ConfigRecord()}), dst_node_id=node,
                  message_type=MessageType.TRAIN, group_id="1")
    if error is not None:
        return Message(Error(code=1, reason=error), reply_to=ins)
    return Message(content, reply_to=ins)


def _content(state: dict, metrics: dict | None = None) -> RecordDict:
    return RecordDict({"arrays": to_arrayrecord(state),
                       "metrics": MetricRecord(metrics if metrics is not None else {"num-examples": 10})})


def _nan(s): s[KEY_A][0, 0] = np.nan; return _content(s)  # noqa: E702
def _inf(s): s[KEY_B][1, 1] = np.inf; return _content(s)  # noqa: E702
def _shape(s): s[KEY_A] = np.zeros((2, 7), np.float32); return _content(s)  # noqa: E702
def _missing(s): del s[KEY_B]; return _content(s)  # noqa: E702
def _extra(s): s["m.k_proj.lora_A.weight"] = np.zeros((2, 6), np.float32); return _content(s)  # noqa: E702
def _dtype(s): s[KEY_A] = s[KEY_A].astype(np.int32); return _content(s)  # noqa: E702
def _norm(s): s[KEY_B] = s[KEY_B] * 1e6; return _content(s)  # noqa: E702
def _no_examples(s): return _content(s, {"train-loss": 1.0})  # noqa: E704
def _no_arrays(s): return RecordDict({"metrics": MetricRecord({"num-examples": 10})})  # noqa: E704


# (name, how the reply is broken, words the rejection reason must contain)
BAD_INPUTS: list[tuple[str, Callable[[dict], RecordDict] | None, str]] = [
    ("NaN in an array", _nan, "NaN or Inf"),
    ("Inf in an array", _inf, "NaN or Inf"),
    ("wrong shape", _shape, "shape (2, 7), expected (2, 6)"),
    ("missing LoRA key", _missing, "missing LoRA keys"),
    ("extra key", _extra, "unexpected keys"),
    ("integer dtype", _dtype, "dtype int32"),
    ("absurd norm (x1e6)", _norm, "over 1000x the median"),
    ("no num-examples", _no_examples, "num-examples"),
    ("no ArrayRecord", _no_arrays, "no ArrayRecord 'arrays'"),
    ("error reply", None, "error reply: client crashed"),
]


@pytest.mark.parametrize(("name", "breaker", "reason"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_reply_is_rejected_and_round_goes_on(task_identity, name: str, breaker, reason: str) -> None:
    strategy = ScreenedStrategy(FedAvg(), ReplyScreen(max_norm_ratio=1e3))
    strategy.template = {k: v.shape for k, v in _good_state(0).items()}
    good = [_reply(n, _content(_good_state(n))) for n in (1, 2, 3)]
    bad = _reply(9, error="client crashed") if breaker is None else _reply(9, breaker(_good_state(9)))
    arrays, metrics = strategy.aggregate_train(1, good + [bad])
    assert isinstance(arrays, ArrayRecord), name
    assert strategy.last_report.rejected.keys() == {9}
    assert reason in strategy.last_report.rejected[9]
    assert metrics["num-rejected"] == 1 and metrics["num-accepted"] == 3
    expected = np.mean([_good_state(n)[KEY_A] for n in (1, 2, 3)], axis=0)
    np.testing.assert_allclose(arrays[KEY_A].numpy(), expected, rtol=1e-6)


def test_other_ranks_only_where_allowed() -> None:
    state = _good_state(0)
    template = {k: v.shape for k, v in state.items()}
    rank3 = {KEY_A: np.ones((3, 6), np.float32), KEY_B: np.ones((5, 3), np.float32)}
    from clair_flower.strategies.screen import UpdateRejected, check_state

    assert check_state(rank3, template, any_rank=True)[KEY_A].shape == (3, 6)
    with pytest.raises(UpdateRejected, match="shape"):
        check_state(rank3, template)
    with pytest.raises(UpdateRejected, match="rank 3 but its lora_B has rank 2"):
        check_state({KEY_A: rank3[KEY_A], KEY_B: state[KEY_B]}, template, any_rank=True)
