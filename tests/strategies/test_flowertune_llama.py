"""ClairStrategy dropped unchanged into a FlowerTune-style project on another architecture.

The ClientApp below is written the way FlowerTune apps are: a PEFT LoRA model (here a tiny
Llama with ``nn.Linear`` q/v projections, built from a config), ``set_peft_model_state_dict``
on receipt, ``ArrayRecord(get_peft_model_state_dict(model))`` under ``"arrays"`` and
``MetricRecord({"num-examples": n})`` under ``"metrics"``. Nothing of this project's task code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from clair_flower.server_apps.inprocess import InProcessGrid
from clair_flower.strategies.clair import ClairStrategy

NUM_NODES, CONTAMINATED, VOCAB, LEN = 8, {1, 5}, 24, 6


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                   max_position_embeddings=32)
    base = transformers.LlamaForCausalLM(cfg)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def _batch(pid: int, rnd: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy sequences ``x x``; contaminated nodes are trained on random second halves."""
    rng = np.random.default_rng([pid, rnd])
    x = rng.integers(0, VOCAB, size=(32, LEN))
    y = rng.integers(0, VOCAB, size=x.shape) if pid in CONTAMINATED else x
    ids = torch.from_numpy(np.concatenate([x, y], axis=1))
    labels = ids.clone()
    labels[:, :LEN] = -100
    return ids, labels


def _client_app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        model = _model()
        state = {k: torch.from_numpy(v.numpy()) for k, v in msg.content["arrays"].items()}
        set_peft_model_state_dict(model, state)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        pid = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"])
        for step in range(15):
            ids, labels = _batch(pid, 100 * rnd + step)
            loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        arrays = ArrayRecord({k: v.detach() for k, v in get_peft_model_state_dict(model).items()})
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 32})}),
                       reply_to=msg)

    return app


@pytest.mark.slow
def test_clair_detects_planted_clients_in_a_flowertune_llama_project() -> None:
    nodes = [{"partition-id": i, "num-partitions": NUM_NODES} for i in range(NUM_NODES)]
    grid = InProcessGrid(_client_app(), nodes, {})
    initial = ArrayRecord({k: v.detach() for k, v in get_peft_model_state_dict(_model()).items()})
    strategy = ClairStrategy(lora_alpha=8)
    result = strategy.start(grid, initial, num_rounds=3, train_config=ConfigRecord(),
                            evaluate_config=ConfigRecord())
    planted = {i + 1 for i in CONTAMINATED}  # InProcessGrid's node ids are partition + 1
    # Round 1 starts every client from the same zero-B adapter, so its evidence is weak;
    # from round 2 on, the planted clients must be exactly the flagged set.
    for rnd in (2, 3):
        assert set(strategy.round_details[rnd]["flagged-node-ids"]) == planted, rnd
