"""CLAIR through the real apps: the flagged set is the contaminated set."""

from __future__ import annotations

import json

import pytest

from tests.apps.helpers import run_inprocess


@pytest.mark.slow
def test_clair_flags_exactly_the_contaminated_clients(tmp_path) -> None:
    summary = run_inprocess(tmp_path, 10, strategy="clair", attack="random",
                            **{"attack-fraction": 0.3, "num-server-rounds": 3, "local-steps": 20})
    rounds = [json.loads(x) for x in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    truth = {int(p) for p, c in rounds[-1]["clients"].items() if c["contaminated"]}
    assert len(truth) == 3
    for r in rounds[1:]:  # from round 2 on
        assert set(r["flagged-partitions"]) == truth, r["round"]
        assert r["tpr"] == 1.0 and r["fpr"] == 0.0
    assert summary["mean-server-seconds-per-round"] > 0
