"""Collaboration must help on the copy task: FedAvg on LoRA factors beats local-only.

Pure python, no Flower: 10 honest clients, 5 rounds; each round every client loads the
averaged adapter, trains ``TrainConfig().local_steps`` steps, and the factors are averaged
weighted by num-examples. Local-only trains the same total number of steps alone.
"""

import numpy as np
import pytest

from clair_flower.model import LoraSpec, ModelConfig, load_base_model, wrap_lora
from clair_flower.peft_io import get_adapter_arrays, set_adapter_arrays
from clair_flower.task import TaskConfig, make_client_data
from clair_flower.training import TrainConfig, evaluate, train_local

NUM_CLIENTS, ROUNDS = 10, 5


def _acc(model, arrays, data):
    set_adapter_arrays(model, arrays)
    return evaluate(model, data.test_inputs, data.test_labels)["token-acc"]


def run_comparison(task=TaskConfig(), train=TrainConfig(), spec=LoraSpec()):
    """Mean held-out token accuracy of base, local-only and FedAvg."""
    model = wrap_lora(load_base_model(ModelConfig(), task), spec, seed=0)
    init = get_adapter_arrays(model)
    data = [make_client_data(task, k, NUM_CLIENTS) for k in range(NUM_CLIENTS)]
    base = np.mean([_acc(model, init, d) for d in data])
    local = []
    for k, d in enumerate(data):
        set_adapter_arrays(model, init)
        for r in range(ROUNDS):
            train_local(model, d, train, seed=100 * k + r)
        local.append(evaluate(model, d.test_inputs, d.test_labels)["token-acc"])
    glob = init
    for r in range(ROUNDS):
        updates, weights = [], []
        for k, d in enumerate(data):
            set_adapter_arrays(model, glob)
            weights.append(train_local(model, d, train, seed=100 * k + r)["num-examples"])
            updates.append(get_adapter_arrays(model))
        w = np.asarray(weights) / np.sum(weights)
        glob = {key: sum(wi * u[key] for wi, u in zip(w, updates)).astype(np.float32) for key in glob}
    fed = np.mean([_acc(model, glob, d) for d in data])
    return {"base": float(base), "local": float(np.mean(local)), "fedavg": float(fed)}


@pytest.mark.slow
def test_fedavg_beats_local_only():
    res = run_comparison()
    print(res)
    assert res["fedavg"] >= res["local"] + 0.05
    assert res["fedavg"] > res["base"] + 0.05
