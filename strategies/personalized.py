"""Base class for strategies that keep one LoRA adapter per node on the server.

FedAvg broadcasts one RecordDict to every node. Personalised strategies (local-only,
CLAIR) instead build one Message per node, each with its own RecordDict holding that node's
adapter; a node seen for the first time gets the current consensus. Replies are keyed by
``src_node_id`` since they arrive in any order.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Mapping
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log

from strategies.state import StrategyState
from strategies.records import ARRAYS_KEY, CONFIG_KEY, NUM_EXAMPLES, from_arrayrecord, to_arrayrecord, to_metricrecord
from strategies.screen import ReplyScreen, template_of
from strategies.uploads import ScreenReport, Upload, common_scalar_metrics

State = dict[str, np.ndarray]


class PersonalizedLoraStrategy(Strategy):
    """Send every node its own adapter and let subclasses decide how uploads update them.

    Parameters
    ----------
    fraction_train, fraction_evaluate : float
        Fraction of connected nodes sampled for training / evaluation.
    min_train_nodes, min_evaluate_nodes, min_available_nodes : int
        Lower bounds, as in Flower's FedAvg.
    screen : ReplyScreen, optional
        Checks applied to every train and evaluate reply before it is used (by default one
        reading ``arrayrecord_key``).
    arrayrecord_key, configrecord_key : str
        Record names in the messages sent (FlowerTune convention: ``"arrays"``, ``"config"``).
    """

    def __init__(self, *, fraction_train: float = 1.0, fraction_evaluate: float = 1.0,
                 min_train_nodes: int = 2, min_evaluate_nodes: int = 2,
                 min_available_nodes: int = 2, screen: ReplyScreen | None = None,
                 arrayrecord_key: str = ARRAYS_KEY, configrecord_key: str = CONFIG_KEY) -> None:
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_train_nodes = min_train_nodes
        self.min_evaluate_nodes = min_evaluate_nodes
        self.min_available_nodes = min_available_nodes
        self.arrayrecord_key = arrayrecord_key
        self.configrecord_key = configrecord_key
        self.screen = screen or ReplyScreen(arrayrecord_key=arrayrecord_key)
        self.adapters: dict[int, State] = {}
        self.consensus: State | None = None
        self.last_report = ScreenReport()
        self.last_eval_rejected: dict[int, str] = {}

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
            ``per_client["adapters"]`` keyed by node id, ``shared["consensus"]`` once set.
        """
        shared = {} if self.consensus is None else {"consensus": dict(self.consensus)}
        return StrategyState(shared=shared,
                             per_client={"adapters": {n: dict(s) for n, s in self.adapters.items()}})

    def restore_state(self, state: StrategyState) -> None:
        """Take back the adapters and consensus of :meth:`export_state` (node ids remapped)."""
        self.adapters = {int(n): dict(s) for n, s in state.per_client.get("adapters", {}).items()}
        consensus = state.shared.get("consensus")
        self.consensus = dict(consensus) if consensus is not None else None

    # -- shared machinery ----------------------------------------------------------------
    def adapter_for(self, node_id: int) -> State:
        """The adapter a node trains from: its own, or the consensus for a new node."""
        if node_id in self.adapters:
            return self.adapters[node_id]
        assert self.consensus is not None, "configure_train sets the consensus first"
        return self.consensus

    def _sample(self, grid: Grid, fraction: float, minimum: int) -> list[int]:
        if fraction == 0.0:
            return []
        total = len(list(grid.get_node_ids()))
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, max(int(total * fraction), minimum))
        return sorted(node_ids)

    def _messages(self, server_round: int, node_ids: list[int], config: ConfigRecord,
                  message_type: str) -> list[Message]:
        out = []
        for nid in node_ids:
            content = RecordDict({
                self.arrayrecord_key: to_arrayrecord(self.adapter_for(nid)),
                self.configrecord_key: ConfigRecord({**dict(config), "server-round": server_round}),
            })
            out.append(Message(content=content, dst_node_id=nid, message_type=message_type,
                               group_id=str(server_round)))
        return out

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.consensus is None:
            self.consensus = from_arrayrecord(arrays)
        node_ids = self._sample(grid, self.fraction_train, self.min_train_nodes)
        log(INFO, "configure_train: %d nodes, each with its own adapter", len(node_ids))
        return self._messages(server_round, node_ids, config, MessageType.TRAIN)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self.consensus is not None
        report = self.screen.train(list(replies), template_of(self.consensus))
        self.last_report = report
        metrics: dict[str, object] = dict(report.metrics())
        if report.accepted:
            metrics.update(self.update_adapters(server_round, report.accepted))
            metrics.update(_weighted_train_metrics(report.accepted))
        return to_arrayrecord(self.consensus), to_metricrecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if self.consensus is None:
            self.consensus = from_arrayrecord(arrays)
        node_ids = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes)
        return self._messages(server_round, node_ids, config, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        ok, bad = self.screen.evaluate(list(replies))
        self.last_eval_rejected = bad
        if not ok:
            return None
        keys = [k for k in common_scalar_metrics([m for _, m in ok]) if k != NUM_EXAMPLES]
        weights = np.array([float(m[NUM_EXAMPLES]) for _, m in ok])  # type: ignore[arg-type]
        weights /= weights.sum()
        return to_metricrecord({k: float(sum(w * float(m[k]) for w, (_, m) in zip(weights, ok))) for k in keys})  # type: ignore[arg-type]

    def summary(self) -> None:
        log(INFO, "\t├──> Sampling: fraction train %.2f | evaluate %.2f", self.fraction_train, self.fraction_evaluate)
        log(INFO, "\t├──> Minimum nodes: train %d | evaluate %d | available %d",
            self.min_train_nodes, self.min_evaluate_nodes, self.min_available_nodes)
        log(INFO, "\t├──> Reply screen: max norm ratio %g, any rank %s",
            self.screen.max_norm_ratio, self.screen.any_rank)


def _weighted_train_metrics(uploads: list[Upload]) -> dict[str, float]:
    """num-examples-weighted mean of the scalar train metrics all uploads share."""
    keys = [k for k in common_scalar_metrics([u.metrics for u in uploads]) if k != NUM_EXAMPLES]
    w = np.array([u.num_examples for u in uploads])
    w = w / w.sum()
    return {k: float(sum(wi * float(u.metrics[k]) for wi, u in zip(w, uploads))) for k in keys}  # type: ignore[arg-type]


def weighted_mean_state(states: list[Mapping[str, np.ndarray]], weights: list[float]) -> State:
    """Weighted mean of state dicts with identical keys and shapes (FedAvg on factors)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    return {k: sum(wi * np.asarray(s[k], dtype=np.float64) for wi, s in zip(w, states)).astype(np.float32)
            for k in states[0]}
