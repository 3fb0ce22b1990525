"""Local LoRA training and evaluation: determinism, factor freezing, y-only scoring."""

import numpy as np
import pytest
import torch

from clair_flower.copytask.model import LoraSpec, ModelConfig, build_model, load_base_model, wrap_lora
from clair_flower.copytask.peft_io import get_adapter_arrays
from clair_flower.copytask.task import IGNORE_INDEX, TaskConfig, encode, make_client_data
from clair_flower.copytask.training import TrainConfig, evaluate, make_optimizer, train_local

TASK = TaskConfig(vocab_size=8, min_len=2, max_len=4, num_train=8, num_test=16)
TINY = ModelConfig(n_layer=1, n_embd=16, n_head=2, max_positions=16)
FAST = TrainConfig(local_steps=3, batch_size=4)


def _run(seed):
    model = wrap_lora(build_model(TINY, TASK), LoraSpec(rank=2), seed=0)
    data = make_client_data(TASK, 0, 4)
    out = train_local(model, data, FAST, seed=seed)
    return out, evaluate(model, data.test_inputs, data.test_labels), get_adapter_arrays(model)


def test_same_seed_same_metrics():
    a, b = _run(1), _run(1)
    assert a[0] == b[0] and a[1] == b[1]
    assert all(np.array_equal(a[2][k], b[2][k]) for k in a[2])
    assert a[0]["num-examples"] == TASK.num_train
    assert set(a[1]) == {"loss", "token-acc", "exact-acc"}


def test_other_seed_other_weights():
    a, b = _run(1), _run(2)
    assert not all(np.array_equal(a[2][k], b[2][k]) for k in a[2])


@pytest.mark.parametrize("trainable", ["A", "B"])
def test_only_selected_factor_moves(trainable):
    model = wrap_lora(build_model(TINY, TASK), LoraSpec(rank=2), seed=0)
    data = make_client_data(TASK, 0, 4)
    if trainable == "A":  # give B a value, else A's gradient is zero
        train_local(model, data, FAST, seed=0, trainable="B")
    before = get_adapter_arrays(model)
    train_local(model, data, FAST, seed=0, trainable=trainable)
    after = get_adapter_arrays(model)
    frozen = "B" if trainable == "A" else "A"
    assert all(np.array_equal(before[k], after[k]) for k in before if f".lora_{frozen}." in k)
    assert any(not np.array_equal(before[k], after[k]) for k in before if f".lora_{trainable}." in k)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_bad_trainable():
    model = wrap_lora(build_model(TINY, TASK), LoraSpec(rank=2), seed=0)
    with pytest.raises(ValueError):
        train_local(model, make_client_data(TASK, 0, 4), FAST, trainable="C")


class _Oracle(torch.nn.Module):
    """Predicts each next token correctly, except a chosen wrong one at given positions."""

    def __init__(self, vocab, wrong_at):
        super().__init__()
        self.vocab, self.wrong_at = vocab, wrong_at

    def forward(self, input_ids, attention_mask=None):
        nxt = torch.roll(input_ids, -1, dims=1)
        for row, col in self.wrong_at:
            nxt[row, col] = (nxt[row, col] + 1) % self.vocab
        logits = torch.nn.functional.one_hot(nxt, self.vocab).float() * 10
        return type("Out", (), {"logits": logits})()


def test_accuracy_counts_y_only():
    x = np.array([[0, 1, 2], [3, 4, 0]])
    inputs, labels = encode(x, x, max_len=4)
    # Wrong predictions on x / SEP / PAD positions do not count...
    model = _Oracle(16, wrong_at=[(0, 0), (0, 2), (1, 8)])
    assert evaluate(model, inputs, labels) == pytest.approx({"loss": pytest.approx(0.0, abs=1e-3), "token-acc": 1.0, "exact-acc": 1.0})
    # ...a wrong prediction of a y token does: logits at t-1 score labels[t].
    y_pos = int((labels[0] != IGNORE_INDEX).nonzero()[1])
    res = evaluate(_Oracle(16, wrong_at=[(0, y_pos - 1)]), inputs, labels)
    assert res["token-acc"] == pytest.approx(5 / 6)
    assert res["exact-acc"] == pytest.approx(0.5)


@pytest.mark.slow
def test_lora_finetuning_improves_held_out_accuracy():
    cfg = TaskConfig()
    model = wrap_lora(load_base_model(ModelConfig(), cfg), LoraSpec(), seed=0)
    data = make_client_data(cfg, 0, 10)
    before = evaluate(model, data.test_inputs, data.test_labels)
    train_local(model, data, TrainConfig(local_steps=60), seed=0)
    after = evaluate(model, data.test_inputs, data.test_labels)
    assert after["token-acc"] > before["token-acc"] + 0.05


def test_sgd_optimizer_trains_and_bad_settings_are_named():
    for bad in (dict(optimizer="adam"), dict(momentum=1.0), dict(lr=0.0)):
        with pytest.raises(ValueError):
            TrainConfig(**bad)
    p = torch.nn.Parameter(torch.zeros(2))
    assert isinstance(make_optimizer([p], TrainConfig(optimizer="sgd")), torch.optim.SGD)
    assert isinstance(make_optimizer([p], TrainConfig()), torch.optim.AdamW)
