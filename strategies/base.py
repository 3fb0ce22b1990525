"""What every LoRA strategy of this package shares: Flower's sampling and metric plumbing, once.

:class:`LoraStrategy` is to the personalised family (:mod:`clair_flower.strategies.personalized`) and the
RoLoRA family (:mod:`clair_flower.strategies.rolora`) what Flower's ``FedAvg`` is to its subclasses: it
samples nodes as FedAvg does (``fraction * connected``, at least ``min_*_nodes``, waiting for
``min_available_nodes``), builds one message per node with the round in the config
(``"server-round"``), screens every reply (:class:`~clair_flower.strategies.screen.ReplyScreen`) and
reports the weighted mean of the metrics all replies share. It also counts the bytes every
message carries, both ways (:class:`~clair_flower.strategies.communication.CommunicationTracker`,
what FlowerTune's tracker gives FedAvg). A family decides only what each node is sent and how
accepted uploads become the new arrays.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log

from clair_flower.strategies.communication import STATE_KEY as COMM_STATE_KEY
from clair_flower.strategies.communication import CommunicationTracker
from clair_flower.strategies.protocol import (ARRAYS_KEY, CONFIG_KEY, LORA_ALPHA, METRICS_KEY, NUM_EXAMPLES,
                                             SERVER_ROUND, USE_RSLORA)
from clair_flower.strategies.records import RoundReporting, to_metricrecord
from clair_flower.strategies.screen import ReplyScreen, Template
from clair_flower.strategies.state import StrategyState
from clair_flower.strategies.uploads import ScreenReport, Upload, common_scalar_metrics

State = dict[str, np.ndarray]
ConfigValue = int | float | str | bool


def weighted_metric_mean(metrics: Sequence[Mapping[str, object]], weights: Sequence[float],
                         exclude: str = NUM_EXAMPLES) -> dict[str, float]:
    """Weighted mean of the scalar metrics all replies share, ``exclude`` left out (as
    Flower's FedAvg reports them). The one metric mean of this package."""
    keys = [k for k in common_scalar_metrics(metrics) if k != exclude]
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    return {k: float(sum(wi * float(m[k]) for wi, m in zip(w, metrics))) for k in keys}  # type: ignore[arg-type]


def weighted_mean_state(states: list[Mapping[str, np.ndarray]], weights: list[float]) -> State:
    """Weighted mean of state dicts with identical keys and shapes (FedAvg on factors)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    return {k: sum(wi * np.asarray(s[k], dtype=np.float64) for wi, s in zip(w, states)).astype(np.float32)
            for k in states[0]}


class LoraStrategy(RoundReporting, Strategy):
    """Sampling, messages, reply screen and metric means; subclasses aggregate.

    Parameters
    ----------
    fraction_train, fraction_evaluate : float
        Fraction of connected nodes sampled for training / evaluation (as in FedAvg).
    min_train_nodes, min_evaluate_nodes, min_available_nodes : int
        Lower bounds on sampled and connected nodes (as in FedAvg).
    weighted_by_key : str
        Scalar metric of every reply used as its weight (FedAvg's ``weighted_by_key``).
    arrayrecord_key, configrecord_key, metricrecord_key : str
        Record names in the messages (FlowerTune convention: ``"arrays"``, ``"config"``,
        ``"metrics"``).
    screen : ReplyScreen, optional
        Checks applied to every train and evaluate reply before it is used; by default one
        with ``max_norm_ratio``, ``any_rank`` and the record keys above.
    max_norm_ratio : float
        Sanity bound of the default screen (not a defence).
    any_rank : bool
        The default screen accepts LoRA factors of any rank (CLAIR handles mixed ranks).
    comm_budget_mb : float, optional
        Bytes of both directions, all rounds (MB of ``1024**2`` bytes, as FlowerTune's
        tracker), past which one WARNING is logged; ``None``: no budget. Every round's bytes
        are in the round metrics (``comm-bytes-*``) and in :attr:`communication`.
    """

    def __init__(self, *, fraction_train: float = 1.0, fraction_evaluate: float = 1.0,
                 min_train_nodes: int = 2, min_evaluate_nodes: int = 2, min_available_nodes: int = 2,
                 weighted_by_key: str = NUM_EXAMPLES, arrayrecord_key: str = ARRAYS_KEY,
                 configrecord_key: str = CONFIG_KEY, metricrecord_key: str = METRICS_KEY,
                 screen: ReplyScreen | None = None, max_norm_ratio: float = 1e3,
                 any_rank: bool = False, comm_budget_mb: float | None = None) -> None:
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_train_nodes = min_train_nodes
        self.min_evaluate_nodes = min_evaluate_nodes
        self.min_available_nodes = min_available_nodes
        self.weighted_by_key = weighted_by_key
        self.arrayrecord_key = arrayrecord_key
        self.configrecord_key = configrecord_key
        self.metricrecord_key = metricrecord_key
        self.screen = screen or ReplyScreen(any_rank=any_rank, max_norm_ratio=max_norm_ratio,
                                            arrayrecord_key=arrayrecord_key, metricrecord_key=metricrecord_key)
        self.last_report = ScreenReport()
        self.communication = CommunicationTracker(comm_budget_mb)

    # -- what a family provides ----------------------------------------------------------
    def begin_train(self, server_round: int, arrays: ArrayRecord) -> None:
        """Take this round's global arrays before nodes are sampled (default: nothing)."""

    def begin_evaluate(self, server_round: int, arrays: ArrayRecord) -> None:
        """As :meth:`begin_train`, for an evaluate round."""

    def node_arrays(self, node_id: int, arrays: ArrayRecord) -> ArrayRecord:
        """What ``node_id`` is sent (default: the global arrays, as FedAvg)."""
        return arrays

    def node_extra_records(self, node_id: int) -> dict[str, ArrayRecord]:
        """ArrayRecords sent to ``node_id`` besides its adapter (default: none; CLAIR's
        lossless downlink adds the merged delta)."""
        return {}

    def train_config(self, server_round: int) -> dict[str, ConfigValue]:
        """Entries added to the train ConfigRecord besides ``"server-round"`` (default: none)."""
        return {}

    def train_plan(self, server_round: int) -> str:
        """Tail of the ``configure_train`` log line (default: empty)."""
        return ""

    def before_train(self, server_round: int, node_ids: list[int], config: ConfigRecord, grid: Grid) -> None:
        """Ask the sampled nodes anything needed before their train messages (default: nothing).

        Whatever is sent here goes through :meth:`exchange`, so it is counted.
        """

    def observe_replies(self, server_round: int, replies: list[Message]) -> None:
        """See every train reply before the screen does (default: nothing)."""

    def exchange(self, server_round: int, grid: Grid, messages: list[Message]) -> list[Message]:
        """Send ``messages`` and wait for the replies, outside Flower's round (counted both ways)."""
        self.communication.sent(server_round, messages)
        replies = list(grid.send_and_receive(messages)) if messages else []
        self.communication.received(server_round, replies)
        return replies

    @abstractmethod
    def train_template(self, server_round: int) -> Template:
        """Key -> shape that a correct upload of ``server_round`` holds."""

    @abstractmethod
    def aggregate_uploads(self, server_round: int, report: ScreenReport
                          ) -> tuple[ArrayRecord | None, dict[str, object]]:
        """New global arrays (``None``: none this round) and the round's metrics."""

    # -- plumbing ------------------------------------------------------------------------
    def sample(self, grid: Grid, fraction: float, minimum: int) -> list[int]:
        """Node ids sampled as Flower's FedAvg samples them (sorted; none for fraction 0)."""
        if fraction == 0.0:
            return []
        num_nodes = int(len(list(grid.get_node_ids())) * fraction)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, max(num_nodes, minimum))
        return sorted(node_ids)

    def messages(self, server_round: int, node_ids: list[int], arrays: ArrayRecord, config: ConfigRecord,
                 message_type: str, extra: Mapping[str, ConfigValue] | None = None) -> list[Message]:
        """One message per node: its arrays (:meth:`node_arrays`) and ``config`` with the round."""
        out = []
        for nid in node_ids:
            cfg = ConfigRecord({**dict(config), SERVER_ROUND: server_round, **(extra or {})})
            content = RecordDict({self.arrayrecord_key: self.node_arrays(nid, arrays), **self.node_extra_records(nid),
                                  self.configrecord_key: cfg})
            out.append(Message(content=content, dst_node_id=nid, message_type=message_type,
                               group_id=str(server_round)))
        return out

    def upload_weights(self, uploads: list[Upload]) -> list[float]:
        """Each accepted upload's weight (``weighted_by_key`` of its metrics)."""
        if self.weighted_by_key == NUM_EXAMPLES:
            return [u.num_examples for u in uploads]
        return [float(u.metrics[self.weighted_by_key]) for u in uploads]  # type: ignore[arg-type]

    def train_metric_means(self, uploads: list[Upload]) -> dict[str, float]:
        """Weighted mean of the scalar train metrics all accepted uploads share (the LoRA
        settings clients report describe them, so a mean of them would mean nothing)."""
        means = weighted_metric_mean([u.metrics for u in uploads], self.upload_weights(uploads))
        return {k: v for k, v in means.items() if k not in (LORA_ALPHA, USE_RSLORA)}

    # -- Flower's Strategy ---------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.communication.start_phase()
        self.begin_train(server_round, arrays)
        node_ids = self.sample(grid, self.fraction_train, self.min_train_nodes)
        self.before_train(server_round, node_ids, config, grid)
        log(INFO, "configure_train: %d nodes%s", len(node_ids), self.train_plan(server_round))
        messages = self.messages(server_round, node_ids, arrays, config, MessageType.TRAIN,
                                 self.train_config(server_round))
        self.communication.sent(server_round, messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        t0 = time.perf_counter()
        replies = list(replies)
        self.communication.received(server_round, replies)
        self.observe_replies(server_round, replies)
        report = self.screen.train(replies, self.train_template(server_round))
        self.last_report = report
        arrays, metrics = self.aggregate_uploads(server_round, report)
        metrics = {**metrics, **self.communication.metrics()}
        # One INFO line, full detail in self.round_details, scalars to Flower (RoundReporting).
        return arrays, self.report_round(server_round, report, metrics, time.perf_counter() - t0)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        self.communication.start_phase()
        self.begin_evaluate(server_round, arrays)
        node_ids = self.sample(grid, self.fraction_evaluate, self.min_evaluate_nodes)
        messages = self.messages(server_round, node_ids, arrays, config, MessageType.EVALUATE)
        self.communication.sent(server_round, messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self.communication.received(server_round, replies)
        ok, _ = self.screen.evaluate(replies)  # the screen logs every rejected reply
        if not ok:
            return to_metricrecord(self.communication.metrics()) if replies else None
        metrics = [m for _, m in ok]
        weights = [float(m[self.weighted_by_key]) for m in metrics]  # type: ignore[arg-type]
        return to_metricrecord({**weighted_metric_mean(metrics, weights), **self.communication.metrics()})

    # -- checkpoint ----------------------------------------------------------------------
    def export_state(self) -> StrategyState:
        """The communication totals (a family adds its own state to this)."""
        return StrategyState(meta={COMM_STATE_KEY: self.communication.state()})

    def restore_state(self, state: StrategyState) -> None:
        """Take back the communication totals, so a resumed run keeps counting."""
        self.communication.restore(state.meta.get(COMM_STATE_KEY))

    def summary(self) -> None:
        log(INFO, "\t├──> Sampling: fraction train %.2f | evaluate %.2f", self.fraction_train, self.fraction_evaluate)
        log(INFO, "\t├──> Minimum nodes: train %d | evaluate %d | available %d",
            self.min_train_nodes, self.min_evaluate_nodes, self.min_available_nodes)
        log(INFO, "\t├──> Reply screen: max norm ratio %g, any rank %s",
            self.screen.max_norm_ratio, self.screen.any_rank)
        log(INFO, "\t├──> Communication: %s", self.communication.summary())
        log(INFO, "\t└──> Keys: weighted by '%s', ArrayRecord '%s', ConfigRecord '%s', MetricRecord '%s'",
            self.weighted_by_key, self.arrayrecord_key, self.configrecord_key, self.metricrecord_key)
