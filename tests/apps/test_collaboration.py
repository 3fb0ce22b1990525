"""Collaboration helps on the copy task, measured through the real apps (in-process Grid)."""

from __future__ import annotations

import pytest

from tests.apps.helpers import run_inprocess


@pytest.mark.slow
def test_fedavg_beats_local_only_in_process(tmp_path) -> None:
    rounds = {"num-server-rounds": 5, "local-steps": 20}
    fedavg = run_inprocess(tmp_path / "fedavg", 10, strategy="fedavg", **rounds)
    local = run_inprocess(tmp_path / "local", 10, strategy="local", **rounds)
    print({"fedavg": fedavg["final-benign-token-acc"], "local": local["final-benign-token-acc"]})
    # 10 clients x 128 held-out sequences each: 0.05 is far outside run-to-run noise.
    assert fedavg["final-benign-token-acc"] >= local["final-benign-token-acc"] + 0.05
