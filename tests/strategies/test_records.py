"""Record conversions keep what Flower needs exact."""

import numpy as np

from clair_flower.strategies.records import from_arrayrecord, to_arrayrecord, to_metricrecord


def test_node_ids_survive_a_metricrecord() -> None:
    ids = [17929489690794424321, 7601262476215599123]  # Ray node ids are 64-bit
    record = to_metricrecord({"flagged-node-ids": ids, "votes": [np.float32(0.5), 1], "n": np.int64(3)})
    assert record["flagged-node-ids"] == ids
    assert record["votes"] == [0.5, 1.0] and record["n"] == 3


def test_arrayrecord_round_trip_keeps_peft_keys() -> None:
    state = {"m.q_proj.lora_A.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}
    back = from_arrayrecord(to_arrayrecord(state))
    assert list(back) == list(state)
    np.testing.assert_array_equal(back["m.q_proj.lora_A.weight"], state["m.q_proj.lora_A.weight"])
