"""The checkpoint format: exact round trip, atomic and complete-only, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clair_flower.server_apps.checkpoint_format import (Checkpoint, CheckpointError, StrategyState, check_compatible,
                                     checkpoint_rounds, clear_checkpoints, latest_checkpoint,
                                     load_checkpoint, save_checkpoint)


def _checkpoint(server_round: int = 3) -> Checkpoint:
    rng = np.random.default_rng(server_round)
    key = "base_model.model.h.0.attn.c_attn.lora_A.weight"
    state = StrategyState(
        shared={"consensus": {key: rng.standard_normal((4, 8)).astype(np.float32)}},
        per_client={"adapters": {0: {key: rng.standard_normal((4, 8)).astype(np.float32)},
                                 7: {key: rng.standard_normal((2, 8))}},  # float64, another rank
                    "refined": {3: {}}},  # an empty state dict survives too
        meta={"completed-aggregations": 5, "first-factor": "B"},
        per_client_meta={"flag-history": {0: [0, 1], 7: [1]}},
    )
    return Checkpoint(round=server_round, strategy="clair", config={"lora-rank": 4, "seed": 0},
                      global_arrays={key: rng.standard_normal((4, 8)).astype(np.float32),
                                     "counter": np.arange(3, dtype=np.int64)},
                      state=state, info={"num-nodes": 8})


def _assert_same(a: Checkpoint, b: Checkpoint) -> None:
    assert (a.round, a.strategy, a.config, a.info) == (b.round, b.strategy, b.config, b.info)
    for x, y in ((a.global_arrays, b.global_arrays), *((a.state.shared[n], b.state.shared[n]) for n in a.state.shared)):
        assert set(x) == set(y)
        for k in x:
            assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), k
    assert {n: set(c) for n, c in a.state.per_client.items()} == {n: set(c) for n, c in b.state.per_client.items()}
    for name, by_client in a.state.per_client.items():
        for cid, state in by_client.items():
            got = b.state.per_client[name][cid]
            assert set(got) == set(state)
            for k in state:
                assert got[k].dtype == state[k].dtype and np.array_equal(got[k], state[k])
    assert a.state.meta == b.state.meta
    assert a.state.per_client_meta == b.state.per_client_meta


def test_round_trip_is_exact(tmp_path) -> None:
    ckpt = _checkpoint()
    sidecar = save_checkpoint(tmp_path, ckpt)
    assert sidecar.name == "round-000003.json"
    assert json.loads(sidecar.read_text())["strategy"] == "clair"  # plain JSON, no pickle
    _assert_same(ckpt, load_checkpoint(sidecar))
    _assert_same(ckpt, latest_checkpoint(tmp_path))


def test_keeps_the_last_rounds_and_ignores_incomplete_ones(tmp_path) -> None:
    for r in (1, 2, 3):
        save_checkpoint(tmp_path, _checkpoint(r), keep=2)
    assert checkpoint_rounds(tmp_path) == [2, 3]
    # A crash after the arrays file of round 4 but before its sidecar, and a half-written
    # temporary file: neither is a checkpoint, round 3 still is the latest.
    (tmp_path / "round-000004.safetensors").write_bytes(b"partial")
    (tmp_path / ".round-000004.json.abc.tmp").write_text("{")
    assert latest_checkpoint(tmp_path).round == 3
    assert clear_checkpoints(tmp_path) == 6
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "nowhere") is None


def test_truncated_arrays_file_is_named(tmp_path) -> None:
    save_checkpoint(tmp_path, _checkpoint())
    arrays = tmp_path / "round-000003.safetensors"
    arrays.write_bytes(arrays.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"round-000003\.safetensors does not match the checksum"):
        latest_checkpoint(tmp_path)


@pytest.mark.parametrize(("damage", "message"), [
    (lambda p: p.write_text("{not json"), "JSON sidecar cannot be read"),
    (lambda p: p.write_text(json.dumps({"format": "something-else"})), "not a clair-flower-checkpoint"),
    (lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "version": 99})), "format version 99"),
    (lambda p: (p.parent / "round-000003.safetensors").unlink(), "arrays file round-000003.safetensors is missing"),
])
def test_corrupt_sidecar_is_a_clear_error(tmp_path, damage, message: str) -> None:  # noqa: ANN001
    sidecar = save_checkpoint(tmp_path, _checkpoint())
    damage(sidecar)
    with pytest.raises(CheckpointError, match=message) as err:
        latest_checkpoint(tmp_path)
    assert "round-000003" in str(err.value) and "Delete" in str(err.value)


def test_foreign_checkpoint_names_strategy_and_keys() -> None:
    ckpt = _checkpoint()
    with pytest.raises(CheckpointError, match="written by strategy 'clair', this run uses 'fedavg'"):
        check_compatible(ckpt, "fedavg", ckpt.config)
    with pytest.raises(CheckpointError, match="lora-rank: checkpoint 4, now 8"):
        check_compatible(ckpt, "clair", {**ckpt.config, "lora-rank": 8})
    check_compatible(ckpt, "clair", {**ckpt.config, "num-server-rounds": 9}, may_differ=["num-server-rounds"])


def test_rekeying_needs_every_client() -> None:
    state = _checkpoint().state
    moved = state.rekeyed({0: 10, 3: 13, 7: 17})
    assert set(moved.per_client["adapters"]) == {10, 17} and moved.per_client_meta["flag-history"][17] == [1]
    with pytest.raises(CheckpointError, match=r"no partition-id known for \[7\]"):
        state.rekeyed({0: 10, 3: 13}, "partition-id")
    with pytest.raises(CheckpointError, match="same"):
        state.rekeyed({0: 1, 3: 1, 7: 2})


def test_per_client_lists_are_checked() -> None:
    state = _checkpoint().state
    assert state.per_client_int_lists("flag-history") == {0: [0, 1], 7: [1]}
    assert state.per_client_int_lists("absent") == {}
    state.per_client_meta["flag-history"][7] = "1"
    with pytest.raises(CheckpointError, match="'flag-history' of client 7 must be a list of integers"):
        state.per_client_int_lists("flag-history")
    state.per_client_meta["score-z-history"] = {0: [0.5, 3], 7: [1.0, None]}
    with pytest.raises(CheckpointError, match="'score-z-history' of client 7 must be a list of numbers"):
        state.per_client_float_lists("score-z-history")
    state.per_client_meta["score-z-history"][7] = [1.5]
    assert state.per_client_float_lists("score-z-history") == {0: [0.5, 3.0], 7: [1.5]}


def test_bad_metadata_writes_nothing(tmp_path) -> None:
    ckpt = _checkpoint()
    ckpt.state.meta["when"] = object()
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tmp_path, ckpt)
    assert list(tmp_path.iterdir()) == []
