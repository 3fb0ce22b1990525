"""Shared fixtures: one base-model cache per test session, Flower's task identity."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pre-train the base model at most once per session (or reuse CLAIR_FLOWER_CACHE)."""
    if "CLAIR_FLOWER_CACHE" not in os.environ:
        os.environ["CLAIR_FLOWER_CACHE"] = str(tmp_path_factory.mktemp("model-cache"))
    return Path(os.environ["CLAIR_FLOWER_CACHE"])


@pytest.fixture()
def task_identity() -> None:
    """Instruction messages need a run id, which only the Flower runtime sets."""
    from clair_flower.server_apps.inprocess import set_task_identity

    set_task_identity()
