"""Conversions between Flower records and the numpy state dicts the core works on, and what a
train round hands back to Flower (scalars only) and to the log (one INFO line)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord
from flwr.supercore import log

# The protocol's keys live in clair_flower.strategies.protocol; re-exported for callers of the old names.
from clair_flower.strategies.protocol import (ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES,  # noqa: F401
                                             NUM_PARTITIONS, PARTITION_ID)
from clair_flower.strategies.uploads import ScreenReport, Upload


def to_arrayrecord(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Wrap a state dict, keeping PEFT's key names (FlowerTune convention)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def from_arrayrecord(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Unwrap an ArrayRecord into ``key -> ndarray``."""
    return {k: v.numpy() for k, v in record.items()}


def metric_value(value: object) -> float | int | list[int] | list[float]:
    """Cast numpy scalars and sequences to the plain types a MetricRecord accepts."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    values = list(value)  # type: ignore[call-overload]
    if values and all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in values):
        return [int(v) for v in values]  # node ids are 64-bit: a float would lose them
    return [float(v) for v in values]


def to_metricrecord(metrics: Mapping[str, object]) -> MetricRecord:
    """A MetricRecord from a dict whose values may be numpy scalars or lists."""
    return MetricRecord({k: metric_value(v) for k, v in metrics.items()})


def state_nbytes(state: Mapping[str, np.ndarray]) -> int:
    """Payload size of a state dict, as counted for communication accounting."""
    return int(sum(np.asarray(v).nbytes for v in state.values()))


# -- one train round, as Flower sees it and as a reader of the log sees it ----------------------

IDENTITY_KEYS = (PARTITION_ID, NUM_PARTITIONS)
"""Reply metrics that name a client rather than measure it: never averaged into a round's metrics."""


def is_scalar(value: object) -> bool:
    """An int or float (numpy's included): what a round's MetricRecord may carry."""
    return isinstance(value, (int, float, np.integer, np.floating, np.bool_))


def scalar_metrics(metrics: Mapping[str, object]) -> dict[str, int | float]:
    """The scalar entries of a round's metrics, identity keys left out.

    Flower prints every MetricRecord a strategy returns (each round and again in the
    end-of-run dump), so per-client lists, strings and dicts stay in the strategy's
    :attr:`RoundReporting.round_details` and in ``rounds.jsonl``.
    """
    return {k: metric_value(v) for k, v in metrics.items()  # type: ignore[misc]
            if is_scalar(v) and k not in IDENTITY_KEYS}


def partition_ids(uploads: Iterable[Upload]) -> dict[int, int]:
    """Node id -> the ``partition-id`` its reply metrics carry (nodes that report none are left out).

    A partition id is what a user knows a client by; a Flower node id is a random 64-bit number.
    """
    out = {}
    for u in uploads:
        pid = u.metrics.get(PARTITION_ID)
        if is_scalar(pid) and float(pid) == int(pid):  # type: ignore[arg-type]
            out[u.node_id] = int(pid)  # type: ignore[arg-type]
    return out


def client_names(node_ids: Iterable[int], partition_of: Mapping[int, int]) -> str:
    """``partitions [2, 4, 6]`` when every node reported a partition id, ``nodes [...]`` when none
    did, one name per client otherwise; ``none`` for no client."""
    nids = sorted(int(n) for n in node_ids)
    if not nids:
        return "none"
    known = [n for n in nids if n in partition_of]
    if len(known) == len(nids):
        return f"partitions {sorted(partition_of[n] for n in nids)}"
    if not known:
        return f"nodes {nids}"
    return "[" + ", ".join(f"partition {partition_of[n]}" if n in partition_of else f"node {n}"
                           for n in nids) + "]"


class RoundReporting:
    """One INFO line per train round, the round's full detail on the strategy, scalars to Flower.

    A strategy calls :meth:`report_round` at the end of ``aggregate_train`` and returns what it
    gives: a MetricRecord of scalars only (see :func:`scalar_metrics`). The full metrics of the
    round (per-client lists included) are kept in :attr:`round_details`; node ids are named by the
    partition id their replies report (:attr:`partition_of`). A strategy changes its line by
    overriding :meth:`round_line`.
    """

    @property
    def round_details(self) -> dict[int, dict[str, object]]:
        """Every train round's full metrics (per-client lists included), by server round."""
        return self.__dict__.setdefault("_round_details", {})

    @property
    def partition_of(self) -> dict[int, int]:
        """Node id -> partition id, for every node whose train reply reported one."""
        return self.__dict__.setdefault("_partition_of", {})

    def report_round(self, server_round: int, report: ScreenReport, metrics: Mapping[str, object],
                     seconds: float) -> MetricRecord:
        """Keep the round's detail, log its one line, and return its scalars for Flower.

        Parameters
        ----------
        server_round : int
            The round ``aggregate_train`` was called for.
        report : ScreenReport
            The reply screen's outcome of the round (accepted uploads, rejected nodes).
        metrics : mapping
            The round's metrics, per-client lists and strings included.
        seconds : float
            Server time of the whole ``aggregate_train`` (screen and aggregation).
        """
        self.partition_of.update(partition_ids(report.accepted))
        detail = {**metrics, "server-seconds": float(seconds)}
        self.round_details[server_round] = detail
        log(INFO, "%s", self.round_line(server_round, report, detail))
        return to_metricrecord(scalar_metrics(detail))

    def round_line(self, server_round: int, report: ScreenReport, detail: Mapping[str, object]) -> str:
        """The round's INFO line: the clients aggregated, those rejected, the server seconds."""
        total = len(report.accepted) + len(report.rejected)
        return (f"{self.round_label()} round {server_round}: aggregated {len(report.accepted)} of {total} "
                f"clients{self.rejected_text(report)}, server {float(detail['server-seconds']):.2f} s")  # type: ignore[arg-type]

    def round_label(self) -> str:
        """Name of the strategy in its round line (the class name)."""
        return type(self).__name__

    def rejected_text(self, report: ScreenReport) -> str:
        """``, rejected partitions [3]`` (empty when the screen rejected nobody)."""
        return f", rejected {client_names(report.rejected, self.partition_of)}" if report.rejected else ""
