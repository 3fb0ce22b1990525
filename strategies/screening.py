"""Screening of client replies, so that one bad client never takes a round down.

Flower's FedAvg family ends the whole ServerApp with ``InconsistentMessageReplies`` when one
reply lacks a key. :class:`ReplyScreen` checks every reply first (error replies, missing
records, wrong keys, shapes or dtypes, NaN/Inf, absurd norms) and hands on only the usable
ones, each rejection logged with its reason. :class:`ScreenedStrategy` puts that screen in
front of any Flower strategy (FedAvg, Krum, Bulyan, ...) without changing it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Bulyan, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, MultiKrum, Strategy
from flwr.supercore import log

from strategies.state import CheckpointError, HasServerState, StrategyState
from strategies.validation import UpdateRejected, absurd_norms, check_state, state_norm, template_of
from strategies.records import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES, from_arrayrecord, to_arrayrecord


@dataclass
class Upload:
    """A train reply that passed the screen: who sent what, and with which weight."""

    node_id: int
    state: dict[str, np.ndarray]
    num_examples: float
    metrics: dict[str, object]


@dataclass
class ScreenReport:
    """Accepted uploads and the reason for every rejected node."""

    accepted: list[Upload] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)

    def metrics(self) -> dict[str, object]:
        return {"num-accepted": len(self.accepted), "num-rejected": len(self.rejected),
                "rejected-node-ids": sorted(self.rejected)}


def _metrics_of(content: RecordDict, metrics_key: str) -> MetricRecord:
    if metrics_key in content.metric_records:
        return content.metric_records[metrics_key]
    if len(content.metric_records) == 1:
        return next(iter(content.metric_records.values()))
    raise UpdateRejected(f"no MetricRecord '{metrics_key}' in the reply")


def _num_examples(metrics: MetricRecord) -> float:
    value = metrics.get(NUM_EXAMPLES)
    if isinstance(value, list) or value is None:
        raise UpdateRejected(f"MetricRecord lacks a scalar '{NUM_EXAMPLES}'")
    if not np.isfinite(value) or value <= 0:
        raise UpdateRejected(f"'{NUM_EXAMPLES}' must be positive, got {value}")
    return float(value)


def _arrays_of(content: RecordDict, arrays_key: str) -> ArrayRecord:
    if arrays_key in content.array_records:
        return content.array_records[arrays_key]
    raise UpdateRejected(f"no ArrayRecord '{arrays_key}' in the reply")


class ReplyScreen:
    """Validate train and evaluate replies against the adapter the server sent.

    Parameters
    ----------
    any_rank : bool
        Accept LoRA factors of a different rank than the server's (CLAIR handles
        heterogeneous ranks; FedAvg cannot average them).
    max_norm_ratio : float
        Reject an upload whose norm exceeds this multiple of the median of the others.
        A sanity bound against absurd uploads (overflowed or scaled by 1e6), not a defence.
    """

    def __init__(self, *, any_rank: bool = False, max_norm_ratio: float = 1e3,
                 arrays_key: str = ARRAYS_KEY, metrics_key: str = METRICS_KEY) -> None:
        self.any_rank = any_rank
        self.max_norm_ratio = max_norm_ratio
        self.arrays_key = arrays_key
        self.metrics_key = metrics_key

    def _upload(self, msg: Message, template: Mapping[str, tuple[int, ...]]) -> Upload:
        if msg.has_error():
            raise UpdateRejected(f"error reply: {msg.error.reason}")
        if not msg.has_content():
            raise UpdateRejected("empty reply")
        content = msg.content
        metrics = _metrics_of(content, self.metrics_key)
        n = _num_examples(metrics)
        state = check_state(from_arrayrecord(_arrays_of(content, self.arrays_key)), template,
                            any_rank=self.any_rank)
        return Upload(msg.metadata.src_node_id, state, n, dict(metrics))

    def train(self, replies: Iterable[Message], template: Mapping[str, tuple[int, ...]]) -> ScreenReport:
        """Screen train replies; a node that replied twice keeps only its first reply."""
        report = ScreenReport()
        for msg in replies:
            nid = msg.metadata.src_node_id
            if any(u.node_id == nid for u in report.accepted) or nid in report.rejected:
                continue
            try:
                report.accepted.append(self._upload(msg, template))
            except UpdateRejected as err:
                report.rejected[nid] = str(err)
        norms = [state_norm(u.state) for u in report.accepted]
        for i in reversed(absurd_norms(norms, self.max_norm_ratio)):
            up = report.accepted.pop(i)
            report.rejected[up.node_id] = f"update norm {norms[i]:.3g} is over {self.max_norm_ratio:g}x the median"
        for nid, reason in report.rejected.items():
            log(WARNING, "Rejected train reply from node %d: %s", nid, reason)
        return report

    def evaluate(self, replies: Iterable[Message]) -> tuple[list[tuple[int, dict[str, object]]], dict[int, str]]:
        """Screen evaluate replies: they need a MetricRecord with a positive num-examples."""
        ok: list[tuple[int, dict[str, object]]] = []
        bad: dict[int, str] = {}
        for msg in replies:
            nid = msg.metadata.src_node_id
            try:
                if msg.has_error():
                    raise UpdateRejected(f"error reply: {msg.error.reason}")
                metrics = _metrics_of(msg.content, self.metrics_key)
                _num_examples(metrics)
                ok.append((nid, dict(metrics)))
            except UpdateRejected as err:
                bad[nid] = str(err)
                log(WARNING, "Rejected evaluate reply from node %d: %s", nid, err)
        return ok, bad


def common_scalar_metrics(metrics: list[Mapping[str, object]]) -> list[str]:
    """Scalar metric keys every reply has: the only ones Flower's FedAvg can average."""
    if not metrics:
        return []
    keys = set.intersection(*(set(m) for m in metrics))
    return sorted(k for k in keys if all(not isinstance(m[k], list) for m in metrics))


# Flower strategies whose only state between rounds is the global arrays ``start`` carries
# (checked against flwr 1.41's source). FedAvgM and the FedOpt family keep momenta: not here.
STATELESS_FLOWER_STRATEGIES: tuple[type[Strategy], ...] = (FedAvg, FedProx, FedMedian, FedTrimmedAvg,
                                                           Krum, MultiKrum, Bulyan)


class ScreenedStrategy(Strategy):
    """Any Flower strategy, fed only the replies that pass a :class:`ReplyScreen`.

    Accepted replies are normalised to one ArrayRecord and one MetricRecord with the keys
    all of them share, which is what Flower's FedAvg family requires.
    """

    def __init__(self, strategy: Strategy, screen: ReplyScreen | None = None) -> None:
        self.strategy = strategy
        self.screen = screen or ReplyScreen()
        self.template: dict[str, tuple[int, ...]] = {}
        self.last_report = ScreenReport()
        self.last_eval_rejected: dict[int, str] = {}

    def summary(self) -> None:
        self.strategy.summary()
        log(INFO, "\t└──> Reply screen: max norm ratio %g, any rank %s",
            self.screen.max_norm_ratio, self.screen.any_rank)

    # -- checkpoint ----------------------------------------------------------------------
    def export_state(self) -> StrategyState:
        """The wrapped strategy's state: its own export, or none for a stateless Flower one.

        Raises
        ------
        CheckpointError
            If the wrapped strategy keeps state between rounds that cannot be exported.
        """
        if isinstance(self.strategy, HasServerState):
            return self.strategy.export_state()
        if type(self.strategy) in STATELESS_FLOWER_STRATEGIES:
            return StrategyState()
        raise CheckpointError(f"{type(self.strategy).__name__} may keep state between rounds that "
                              f"cannot be checkpointed (only {', '.join(t.__name__ for t in STATELESS_FLOWER_STRATEGIES)} "
                              f"or strategies with export_state/restore_state)")

    def restore_state(self, state: StrategyState) -> None:
        """Hand ``state`` to the wrapped strategy (nothing to restore for a stateless one)."""
        if isinstance(self.strategy, HasServerState):
            self.strategy.restore_state(state)
        elif type(self.strategy) in STATELESS_FLOWER_STRATEGIES:
            if state.shared or state.per_client or state.meta or state.per_client_meta:
                raise CheckpointError(f"the checkpoint holds strategy state, but "
                                      f"{type(self.strategy).__name__} keeps none")
        else:
            self.export_state()  # raises the same error as at save time

    # -- rounds ----------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.template = template_of(from_arrayrecord(arrays))
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        report = self.screen.train(replies, self.template)
        self.last_report = report
        by_node = {m.metadata.src_node_id: m for m in replies}
        keys = common_scalar_metrics([u.metrics for u in report.accepted])
        passed = []
        for up in report.accepted:
            msg = by_node[up.node_id]
            msg.content = RecordDict({
                ARRAYS_KEY: to_arrayrecord(up.state),
                METRICS_KEY: MetricRecord({k: up.metrics[k] for k in keys}),  # type: ignore[misc]
            })
            passed.append(msg)
        arrays, metrics = (None, None)
        if passed:
            arrays, metrics = self.strategy.aggregate_train(server_round, passed)
        metrics = metrics if metrics is not None else MetricRecord()
        for k, v in report.metrics().items():
            metrics[k] = v  # type: ignore[assignment]
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        ok, bad = self.screen.evaluate(replies)
        self.last_eval_rejected = bad
        keys = common_scalar_metrics([m for _, m in ok])
        by_node = {m.metadata.src_node_id: m for m in replies}
        passed = []
        for nid, metrics in ok:
            msg = by_node[nid]
            msg.content = RecordDict({METRICS_KEY: MetricRecord({k: metrics[k] for k in keys})})  # type: ignore[misc]
            passed.append(msg)
        return self.strategy.aggregate_evaluate(server_round, passed) if passed else None
