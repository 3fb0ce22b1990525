"""Conversions between Flower records and the numpy state dicts the core works on."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord

# The protocol's keys live in clair_flower.strategies.protocol; re-exported for callers of the old names.
from clair_flower.strategies.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES  # noqa: F401


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
