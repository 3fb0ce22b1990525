"""Adapter arrays in and out of a PEFT model, validated before anything is written."""

import numpy as np
import pytest

from clair_flower.copytask.model import LoraSpec, ModelConfig, build_model, wrap_lora
from clair_flower.copytask.peft_io import (
    AdapterMismatchError, adapter_template, get_adapter_arrays, merge_delta, set_adapter_arrays,
)
from clair_flower.copytask.task import TaskConfig

TASK = TaskConfig(vocab_size=8, min_len=2, max_len=4)


@pytest.fixture(params=["gpt2", "llama"])
def model(request):
    cfg = ModelConfig(arch=request.param, n_layer=1, n_embd=16, n_head=2, max_positions=16)
    return wrap_lora(build_model(cfg, TASK), LoraSpec(rank=2), seed=0)


def test_arrays_are_float32_peft_keys(model):
    arrays = get_adapter_arrays(model)
    assert arrays and all(v.dtype == np.float32 for v in arrays.values())
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in arrays)
    assert {k: v.shape for k, v in arrays.items()} == adapter_template(model)


def test_round_trip(model):
    rng = np.random.default_rng(0)
    new = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in get_adapter_arrays(model).items()}
    set_adapter_arrays(model, new)
    got = get_adapter_arrays(model)
    assert all(np.array_equal(got[k], new[k]) for k in new)


def test_float64_accepted(model):
    arrays = {k: v.astype(np.float64) for k, v in get_adapter_arrays(model).items()}
    set_adapter_arrays(model, arrays)


def _bad_inputs(arrays):
    key = sorted(arrays)[0]
    missing = dict(arrays)
    del missing[key]
    yield "missing", missing, key
    yield "extra", {**arrays, "base_model.bogus.lora_A.weight": np.zeros((2, 2), np.float32)}, "bogus"
    shape = dict(arrays)
    shape[key] = np.zeros(arrays[key].shape[::-1] + (1,), np.float32)
    yield "shape", shape, key
    nan = dict(arrays)
    nan[key] = arrays[key].copy()
    nan[key].flat[0] = np.nan
    yield "nan", nan, key
    inf = dict(arrays)
    inf[key] = arrays[key].copy()
    inf[key].flat[0] = np.inf
    yield "inf", inf, key
    yield "int", {**arrays, key: arrays[key].astype(np.int64)}, key


@pytest.mark.parametrize("case", ["missing", "extra", "shape", "nan", "inf", "int"])
def test_rejects_bad_input_without_touching_model(model, case):
    before = get_adapter_arrays(model)
    bad = {k: v + 1.0 for k, v in before.items()}
    name, arrays, key = next(c for c in _bad_inputs(bad) if c[0] == case)
    with pytest.raises(AdapterMismatchError) as err:
        set_adapter_arrays(model, arrays)
    assert isinstance(err.value, ValueError)
    assert key in str(err.value)
    if case == "shape":
        assert str(tuple(before[key].shape)) in str(err.value)
        assert str(tuple(arrays[key].shape)) in str(err.value)
    after = get_adapter_arrays(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_non_strict_allows_partial_update(model):
    arrays = get_adapter_arrays(model)
    b_only = {k: np.ones_like(v) for k, v in arrays.items() if ".lora_B." in k}
    set_adapter_arrays(model, b_only, strict=False)
    got = get_adapter_arrays(model)
    for k, v in arrays.items():
        expected = np.ones_like(v) if ".lora_B." in k else v
        assert np.array_equal(got[k], expected)


def _logits(model) -> np.ndarray:
    import torch

    x = torch.tensor([[1, 3, 4, 2, 5, 6]])
    model.eval()
    with torch.no_grad():
        return model(input_ids=x).logits.numpy()


def test_merged_delta_acts_exactly_like_the_same_delta_held_by_the_adapter(model):
    """Merging B @ A into the base weight (Conv1D transposed) equals an adapter holding it."""
    import copy

    rng = np.random.default_rng(1)
    arrays = get_adapter_arrays(model)
    scaling = LoraSpec(rank=2).alpha / 2
    delta = {k: rng.normal(scale=0.3, size=v.shape).astype(np.float32) for k, v in arrays.items()}
    held = copy.deepcopy(model)
    set_adapter_arrays(held, {k: v / scaling if k.endswith("lora_B.weight") else v for k, v in delta.items()})
    zero = {k: np.zeros_like(v) if k.endswith("lora_B.weight") else v for k, v in arrays.items()}
    merged = copy.deepcopy(model)
    set_adapter_arrays(merged, zero)
    before = _logits(merged)
    merge_delta(merged, delta)
    assert not np.allclose(_logits(merged), before)
    np.testing.assert_allclose(_logits(merged), _logits(held), rtol=1e-4, atol=1e-5)


def test_merged_delta_of_another_rank_and_bad_deltas(model):
    arrays = get_adapter_arrays(model)
    key_a = next(k for k in arrays if k.endswith("lora_A.weight"))
    prefix = key_a[: -len(".lora_A.weight")]
    out_f, in_f = arrays[prefix + ".lora_B.weight"].shape[0], arrays[key_a].shape[1]
    merge_delta(model, {key_a: np.ones((5, in_f), np.float32), prefix + ".lora_B.weight": np.ones((out_f, 5))})
    before = _logits(model)
    bad = [({key_a: np.ones((5, in_f))}, "needs both lora_A and lora_B"),
           ({key_a: np.ones((5, in_f + 1)), prefix + ".lora_B.weight": np.ones((out_f, 5))}, "expected B"),
           ({key_a: np.full((1, in_f), np.nan), prefix + ".lora_B.weight": np.ones((out_f, 1))}, "NaN"),
           ({"x.lora_A.weight": np.ones((1, 2)), "x.lora_B.weight": np.ones((2, 1))}, "not an adapted module")]
    for delta, match in bad:
        with pytest.raises(AdapterMismatchError, match=match):
            merge_delta(model, delta)
    np.testing.assert_array_equal(_logits(model), before)  # nothing was touched
