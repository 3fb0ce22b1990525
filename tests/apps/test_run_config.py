"""The run config: pyproject defaults and RunConfig agree, bad values are named."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from server_apps.run_config import ConfigError, RunConfig

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_pyproject_defaults_match_runconfig() -> None:
    table = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert set(table) == set(RunConfig().to_mapping())
    assert RunConfig.from_mapping(table) == RunConfig()


@pytest.mark.parametrize(("key", "value", "message"), [
    ("attack-fraction", 0.5, "contaminated minority"),
    ("model-width", 65, "divisible by model-heads"),
    ("max-len", 2, "max-len"),
    ("clair-lambda", "big", "clair-lambda"),
    ("fraction-train", 0.0, "fraction-train"),
    ("use-rslora", 1, "true or false"),
    ("attack", "poison", "sign-flip"),
])
def test_bad_values_name_the_key(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping({key: value})
