"""lora.py against real PEFT modules: orientation (Linear vs GPT-2 Conv1D) and scaling."""

import numpy as np
import pytest
import torch

from clair_flower.lora import factors_from_state_dict, lora_scaling, refactor
from clair_flower.copytask.model import LoraSpec, ModelConfig, build_model, wrap_lora
from clair_flower.copytask.peft_io import get_adapter_arrays, set_adapter_arrays
from clair_flower.copytask.task import TaskConfig

TASK = TaskConfig(vocab_size=8, min_len=2, max_len=4)


def _model(arch, rank, alpha, rslora):
    cfg = ModelConfig(arch=arch, n_layer=2, n_embd=16, n_head=2, max_positions=16)
    base = build_model(cfg, TASK)
    base_weights = {k: v.detach().clone() for k, v in base.state_dict().items()}
    model = wrap_lora(base, LoraSpec(rank=rank, alpha=alpha, use_rslora=rslora), seed=1)
    rng = np.random.default_rng(0)
    arrays = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in get_adapter_arrays(model).items()}
    set_adapter_arrays(model, arrays)  # nonzero B, so dW != 0
    return model, base_weights, arrays


def _base_key(module: str) -> str:
    # "base_model.model.transformer.h.0.attn.c_attn" -> "transformer.h.0.attn.c_attn.weight"
    return module.removeprefix("base_model.model.") + ".weight"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("rslora", [False, True])
def test_dW_matches_peft_merge(arch, rslora):
    rank, alpha = 3, 5.0
    model, base_weights, arrays = _model(arch, rank, alpha, rslora)
    factors = factors_from_state_dict(arrays, alpha, use_rslora=rslora)
    assert factors and all(f.scaling == lora_scaling(alpha, rank, rslora) for f in factors.values())
    merged = model.merge_and_unload().state_dict()
    for name, f in factors.items():
        key = _base_key(name)
        change = (merged[key] - base_weights[key]).double().numpy()
        # Conv1D stores (in, out): the weight changes by dW.T; nn.Linear by dW.
        expected = f.dense().T if arch == "gpt2" else f.dense()
        assert change.shape == expected.shape
        np.testing.assert_allclose(change, expected, rtol=1e-4, atol=1e-5)
        assert np.abs(expected).max() > 1e-2


def test_gpt2_targets_are_conv1d_and_llama_linear():
    gpt2, _, _ = _model("gpt2", 2, 4.0, False)
    llama, _, _ = _model("llama", 2, 4.0, False)
    from transformers.pytorch_utils import Conv1D

    assert any(isinstance(m.base_layer, Conv1D) for m in gpt2.modules() if hasattr(m, "lora_A"))
    assert all(isinstance(m.base_layer, torch.nn.Linear) for m in llama.modules() if hasattr(m, "lora_A"))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_refactor_round_trips_through_peft(arch):
    rank, alpha = 3, 6.0
    model, _, arrays = _model(arch, rank, alpha, False)
    factors = factors_from_state_dict(arrays, alpha)
    out = {}
    for name, f in factors.items():
        g, err = refactor(f.dense(), rank, f.scaling)
        assert err < 1e-6
        np.testing.assert_allclose(g.dense(), f.dense(), rtol=1e-4, atol=1e-5)
        out[name + ".lora_A.weight"], out[name + ".lora_B.weight"] = g.A, g.B
    set_adapter_arrays(model, out)  # re-factored adapter fits PEFT's shapes exactly
    back = factors_from_state_dict(get_adapter_arrays(model), alpha)
    for name in factors:
        np.testing.assert_allclose(back[name].dense(), factors[name].dense(), rtol=1e-4, atol=1e-5)
