"""RoLoRA, FFA-LoRA and CLAIR-RoLoRA: exactness, frozen factors, uploads, phase parity.

Federations run in-process (real ClientApp, real runner) with tiny settings; the base model
comes from the session cache (``CLAIR_FLOWER_CACHE``, see ``tests/conftest.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict

from clair_flower.server_apps.run_config import RunConfig
from clair_flower.lora import LoraFactors
from clair_flower.client_apps.copy_client import app as copy_client_app
from clair_flower.server_apps.inprocess import InProcessGrid, simulation_node_configs
from clair_flower.server_apps.runner import initial_adapter, run_federation
from clair_flower.strategies import clair_aggregator
from clair_flower.strategies.clair_rolora import ClairRoLoRA, reproject
from clair_flower.strategies.base import weighted_mean_state
from clair_flower.strategies.records import from_arrayrecord, to_arrayrecord
from clair_flower.strategies.rolora import factor_for
from clair_flower.strategies.uploads import Upload

TINY = {"local-steps": 2, "num-train": 16, "num-test": 16, "batch-size": 8}


class Spy:
    """The real ClientApp, recording what each train message asked for and what came back.

    ``fail_rounds`` turns every train reply of those rounds into an error reply.
    """

    def __init__(self, fail_rounds: tuple[int, ...] = ()) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail_rounds = fail_rounds

    def __call__(self, msg: Message, context: Context) -> Message:
        reply = copy_client_app(msg, context)
        if msg.metadata.message_type != MessageType.TRAIN:
            return reply
        cfg = msg.content.config_records["config"]
        rnd = int(cfg["server-round"])  # type: ignore[arg-type]
        self.calls.append({"round": rnd, "node": msg.metadata.dst_node_id,
                           "train": cfg.get("train-factors"), "upload": cfg.get("upload-factors"),
                           "sent": from_arrayrecord(msg.content.array_records["arrays"]),
                           "keys": sorted(reply.content.array_records["arrays"].keys())})
        if rnd in self.fail_rounds:
            return Message(Error(code=500, reason="injected failure"), reply_to=msg)
        return reply

    def factors_by_round(self) -> dict[int, str]:
        return {c["round"]: c["train"] for c in self.calls}


def _federate(tmp_path: Path, strategy: str, rounds: int, nodes: int = 3, client: Any = None,
              drop: Any = None) -> dict:
    run_config = {**TINY, "strategy": strategy, "num-server-rounds": rounds, "output-dir": str(tmp_path)}
    grid = InProcessGrid(client or copy_client_app, simulation_node_configs(nodes), run_config, drop=drop)
    return run_federation(grid, run_config)


def _only(state: dict[str, np.ndarray], factor: str) -> dict[str, np.ndarray]:
    return {k: v for k, v in state.items() if k.endswith(f".lora_{factor}.weight")}


# -- the math -----------------------------------------------------------------------------
def test_shared_a_makes_averaging_b_exact() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 24)).astype(np.float32)
    bs = [rng.standard_normal((40, 4)).astype(np.float32) for _ in range(5)]
    w = [3.0, 1.0, 2.0, 5.0, 4.0]
    mean_b = weighted_mean_state([{"b": b} for b in bs], w)["b"].astype(np.float64)
    mean_products = sum(wi * (b.astype(np.float64) @ a) for wi, b in zip(w, bs)) / sum(w)
    np.testing.assert_allclose(mean_b @ a, mean_products, rtol=1e-5, atol=1e-6)
    # FedAvg's mean(B) @ mean(A) with different A_k is not the mean of the products.
    As = [rng.standard_normal((4, 24)) for _ in bs]
    fedavg = np.mean(bs, axis=0) @ np.mean(As, axis=0)
    assert not np.allclose(fedavg, np.mean([b @ ak for b, ak in zip(bs, As)], axis=0), atol=1e-3)


def test_phase_counter_starts_with_b_and_alternates() -> None:
    assert [factor_for(i) for i in range(4)] == ["B", "A", "B", "A"]
    assert [factor_for(i, first="A") for i in range(2)] == ["A", "B"]


def test_reprojection_is_exact_in_the_frozen_factors_span() -> None:
    rng = np.random.default_rng(1)
    a, b_true = rng.standard_normal((4, 16)), rng.standard_normal((12, 4))
    mix = rng.standard_normal((4, 4))  # same dW, factored differently (another basis, scaling)
    refined = LoraFactors(B=2.0 * b_true @ mix, A=np.linalg.inv(mix) @ a, scaling=1.0)
    b_new, residual = reproject(refined, a.astype(np.float32), "B", scaling=2.0)
    np.testing.assert_allclose(b_new, b_true, rtol=1e-4, atol=1e-4)
    assert residual < 1e-5
    off = LoraFactors(B=b_true, A=rng.standard_normal((4, 16)), scaling=1.0)  # row space outside rowspan(A)
    assert reproject(off, a.astype(np.float32), "B", scaling=1.0)[1] > 0.1


# -- the client honours the frozen factor ---------------------------------------------------
@pytest.mark.parametrize("train", ["B", "A"])
def test_frozen_factor_is_bit_identical_after_client_training(train: str) -> None:
    run_config = {**TINY, "local-steps": 3}
    grid = InProcessGrid(copy_client_app, simulation_node_configs(2), run_config)
    sent = initial_adapter(RunConfig.from_mapping(run_config))
    rng = np.random.default_rng(0)
    sent = {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in sent.items()}
    content = RecordDict({"arrays": to_arrayrecord(sent), "config": ConfigRecord(
        {"server-round": 1, "train-factors": train, "upload-factors": "both"})})
    msg = Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN, group_id="1")
    (reply,) = grid.send_and_receive([msg])
    got = from_arrayrecord(reply.content.array_records["arrays"])
    frozen = "A" if train == "B" else "B"
    for k, v in _only(sent, frozen).items():
        assert np.array_equal(got[k], v), f"{k} changed although {frozen} was frozen"
    assert any(not np.array_equal(got[k], v) for k, v in _only(sent, train).items())


# -- federations ------------------------------------------------------------------------------
def test_rolora_uploads_one_factor_and_alternates_b_first(tmp_path: Path) -> None:
    spy = Spy()
    summary = _federate(tmp_path, "rolora", rounds=3, client=spy)
    assert spy.factors_by_round() == {1: "B", 2: "A", 3: "B"}
    for call in spy.calls:
        assert call["upload"] == call["train"]
        assert call["keys"] and all(k.endswith(f".lora_{call['train']}.weight") for k in call["keys"])
    sent = {c["round"]: c["sent"] for c in spy.calls}
    # A is shared and untouched by the B round; B is untouched by the A round.
    for k, v in _only(sent[1], "A").items():
        assert np.array_equal(sent[2][k], v)
    for k, v in _only(sent[2], "B").items():
        assert np.array_equal(sent[3][k], v)
    full = sum(v.nbytes for v in sent[1].values())
    b_bytes = sum(v.nbytes for v in _only(sent[1], "B").values())
    ups = [r["bytes-up"] for r in summary["rounds"]]
    assert ups == [b_bytes, full - b_bytes, b_bytes]
    assert all(r["bytes-down"] == full for r in summary["rounds"])
    assert summary["total-bytes-up"] == 3 * sum(ups)


def test_parity_survives_missing_clients_and_failed_rounds(tmp_path: Path) -> None:
    spy = Spy(fail_rounds=(3,))

    def drop(rnd: int, node: int) -> bool:
        return rnd == 2 or (rnd == 4 and node == 1)  # round 2: nobody; round 4: a subset

    _federate(tmp_path, "rolora", rounds=5, client=spy, drop=drop)
    # 1: B ok | 2: A, no reply | 3: A, all errors | 4: A, two of three | 5: B
    assert spy.factors_by_round() == {1: "B", 3: "A", 4: "A", 5: "B"}
    assert {c["node"] for c in spy.calls if c["round"] == 4} == {2, 3}


def test_ffa_lora_never_changes_a(tmp_path: Path) -> None:
    spy = Spy()
    summary = _federate(tmp_path, "ffa-lora", rounds=3, client=spy)
    assert set(spy.factors_by_round().values()) == {"B"}
    a0 = _only(spy.calls[0]["sent"], "A")
    for call in spy.calls:
        assert all(np.array_equal(call["sent"][k], v) for k, v in a0.items())
        assert all(k.endswith(".lora_B.weight") for k in call["keys"])
    final = summary["rounds"][-1]
    assert final["bytes-up"] == sum(v.nbytes for v in _only(spy.calls[0]["sent"], "B").values())


# -- CLAIR-RoLoRA with a stand-in for run_clair -------------------------------------------------
def _fake_clair(flag: set[int]):  # noqa: ANN202
    """Flags ``flag``; every client's refined update is its own input (an identity refinement)."""
    class _Client:
        def __init__(self, f: dict, flagged: bool) -> None:
            self.refined, self.flagged, self.vote, self.score = f, flagged, float(flagged), 0.0
            self.score_z, self.truncation_error = 0.0, {}

    class _Result:
        def __init__(self, updates: dict) -> None:
            self.flagged = frozenset(flag & set(updates))
            self.clients = {c: _Client(f, c in flag) for c, f in updates.items()}
            self.decision, self.diagnostics, self.modules = "vote", {}, {}

    return lambda updates, config, prior_z=None: _Result(updates)


def test_clair_rolora_excludes_flagged_and_keeps_the_frozen_factor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clair_aggregator, "run_clair", _fake_clair({3}))
    rng = np.random.default_rng(2)
    state = {"m.lora_A.weight": rng.standard_normal((4, 10)).astype(np.float32),
             "m.lora_B.weight": np.zeros((6, 4), np.float32)}
    strategy = ClairRoLoRA(lora_alpha=8.0)
    strategy.global_state = state
    bs = {n: rng.standard_normal((6, 4)).astype(np.float32) for n in (1, 2, 3)}
    bs[3] *= 100.0  # the flagged one would dominate a plain mean
    uploads = [Upload(n, {"m.lora_B.weight": b}, 1.0, {}) for n, b in bs.items()]
    new, metrics = strategy.aggregate_factor(1, "B", uploads)
    assert new is not None and set(new) == {"m.lora_B.weight"}
    np.testing.assert_allclose(new["m.lora_B.weight"], (bs[1] + bs[2]) / 2, rtol=1e-4, atol=1e-5)
    assert metrics["flagged-node-ids"] == [3] and metrics["max-reprojection-residual"] < 1e-5
    assert set(strategy.refined) == {1, 2}
    assert strategy.aggregate_factor(2, "B", uploads[:2])[0] is None  # < 3 uploads: skipped


def test_clair_rolora_any_clair_failure_skips_the_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """One failure rule for both CLAIR strategies: any exception from run_clair is a fallback."""
    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("solver did not converge")

    monkeypatch.setattr(clair_aggregator, "run_clair", broken)
    rng = np.random.default_rng(3)
    strategy = ClairRoLoRA(lora_alpha=8.0)
    strategy.global_state = {"m.lora_A.weight": rng.standard_normal((4, 10)).astype(np.float32),
                             "m.lora_B.weight": np.zeros((6, 4), np.float32)}
    uploads = [Upload(n, {"m.lora_B.weight": rng.standard_normal((6, 4)).astype(np.float32)}, 1.0, {})
               for n in (1, 2, 3)]
    new, metrics = strategy.aggregate_factor(1, "B", uploads)
    assert new is None and metrics["clair-fallback"] == 1 and metrics["num-flagged"] == 0
    assert metrics["clair-fallback-reason"] == "CLAIR failed: RuntimeError"  # named in the round's line


def test_clair_settings_come_from_config_or_keywords_not_both() -> None:
    from clair_flower.clair import ClairConfig

    cfg = ClairConfig(rank=2, vote_threshold=0.4)
    assert ClairRoLoRA(lora_alpha=8.0, config=cfg).config is cfg
    assert ClairRoLoRA(lora_alpha=8.0, rank=2, vote_threshold=0.4).config == cfg
    with pytest.raises(TypeError, match="rank"):
        ClairRoLoRA(lora_alpha=8.0, config=cfg, rank=3)
