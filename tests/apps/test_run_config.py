"""The run config: pyproject defaults and RunConfig agree, bad values are named."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from clair_flower.server_apps.run_config import ConfigError, RunConfig

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_pyproject_defaults_match_runconfig() -> None:
    table = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert set(table) == set(RunConfig().to_mapping())
    assert RunConfig.from_mapping(table) == RunConfig()


@pytest.mark.parametrize(("key", "value", "message"), [
    ("attack-fraction", 0.5, "contaminated minority"),
    ("model-width", 65, "divisible by model-heads"),
    ("max-len", 2, "max-len"),
    ("clair-c", "big", "clair-c"),
    ("fraction-train", 0.0, "fraction-train"),
    ("use-rslora", 1, "true or false"),
    ("attack", "poison", "sign-flip"),
])
def test_bad_values_name_the_key(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping({key: value})


def test_defaults_are_the_core_dataclasses_defaults() -> None:
    """RunConfig takes its defaults from the core's config objects: one place to change them."""
    from clair_flower.clair.config import ClairConfig
    from clair_flower.copytask.model import LoraSpec
    from clair_flower.copytask.task import TaskConfig
    from clair_flower.copytask.training import TrainConfig
    from clair_flower.server_apps.run_config import lora_spec, task_config, train_config

    cfg = RunConfig()
    assert task_config(cfg) == TaskConfig()
    assert lora_spec(cfg) == LoraSpec()
    assert train_config(cfg) == TrainConfig()
    assert (cfg.clair_policy, cfg.clair_no_structure, cfg.clair_solver) == (
        ClairConfig().flagged_policy, ClairConfig().no_structure, ClairConfig().solver)


def test_strategy_names_are_the_builders() -> None:
    from clair_flower.server_apps.strategy_factory import BUILDERS

    for name in BUILDERS:
        assert RunConfig(strategy=name).strategy == name
    with pytest.raises(ConfigError, match="clair-rolora"):
        RunConfig(strategy="clair2")
    with pytest.raises(ConfigError, match="clair-no-structure"):
        RunConfig(clair_no_structure="median")
