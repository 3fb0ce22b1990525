"""Record conversions keep what Flower needs exact."""

import numpy as np

from clair_flower.strategies.records import from_arrayrecord, to_arrayrecord, to_metricrecord


def test_node_ids_survive_a_metricrecord() -> None:
    ids = [17929489690794424321, 7601262476215599123]  # Ray node ids are 64-bit
    record = to_metricrecord({"flagged-node-ids": ids, "votes": [np.float32(0.5), 1], "n": np.int64(3)})
    assert record["flagged-node-ids"] == ids
    assert record["votes"] == [0.5, 1.0] and record["n"] == 3


def test_arrayrecord_round_trip_keeps_peft_keys() -> None:
    state = {"m.q_proj.lora_A.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}
    back = from_arrayrecord(to_arrayrecord(state))
    assert list(back) == list(state)
    np.testing.assert_array_equal(back["m.q_proj.lora_A.weight"], state["m.q_proj.lora_A.weight"])


# -- the round's MetricRecord, detail and INFO line (issue 20, item 3) --------------------------

import logging  # noqa: E402

import pytest  # noqa: E402

from clair_flower.strategies.records import RoundReporting, client_names, partition_ids, scalar_metrics  # noqa: E402
from clair_flower.strategies.uploads import ScreenReport, Upload  # noqa: E402


def test_round_metricrecord_keeps_scalars_and_drops_identities() -> None:
    metrics = {"num-flagged": 2, "lambda": np.float32(0.5), "solver-ok": np.bool_(True), "votes": [0.1, 0.9],
               "flagged-node-ids": [17929489690794424321], "clair-decision": "vote", "thresholds": {"vote": 0.5},
               "partition-id": 4.5, "num-partitions": 10}
    assert scalar_metrics(metrics) == {"num-flagged": 2, "lambda": 0.5, "solver-ok": 1}


def test_clients_are_named_by_partition_when_they_report_one() -> None:
    uploads = [Upload(11, {}, 1.0, {"partition-id": 2}), Upload(12, {}, 1.0, {"partition-id": 4.0}),
               Upload(13, {}, 1.0, {}), Upload(14, {}, 1.0, {"partition-id": 1.5})]
    pids = partition_ids(uploads)
    assert pids == {11: 2, 12: 4}  # no id, and a non-integer one, are not partitions
    assert client_names([12, 11], pids) == "partitions [2, 4]"
    assert client_names([13], pids) == "nodes [13]"
    assert client_names([13, 11], pids) == "[partition 2, node 13]"
    assert client_names([], pids) == "none"


class _Reporter(RoundReporting):
    pass


def test_report_round_logs_one_line_and_keeps_the_detail(caplog: pytest.LogCaptureFixture) -> None:
    reporter = _Reporter()
    report = ScreenReport(accepted=[Upload(11, {}, 1.0, {"partition-id": 0}), Upload(12, {}, 1.0, {"partition-id": 1})],
                          rejected={99: "contains NaN or Inf"})
    with caplog.at_level(logging.INFO, logger="flwr"):
        record = reporter.report_round(3, report, {"num-accepted": 2, "rejected-node-ids": [99]}, 0.25)
    lines = [r.getMessage() for r in caplog.records if "round 3" in r.getMessage()]
    assert lines == ["_Reporter round 3: aggregated 2 of 3 clients, rejected nodes [99], server 0.25 s"]
    assert dict(record) == {"num-accepted": 2, "server-seconds": 0.25}
    assert reporter.round_details[3]["rejected-node-ids"] == [99]
    assert reporter.partition_of == {11: 0, 12: 1}


def test_clair_round_line_names_the_rule_the_partitions_and_a_failed_round() -> None:
    from clair_flower.strategies.clair import ClairStrategy
    from clair_flower.strategies.clair_rolora import ClairRoLoRA

    strategy = ClairStrategy(lora_alpha=8)
    strategy.partition_of.update({11: 2, 12: 4})
    report = ScreenReport(accepted=[Upload(n, {}, 1.0, {}) for n in (11, 12, 13)])
    decided = {"clair-decision": "fallback", "flagged-node-ids": [12, 11], "trusted-get": "mean",
               "server-seconds": 1.5, "clair-seconds": 1.25, "clair-note": ""}
    assert strategy.round_line(2, report, decided) == (
        "CLAIR round 2: decided by fallback, flagged partitions [2, 4], trusted clients get mean, "
        "server 1.50 s (CLAIR 1.25 s)")
    unknown = {**decided, "flagged-node-ids": [13]}
    assert "flagged nodes [13]," in strategy.round_line(2, report, unknown)
    failed = {"clair-fallback": 1, "clair-fallback-reason": "2 usable uploads, CLAIR needs 3",
              "server-seconds": 0.01, "clair-note": " (B)"}
    assert ClairRoLoRA(lora_alpha=8).round_line(5, ScreenReport(rejected={13: "NaN"}), failed) == (
        "CLAIR-RoLoRA round 5 (B): not decided (2 usable uploads, CLAIR needs 3), round skipped, "
        "rejected nodes [13], server 0.01 s")
