"""Base class for strategies that keep one LoRA adapter per node on the server.

FedAvg broadcasts one RecordDict to every node. Personalised strategies (local-only,
CLAIR) instead build one Message per node, each with its own RecordDict holding that node's
adapter; a node seen for the first time gets the current consensus. Replies are keyed by
``src_node_id`` since they arrive in any order. Sampling, messages, the reply screen and the
metric means are :class:`~clair_flower.strategies.base.LoraStrategy`'s.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from flwr.app import ArrayRecord

from clair_flower.strategies.base import LoraStrategy, State, weighted_mean_state
from clair_flower.strategies.records import from_arrayrecord, to_arrayrecord
from clair_flower.strategies.screen import Template, template_of
from clair_flower.strategies.state import StrategyState
from clair_flower.strategies.uploads import ScreenReport, Upload

__all__ = ["PersonalizedLoraStrategy", "State", "weighted_mean_state"]


class PersonalizedLoraStrategy(LoraStrategy):
    """Send every node its own adapter and let subclasses decide how uploads update them.

    Parameters are :class:`~clair_flower.strategies.base.LoraStrategy`'s (sampling, record keys, screen).
    The global arrays a round returns are the consensus.
    """

    def __init__(self, **kwargs: Any) -> None:  # noqa: D107 - LoraStrategy's parameters
        super().__init__(**kwargs)
        self.adapters: dict[int, State] = {}
        self.consensus: State | None = None

    # -- what subclasses provide -------------------------------------------------------
    @abstractmethod
    def update_adapters(self, server_round: int, uploads: list[Upload]) -> dict[str, object]:
        """Fold this round's accepted uploads into ``self.adapters``/``self.consensus``.

        Returns the round's strategy metrics (plain python values).
        """

    # -- checkpoint ----------------------------------------------------------------------
    def export_state(self) -> StrategyState:
        """Per-node adapters and the consensus, for a checkpoint.

        Returns
        -------
        StrategyState
            ``per_client["adapters"]`` keyed by node id, ``shared["consensus"]`` once set, the
            communication totals in ``meta``.
        """
        state = super().export_state()
        if self.consensus is not None:
            state.shared["consensus"] = dict(self.consensus)
        state.per_client["adapters"] = {n: dict(s) for n, s in self.adapters.items()}
        return state

    def restore_state(self, state: StrategyState) -> None:
        """Take back the adapters and consensus of :meth:`export_state` (node ids remapped)."""
        super().restore_state(state)
        self.adapters = {int(n): dict(s) for n, s in state.per_client.get("adapters", {}).items()}
        consensus = state.shared.get("consensus")
        self.consensus = dict(consensus) if consensus is not None else None

    # -- LoraStrategy's hooks ------------------------------------------------------------
    def adapter_for(self, node_id: int) -> State:
        """The adapter a node trains from: its own, or the consensus for a new node."""
        if node_id in self.adapters:
            return self.adapters[node_id]
        assert self.consensus is not None, "configure_train sets the consensus first"
        return self.consensus

    def begin_train(self, server_round: int, arrays: ArrayRecord) -> None:
        if self.consensus is None:
            self.consensus = from_arrayrecord(arrays)

    begin_evaluate = begin_train

    def node_arrays(self, node_id: int, arrays: ArrayRecord) -> ArrayRecord:
        return to_arrayrecord(self.adapter_for(node_id))

    def train_plan(self, server_round: int) -> str:
        return ", each with its own adapter"

    def train_template(self, server_round: int) -> Template:
        assert self.consensus is not None, "configure_train sets the consensus first"
        return template_of(self.consensus)

    def aggregate_uploads(self, server_round: int, report: ScreenReport
                          ) -> tuple[ArrayRecord | None, dict[str, object]]:
        metrics: dict[str, object] = dict(report.metrics())
        if report.accepted:
            metrics.update(self.update_adapters(server_round, report.accepted))
            metrics.update(self.train_metric_means(report.accepted))
        assert self.consensus is not None
        return to_arrayrecord(self.consensus), metrics
