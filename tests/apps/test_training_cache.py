"""The grid's training cache: strategies share identical local trainings, with identical results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clair_flower.client_apps import training_cache
from clair_flower.server_apps import experiments
from clair_flower.server_apps.run_config import ConfigError, RunConfig

GRID = """
name = "cache"
num-nodes = 3
headline-fraction = 0.3
headline-rank = 2

[run-config]
protocol = "one-shot"
num-server-rounds = 1
local-steps = 3
num-train = 8
num-test = 8

[[grid]]
strategy = ["local", "fedavg", "clair"]
attack = ["sign-flip"]
attack-fraction = [0.3]
lora-rank = [2]
"""

FIGURES = ("final-benign-token-acc", "final-benign-exact-acc", "final-train-token-acc", "train-plateau-gain",
           "final-tpr", "final-fpr")


def _run(tmp_path: Path, name: str, *flags: str) -> tuple[dict[str, dict], Path]:
    grid, out = tmp_path / "grid.toml", tmp_path / name
    grid.write_text(GRID)
    assert experiments.main([str(grid), "--out", str(out), *flags]) == 0
    rows = experiments.run_grid(experiments.load_grid(grid, out).cells, out, emit=lambda _: None)
    return {r["strategy"]: r for r in rows}, out


def test_cached_grid_trains_each_client_once_and_matches_the_uncached_grid(tmp_path: Path) -> None:
    cached, out = _run(tmp_path, "cached")
    plain, plain_out = _run(tmp_path, "plain", "--no-train-cache")
    for strategy in cached:
        for key in FIGURES:
            assert cached[strategy].get(key) == plain[strategy].get(key), (strategy, key)
    # 3 clients, trained once for 3 strategies (the sign-flip client trains clean, then poisons)
    assert len(list((out / "train-cache").glob("*.npz"))) == 3
    assert not (plain_out / "train-cache").exists()


def test_key_changes_with_anything_training_reads_and_not_with_the_strategy() -> None:
    cfg = RunConfig()
    arrays = {"a.lora_A.weight": np.zeros((2, 4), np.float32)}
    kw = dict(partition=0, num_partitions=3, server_round=1, trainable="both", contaminated=False)
    key = training_cache.training_key(cfg, arrays, **kw)
    assert training_cache.training_key(cfg.replace(strategy="clair", clair_c="2.0"), arrays, **kw) == key
    # a benign client trains alike under every attack; a contaminated one does not
    assert training_cache.training_key(cfg.replace(attack="reversed", attack_fraction=0.3), arrays, **kw) == key
    bad = {**kw, "contaminated": True}
    assert (training_cache.training_key(cfg.replace(attack="reversed", attack_fraction=0.3), arrays, **bad)
            != training_cache.training_key(cfg.replace(attack="random", attack_fraction=0.3), arrays, **bad))
    changed = [training_cache.training_key(cfg.replace(seed=1), arrays, **kw),
               training_cache.training_key(cfg.replace(learning_rate=0.01), arrays, **kw),
               training_cache.training_key(cfg, {"a.lora_A.weight": np.ones((2, 4), np.float32)}, **kw),
               training_cache.training_key(cfg, arrays, **{**kw, "server_round": 2}),
               training_cache.training_key(cfg, arrays, **{**kw, "trainable": "B"}),
               training_cache.training_key(cfg, arrays, **{**kw, "contaminated": True})]
    assert key not in changed and len(set(changed)) == len(changed)


def test_cache_dir_must_be_absolute() -> None:
    with pytest.raises(ConfigError, match="train-cache-dir must be an absolute path"):
        RunConfig.from_mapping({"train-cache-dir": "cache"})
