"""A FlowerTune ClientApp with LoRA ranks 4 and 8 mixed, unchanged, under the personalised strategies.

The ClientApp is written as FlowerTune's template writes it: a PEFT model built from its own
config, ``set_peft_model_state_dict(model, msg.content["arrays"].to_torch_state_dict())`` on
receipt (no resizing shim: a wrong rank raises, and the runtime turns that into an error
reply), ``ArrayRecord(get_peft_model_state_dict(model))`` and ``train_loss`` /
``num-examples`` back. Nothing of this project's task code. The server evaluates the global
adapter as FlowerTune does, with an ``evaluate_fn`` that loads it into a server-side model of
the configured global rank.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
import torch
import transformers
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from clair_flower.lora import LoraFactors, lora_scaling
from clair_flower.server_apps.inprocess import InProcessGrid
from clair_flower.strategies.clair import ClairStrategy
from clair_flower.strategies.local import LocalOnly
from clair_flower.strategies.personalized import refactor_to_rank
from clair_flower.strategies.protocol import LORA_ALPHA, USE_RSLORA
from clair_flower.strategies.state import CheckpointError
from clair_flower.strategies.uploads import Upload

RANKS = [4, 8, 4, 8]  # by partition id
VOCAB, LEN, HIDDEN, ROUNDS = 24, 6, 32, 3


@pytest.fixture(autouse=True)
def one_torch_thread():  # noqa: ANN201
    """A tiny model: thread start-up and contention cost more than the work (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(rank: int, alpha: float, rslora: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                   max_position_embeddings=32)
    lora = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], use_rslora=rslora)
    return get_peft_model(transformers.LlamaForCausalLM(cfg), lora)


def _batch(seed: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy sequences ``x x``: the loss is on the second half."""
    x = np.random.default_rng(seed).integers(0, VOCAB, size=(16, LEN))
    ids = torch.from_numpy(np.concatenate([x, x], axis=1))
    labels = ids.clone()
    labels[:, :LEN] = -100
    return ids, labels


class FlowerTuneClient:
    """The ClientApp, and what every node received (the LoRA ranks of each train message)."""

    def __init__(self, alpha_of_rank: dict[int, float] | None = None, rslora_partition: int | None = None,
                 report: bool = False) -> None:
        self.alpha_of_rank = alpha_of_rank or {4: 8.0, 8: 8.0}
        self.rslora_partition = rslora_partition
        self.report = report
        self.received: dict[int, list[set[int] | None]] = defaultdict(list)  # pid -> ranks per message

    def config(self, pid: int) -> tuple[int, float, bool]:
        r = RANKS[pid]
        return r, self.alpha_of_rank[r], pid == self.rslora_partition

    def app(self) -> ClientApp:
        app = ClientApp()

        @app.train()
        def train(msg: Message, context: Context) -> Message:
            pid = int(context.node_config["partition-id"])
            r, alpha, rslora = self.config(pid)
            model = _model(r, alpha, rslora)
            state = msg.content["arrays"].to_torch_state_dict()
            self.received[pid].append({int(v.shape[0]) for k, v in state.items() if "lora_A" in k} or None)
            set_peft_model_state_dict(model, state)  # raises on a rank mismatch: no shim
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
            rnd = int(msg.content["config"]["server-round"])
            for step in range(3):
                ids, labels = _batch([pid, rnd, step])
                loss = model(input_ids=ids, labels=labels).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
            metrics = {"train_loss": float(loss), "num-examples": 16}
            if self.report:
                metrics.update({LORA_ALPHA: alpha, USE_RSLORA: int(rslora)})
            arrays = ArrayRecord({k: v.detach() for k, v in get_peft_model_state_dict(model).items()})
            return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)

        return app


def _evaluate_fn(rank: int, alpha: float, calls: list[int]):  # noqa: ANN202
    """FlowerTune's server-side evaluation: load the global adapter into a model of ``rank``."""
    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = _model(rank, alpha)
        set_peft_model_state_dict(model, arrays.to_torch_state_dict())  # raises on a rank mismatch
        ids, labels = _batch([99, server_round])
        with torch.no_grad():
            loss = float(model(input_ids=ids, labels=labels).loss)
        calls.append(server_round)
        return MetricRecord({"loss": loss})
    return evaluate


def _run(strategy, client: FlowerTuneClient, server_rank: int, evaluate: bool = True):  # noqa: ANN001, ANN202
    """3 rounds; the initial adapter and the evaluate_fn model are the server's, at ``server_rank``."""
    nodes = [{"partition-id": i, "num-partitions": len(RANKS)} for i in range(len(RANKS))]
    grid = InProcessGrid(client.app(), nodes, {})
    initial = ArrayRecord({k: v.detach() for k, v in get_peft_model_state_dict(_model(server_rank, 8.0)).items()})
    calls: list[int] = []
    result = strategy.start(grid, initial, num_rounds=ROUNDS, train_config=ConfigRecord(),
                            evaluate_config=ConfigRecord(),
                            evaluate_fn=_evaluate_fn(server_rank, 8.0, calls) if evaluate else None)
    return result, calls


def _assert_own_ranks(client: FlowerTuneClient) -> None:
    for pid, got in client.received.items():
        # One probe (an empty ArrayRecord: PEFT loads nothing), then its own rank every round.
        assert got == [None] + [{RANKS[pid]}] * ROUNDS, (pid, got)


def _global_ranks(arrays: ArrayRecord) -> set[int]:
    return {int(v.shape[0]) for k, v in arrays.items() if "lora_A" in k}


@pytest.mark.parametrize(("server_rank", "global_rank"), [(4, None), (8, 8)])
def test_clair_runs_a_mixed_rank_flowertune_project_unchanged(server_rank: int, global_rank: int | None) -> None:
    client = FlowerTuneClient()
    strategy = ClairStrategy(lora_alpha=8.0, global_rank=global_rank, fraction_evaluate=0.0,
                             min_train_nodes=len(RANKS), min_available_nodes=len(RANKS))
    result, calls = _run(strategy, client, server_rank)
    _assert_own_ranks(client)
    for rnd in range(1, ROUNDS + 1):
        metrics = result.train_metrics_clientapp[rnd]
        assert (metrics["num-accepted"], metrics["num-rejected"]) == (len(RANKS), 0), rnd
        assert metrics["clair-fallback"] == 0, rnd
    # The adapter handed back to Flower has the server's rank: evaluate_fn loaded it every round.
    assert _global_ranks(result.arrays) == {server_rank}
    assert calls == list(range(ROUNDS + 1))
    # Every node's stored adapter is at its own rank.
    for nid, adapter in strategy.adapters.items():
        assert {v.shape[0] for k, v in adapter.items() if k.endswith("lora_A.weight")} == {RANKS[nid - 1]}


def test_global_rank_other_than_the_initial_arrays() -> None:
    """``global_rank`` sets the returned adapter's rank whatever the initial arrays' rank."""
    client = FlowerTuneClient()
    strategy = ClairStrategy(lora_alpha=8.0, global_rank=6, fraction_evaluate=0.0,
                             min_train_nodes=len(RANKS), min_available_nodes=len(RANKS))
    result, _ = _run(strategy, client, server_rank=4, evaluate=False)
    _assert_own_ranks(client)
    assert _global_ranks(result.arrays) == {6}


def test_local_only_runs_a_mixed_rank_flowertune_project_unchanged() -> None:
    client = FlowerTuneClient()
    strategy = LocalOnly(fraction_evaluate=0.0, min_train_nodes=len(RANKS), min_available_nodes=len(RANKS))
    result, calls = _run(strategy, client, server_rank=4)
    _assert_own_ranks(client)
    assert all(result.train_metrics_clientapp[r]["num-rejected"] == 0 for r in range(1, ROUNDS + 1))
    assert _global_ranks(result.arrays) == {4} and calls == list(range(ROUNDS + 1))


def test_without_the_probe_a_mixed_rank_client_fails_as_before() -> None:
    """The probe is what makes it work: without it the rank-8 nodes cannot load round 1's adapter."""
    client = FlowerTuneClient()
    strategy = ClairStrategy(lora_alpha=8.0, rank_probe=False, fraction_evaluate=0.0,
                             min_train_nodes=len(RANKS), min_available_nodes=len(RANKS))
    result, _ = _run(strategy, client, server_rank=4)
    assert result.train_metrics_clientapp[1]["num-rejected"] == 2  # partitions 1 and 3 (rank 8)


def test_clients_reported_alpha_and_rslora_scale_their_factors() -> None:
    """Per-client ``lora_alpha`` (16 at rank 4, 32 at rank 8) and one rsLoRA client, reported in metrics."""
    client = FlowerTuneClient(alpha_of_rank={4: 16.0, 8: 32.0}, rslora_partition=3, report=True)
    strategy = ClairStrategy(lora_alpha=8.0, fraction_evaluate=0.0,
                             min_train_nodes=len(RANKS), min_available_nodes=len(RANKS))
    result, _ = _run(strategy, client, server_rank=4)
    _assert_own_ranks(client)
    assert strategy.node_alpha == {pid + 1: client.config(pid)[1] for pid in range(len(RANKS))}
    assert strategy.node_rslora == {pid + 1: pid == 3 for pid in range(len(RANKS))}
    assert all(result.train_metrics_clientapp[r]["num-rejected"] == 0 for r in range(1, ROUNDS + 1))
    assert LORA_ALPHA not in result.train_metrics_clientapp[1]  # settings, not a metric to average
    # CLAIR reads each upload with its own client's scaling.
    state = strategy.adapters[4]
    factors = strategy.as_factors(Upload(4, state, 16.0, {}))
    assert {f.scaling for f in factors.values()} == {lora_scaling(32.0, 8, True)}
    # What node 4 is sent represents its own update in its own scaling (its stored adapter, as is).
    sent = strategy.adapter_for(4)
    assert all(np.array_equal(sent[k], v) for k, v in state.items())


def test_reported_settings_from_a_config_record_and_bad_values_ignored() -> None:
    strategy = ClairStrategy(lora_alpha=8.0)

    def reply(nid: int, metrics: dict, config: dict | None = None) -> Message:
        content = RecordDict({"metrics": MetricRecord(metrics)})
        if config is not None:
            content["config"] = ConfigRecord(config)
        instruction = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=nid, message_type="train",
                              group_id="1")
        return Message(content, reply_to=instruction)

    strategy.observe_replies(1, [
        reply(1, {"num-examples": 1}, {LORA_ALPHA: 32.0, USE_RSLORA: True}),
        reply(2, {"num-examples": 1, LORA_ALPHA: -3.0, USE_RSLORA: 7}),
        reply(3, {"num-examples": 1, LORA_ALPHA: float("nan")}),
    ])
    assert strategy.node_alpha == {1: 32.0} and strategy.node_rslora == {1: True}
    assert strategy.alpha_of(2) == strategy.alpha_of(3) == 8.0 and not strategy.rslora_of(2)


def test_refactor_to_rank_keeps_the_update_and_a_fresh_adapter_stays_trainable() -> None:
    rng = np.random.default_rng(0)
    B, A = rng.normal(size=(12, 4)), rng.normal(size=(4, 10))
    f = LoraFactors(B=B.astype(np.float32), A=A.astype(np.float32), scaling=2.0)
    for rank, scaling in ((4, 1.0), (8, 0.5), (6, math.sqrt(2))):
        g = refactor_to_rank(f, rank, scaling)
        assert g.A.shape == (rank, 10) and g.B.shape == (12, rank)
        np.testing.assert_allclose(g.dense(), f.dense(), rtol=1e-4, atol=1e-5)
        assert np.all(np.abs(g.A).sum(axis=1) > 0)  # no dead rows: every direction still trains
    low = refactor_to_rank(f, 2, 1.0)  # best rank-2 approximation
    s = np.linalg.svd(f.dense(), compute_uv=False)
    assert np.linalg.norm(low.dense() - f.dense()) == pytest.approx(np.sqrt(np.sum(s[2:] ** 2)), rel=1e-4)
    fresh = refactor_to_rank(LoraFactors(B=np.zeros((12, 4), np.float32), A=f.A, scaling=2.0), 8, 1.0)
    assert not fresh.B.any() and np.all(np.abs(fresh.A) <= 1 / np.sqrt(10)) and np.abs(fresh.A).min(axis=1).all()


def test_bad_probe_replies_cost_only_their_sender() -> None:
    """An error, a wrong feature size and a half adapter: those nodes keep the global rank; the rest
    of the round goes on (the probe never raises)."""
    good = {f"m{i}.lora_A.weight": np.zeros((8, 6), np.float32) for i in range(2)}
    good.update({f"m{i}.lora_B.weight": np.zeros((5, 8), np.float32) for i in range(2)})
    replies = {
        1: dict(good),
        2: "error",
        3: {**good, "m0.lora_A.weight": np.zeros((8, 7), np.float32)},   # in_features 7, not 6
        4: {k: v for k, v in good.items() if k != "m1.lora_B.weight"},  # half an adapter
    }
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        answer = replies[context.node_id]
        if answer == "error":
            raise RuntimeError("size mismatch")
        arrays = ArrayRecord({k: v for k, v in ((k, torch.from_numpy(v)) for k, v in answer.items())})
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    grid = InProcessGrid(app, [{"partition-id": i} for i in range(4)], {})
    strategy = LocalOnly()
    initial = {f"m{i}.lora_A.weight": np.ones((4, 6), np.float32) for i in range(2)}
    initial.update({f"m{i}.lora_B.weight": np.zeros((5, 4), np.float32) for i in range(2)})
    strategy.begin_train(1, ArrayRecord({k: torch.from_numpy(v) for k, v in initial.items()}))
    strategy.before_train(1, [1, 2, 3, 4], ConfigRecord(), grid)
    assert strategy.node_ranks == {1: {"m0": 8, "m1": 8}}
    assert strategy.adapter_for(1)["m0.lora_A.weight"].shape == (8, 6)
    assert strategy.adapter_for(3)["m0.lora_A.weight"].shape == (4, 6)  # the global adapter
    assert strategy.communication.bytes_up > 0  # the probe's replies are counted


def test_reported_settings_survive_a_checkpoint() -> None:
    strategy = ClairStrategy(lora_alpha=8.0)
    strategy.adapters = {1: {"m.lora_A.weight": np.zeros((4, 6), np.float32),
                             "m.lora_B.weight": np.zeros((5, 4), np.float32)}}
    strategy.node_alpha, strategy.node_rslora = {1: 32.0, 2: 16.0}, {1: True}
    state = strategy.export_state()
    assert state.per_client_meta[LORA_ALPHA] == {1: 32.0}  # node 2 holds no adapter: not saved
    fresh = ClairStrategy(lora_alpha=8.0)
    fresh.restore_state(state)
    assert (fresh.node_alpha, fresh.node_rslora) == ({1: 32.0}, {1: True})
    assert fresh.node_ranks == {1: {"m": 4}}
    state.per_client_meta[LORA_ALPHA] = {1: 32.0, 3: "big"}
    with pytest.raises(CheckpointError, match="lora-alpha"):
        ClairStrategy(lora_alpha=8.0).restore_state(state)
