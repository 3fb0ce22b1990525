"""Base model: seeded construction, the on-disk cache (atomic, locked), LoRA wrapping."""

import multiprocessing as mp
import os
import time

import numpy as np
import pytest
import torch

import clair_flower.copytask.model as model_mod
from clair_flower.copytask.model import (
    LoraSpec, ModelConfig, build_model, cache_path, default_cache_dir, load_base_model, wrap_lora,
)
from clair_flower.copytask.peft_io import get_adapter_arrays
from clair_flower.copytask.task import TaskConfig, restricted_eval_set
from clair_flower.copytask.training import evaluate

TASK = TaskConfig(vocab_size=8, min_len=2, max_len=4)
TINY = ModelConfig(n_layer=1, n_embd=16, n_head=2, max_positions=16, pretrain_steps=10, pretrain_batch=8)


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_build_model_is_seeded(arch):
    cfg = ModelConfig(arch=arch, n_layer=1, n_embd=16, n_head=2, max_positions=16)
    assert _same(build_model(cfg, TASK), build_model(cfg, TASK))
    other = ModelConfig(arch=arch, n_layer=1, n_embd=16, n_head=2, max_positions=16, seed=1)
    assert not _same(build_model(cfg, TASK), build_model(other, TASK))


def test_positions_must_fit():
    with pytest.raises(ValueError):
        build_model(ModelConfig(max_positions=8), TaskConfig(max_len=8))


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CLAIR_FLOWER_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("CLAIR_FLOWER_CACHE")
    assert default_cache_dir().name == "clair-flower"


def test_cache_key_tracks_pretrain_fields(tmp_path):
    p = cache_path(TINY, TASK, tmp_path)
    assert p == cache_path(TINY, TaskConfig(vocab_size=8, min_len=2, max_len=4, num_train=3), tmp_path)
    assert p != cache_path(TINY, TaskConfig(vocab_size=8, min_len=2, max_len=4, seed=1), tmp_path)
    assert p != cache_path(ModelConfig(**{**TINY.__dict__, "pretrain_steps": 11}), TASK, tmp_path)
    assert p.suffix == ".safetensors"


def test_second_load_hits_cache(tmp_path, monkeypatch):
    first = load_base_model(TINY, TASK, tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert [f for f in files if f.endswith(".safetensors")] == [cache_path(TINY, TASK, tmp_path).name]
    assert not [f for f in files if f.endswith(".tmp")]
    monkeypatch.setattr(model_mod, "pretrain", lambda *a, **k: pytest.fail("pre-trained twice"))
    t = time.perf_counter()
    second = load_base_model(TINY, TASK, tmp_path)
    assert time.perf_counter() - t < 5.0
    assert _same(first, second)
    with open(cache_path(TINY, TASK, tmp_path), "rb") as fh:
        assert not fh.read(64).startswith(b"\x80")  # not a pickle


def test_pretraining_is_deterministic(tmp_path):
    a = load_base_model(TINY, TASK, tmp_path / "a")
    b = load_base_model(TINY, TASK, tmp_path / "b")
    assert _same(a, b)


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def broken_save(model, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(model_mod, "save_model", broken_save)
    with pytest.raises(OSError):
        load_base_model(TINY, TASK, tmp_path)
    assert not cache_path(TINY, TASK, tmp_path).exists()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_file_appears_only_complete(tmp_path, monkeypatch):
    """While the temp file is written, the final path does not exist yet."""
    seen = {}
    real_save = model_mod.save_model

    def spying_save(model, filename, metadata=None):
        seen["final_exists_during_write"] = cache_path(TINY, TASK, tmp_path).exists()
        seen["tmp_dir"] = os.path.dirname(filename)
        real_save(model, filename, metadata=metadata)

    monkeypatch.setattr(model_mod, "save_model", spying_save)
    load_base_model(TINY, TASK, tmp_path)
    assert seen == {"final_exists_during_write": False, "tmp_dir": str(tmp_path)}


def _load_in_child(cache_dir, queue):
    model = load_base_model(TINY, TASK, cache_dir)
    queue.put({k: v.numpy().copy() for k, v in model.state_dict().items()})


@pytest.mark.slow  # two spawned interpreters import torch: ~10 s idle, ~60 s on a loaded box
def test_concurrent_loads_produce_one_valid_file(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_load_in_child, args=(str(tmp_path), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    files = [f for f in os.listdir(tmp_path) if not f.endswith(".lock")]
    assert files == [cache_path(TINY, TASK, tmp_path).name]
    assert all(np.array_equal(results[0][k], results[1][k]) for k in results[0])
    assert _same(load_base_model(TINY, TASK, tmp_path), load_base_model(TINY, TASK, tmp_path))


def test_wrap_lora_is_deterministic_and_fresh():
    base_a, base_b = build_model(TINY, TASK), build_model(TINY, TASK)
    a = get_adapter_arrays(wrap_lora(base_a, LoraSpec(rank=2), seed=3))
    b = get_adapter_arrays(wrap_lora(base_b, LoraSpec(rank=2), seed=3))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert all(not v.any() for k, v in a.items() if ".lora_B." in k)  # B starts at zero
    assert any(v.any() for k, v in a.items() if ".lora_A." in k)
    c = get_adapter_arrays(wrap_lora(build_model(TINY, TASK), LoraSpec(rank=2), seed=4))
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_default_targets():
    peft_model = wrap_lora(build_model(TINY, TASK))
    names = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in get_adapter_arrays(peft_model)}
    assert names == {"c_attn", "c_proj", "c_fc"}


@pytest.mark.slow
def test_default_base_model_copies_seen_vocab_not_unseen():
    """Decent on the restricted task, poor on the unseen half: fine-tuning has work to do."""
    cfg = TaskConfig()
    model = load_base_model(ModelConfig(), cfg)
    seen = evaluate(model, *restricted_eval_set(cfg, 256, seen=True))
    unseen = evaluate(model, *restricted_eval_set(cfg, 256, seen=False))
    assert seen["token-acc"] > 0.9
    assert unseen["token-acc"] < 0.1
