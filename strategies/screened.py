"""Any Flower strategy behind the reply screen, unchanged.

:class:`ScreenedStrategy` hands Flower's FedAvg, Krum, Bulyan, ... only the replies that pass a
:class:`~clair_flower.strategies.screen.ReplyScreen`, each rebuilt from the decoded, checked arrays as one
ArrayRecord and one MetricRecord with the keys all of them share, which is what Flower's FedAvg
family requires. Flower's own code never decodes a client's bytes. The wrapper also counts every
message's bytes both ways (:class:`~clair_flower.strategies.communication.CommunicationTracker`), so
a screened FedAvg reports what FlowerTune's tracker reports.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Bulyan, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, MultiKrum, Strategy
from flwr.supercore import log

from clair_flower.strategies.communication import STATE_KEY as COMM_STATE_KEY
from clair_flower.strategies.communication import CommunicationTracker
from clair_flower.strategies.protocol import ARRAYS_KEY, METRICS_KEY
from clair_flower.strategies.records import RoundReporting, to_arrayrecord
from clair_flower.strategies.screen import ReplyScreen
from clair_flower.strategies.state import CheckpointError, HasServerState, StrategyState
from clair_flower.strategies.uploads import ScreenReport, common_scalar_metrics

# Flower strategies whose only state between rounds is the global arrays ``start`` carries
# (checked against flwr 1.41's source). FedAvgM and the FedOpt family keep momenta: not here.
STATELESS_FLOWER_STRATEGIES: tuple[type[Strategy], ...] = (FedAvg, FedProx, FedMedian, FedTrimmedAvg,
                                                           Krum, MultiKrum, Bulyan)


class ScreenedStrategy(RoundReporting, Strategy):
    """Any Flower strategy, fed only the replies that pass a :class:`ReplyScreen`.

    Parameters
    ----------
    strategy : Strategy
        The wrapped strategy; it sees only screened replies.
    screen : ReplyScreen, optional
        The screen; by default one with the record keys below.
    arrayrecord_key, metricrecord_key : str
        Record names read from the replies and written into the replies handed on (when
        ``screen`` is given, its keys are used). The ConfigRecord is the wrapped strategy's
        business (its own ``configrecord_key``): the wrapper never reads it.
    comm_budget_mb : float, optional
        Communication budget in MB (``1024**2`` bytes), both ways, all rounds: one WARNING
        past it (see :class:`~clair_flower.strategies.communication.CommunicationTracker`).
    """

    def __init__(self, strategy: Strategy, screen: ReplyScreen | None = None, *,
                 arrayrecord_key: str = ARRAYS_KEY, metricrecord_key: str = METRICS_KEY,
                 comm_budget_mb: float | None = None) -> None:
        self.strategy = strategy
        self.screen = screen or ReplyScreen(arrayrecord_key=arrayrecord_key, metricrecord_key=metricrecord_key)
        self.template: dict[str, tuple[int, ...]] = {}
        self.last_report = ScreenReport()
        self.communication = CommunicationTracker(comm_budget_mb)

    @property
    def arrayrecord_key(self) -> str:
        return self.screen.arrayrecord_key

    @property
    def metricrecord_key(self) -> str:
        return self.screen.metricrecord_key

    def summary(self) -> None:
        self.strategy.summary()
        log(INFO, "\t├──> Reply screen: max norm ratio %g, any rank %s",
            self.screen.max_norm_ratio, self.screen.any_rank)
        log(INFO, "\t└──> Communication: %s", self.communication.summary())

    # -- checkpoint ----------------------------------------------------------------------
    def export_state(self) -> StrategyState:
        """The wrapped strategy's state: its own export, or none for a stateless Flower one.

        Raises
        ------
        CheckpointError
            If the wrapped strategy keeps state between rounds that cannot be exported.
        """
        if isinstance(self.strategy, HasServerState):
            state = self.strategy.export_state()
        elif type(self.strategy) in STATELESS_FLOWER_STRATEGIES:
            state = StrategyState()
        else:
            raise CheckpointError(f"{type(self.strategy).__name__} may keep state between rounds that "
                              f"cannot be checkpointed (only {', '.join(t.__name__ for t in STATELESS_FLOWER_STRATEGIES)} "
                              f"or strategies with export_state/restore_state)")
        state.meta[COMM_STATE_KEY] = self.communication.state()
        return state

    def restore_state(self, state: StrategyState) -> None:
        """Hand ``state`` to the wrapped strategy (nothing to restore for a stateless one);
        take back the communication totals."""
        self.communication.restore(state.meta.get(COMM_STATE_KEY))
        if isinstance(self.strategy, HasServerState):
            self.strategy.restore_state(state)
        elif type(self.strategy) in STATELESS_FLOWER_STRATEGIES:
            if state.shared or state.per_client or set(state.meta) - {COMM_STATE_KEY} or state.per_client_meta:
                raise CheckpointError(f"the checkpoint holds strategy state, but "
                                      f"{type(self.strategy).__name__} keeps none")
        else:
            self.export_state()  # raises the same error as at save time

    # -- rounds ----------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        # The server's own arrays: their declared shapes are the template, nothing to decode.
        self.template = {k: tuple(int(s) for s in v.shape) for k, v in arrays.items()}
        self.communication.start_phase()
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self.communication.sent(server_round, messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        t0 = time.perf_counter()
        replies = list(replies)
        self.communication.received(server_round, replies)
        report = self.screen.train(replies, self.template)
        self.last_report = report
        by_node = {m.metadata.src_node_id: m for m in replies}
        keys = common_scalar_metrics([u.metrics for u in report.accepted])
        passed = []
        for up in report.accepted:
            msg = by_node[up.node_id]
            msg.content = RecordDict({
                self.arrayrecord_key: to_arrayrecord(up.state),
                self.metricrecord_key: MetricRecord({k: up.metrics[k] for k in keys}),  # type: ignore[misc]
            })
            passed.append(msg)
        arrays, metrics = (None, None)
        if passed:
            arrays, metrics = self.strategy.aggregate_train(server_round, passed)
        detail = {**(dict(metrics) if metrics is not None else {}), **report.metrics(),
                  **self.communication.metrics()}
        # One INFO line, full detail in self.round_details, scalars to Flower (RoundReporting).
        return arrays, self.report_round(server_round, report, detail, time.perf_counter() - t0)

    def round_label(self) -> str:
        """The wrapped strategy's class name (``FedAvg``, ``Krum``, ...)."""
        return type(self.strategy).__name__

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        self.communication.start_phase()
        messages = list(self.strategy.configure_evaluate(server_round, arrays, config, grid))
        self.communication.sent(server_round, messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self.communication.received(server_round, replies)
        ok, _ = self.screen.evaluate(replies)  # the screen logs every rejected reply
        keys = common_scalar_metrics([m for _, m in ok])
        by_node = {m.metadata.src_node_id: m for m in replies}
        passed = []
        for nid, metrics in ok:
            msg = by_node[nid]
            msg.content = RecordDict({self.metricrecord_key: MetricRecord({k: metrics[k] for k in keys})})  # type: ignore[misc]
            passed.append(msg)
        metrics = self.strategy.aggregate_evaluate(server_round, passed) if passed else None
        if metrics is None and not replies:
            return None
        metrics = metrics if metrics is not None else MetricRecord()
        for k, v in self.communication.metrics().items():
            metrics[k] = v
        return metrics
