"""What the reply screen hands on: accepted uploads, and the reason for every rejected node.

These are plain data: no Flower records, no checks. :mod:`clair_flower.strategies.screen` builds them from
the replies of a round; every strategy of this package aggregates from them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Upload:
    """A train reply that passed the screen: who sent what, and with which weight."""

    node_id: int
    state: dict[str, np.ndarray]
    num_examples: float
    metrics: dict[str, object]


@dataclass
class ScreenReport:
    """Accepted uploads, the reason for every rejected node, and the surplus replies.

    ``duplicates`` counts the replies beyond one per node (a node that replied three times
    adds 2); such a node is in ``rejected`` too (see :class:`clair_flower.strategies.screen.ReplyScreen`).
    """

    accepted: list[Upload] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    duplicates: int = 0

    def metrics(self) -> dict[str, object]:
        """The screen's part of a round's metrics."""
        return {"num-accepted": len(self.accepted), "num-rejected": len(self.rejected),
                "rejected-node-ids": sorted(self.rejected), "duplicate-replies": self.duplicates}


def common_scalar_metrics(metrics: Sequence[Mapping[str, object]]) -> list[str]:
    """Scalar metric keys every reply has: the only ones Flower's FedAvg can average."""
    if not metrics:
        return []
    keys = set.intersection(*(set(m) for m in metrics))
    return sorted(k for k in keys if all(not isinstance(m[k], list) for m in metrics))
