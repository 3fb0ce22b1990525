"""A strategy wrapper that measures and records every round, for any strategy.

It sits between ``Strategy.start`` and the real strategy, so Flower's own strategies are
recorded exactly like ours. Per round it writes one JSON line: benign accuracy from each
client's held-out evaluation, the flagged partitions with TPR/FPR against ground truth,
rejected replies with their reasons, bytes up and down, and server and client times.

Ground truth (the ``contaminated`` metric each client reports) is read here and removed
from every reply before the wrapped strategy sees it. Only ``oracle=True`` uses it, to
keep contaminated replies away from the wrapped FedAvg.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from clair_flower.server_apps.results import RunWriter, detection_rates
from clair_flower.server_apps.checkpointing import RoundCheckpoints
from clair_flower.strategies.protocol import (CONTAMINATED, PARTITION_ID, TRAIN_SECONDS, TRAIN_TOKEN_ACC,
                                             TRAIN_TOKEN_ACC_Q3)

GROUND_TRUTH_KEY = CONTAMINATED
PARTITION_KEY = PARTITION_ID


def _array_bytes(record: ArrayRecord) -> int:
    return int(sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in record.values()))


def _message_bytes(msg: Message) -> int:
    if msg.has_error() or not msg.has_content():
        return 0
    return sum(_array_bytes(r) for r in msg.content.array_records.values())


def _strip_ground_truth(msg: Message) -> tuple[int | None, int | None]:
    """Remove the ground-truth key from a reply; return (partition-id, contaminated)."""
    if msg.has_error() or not msg.has_content():
        return None, None
    pid = truth = None
    for record in msg.content.metric_records.values():
        if GROUND_TRUTH_KEY in record:
            truth = int(record.pop(GROUND_TRUTH_KEY))  # type: ignore[arg-type]
        if PARTITION_KEY in record and not isinstance(record[PARTITION_KEY], list):
            pid = int(record[PARTITION_KEY])  # type: ignore[arg-type]
    return pid, truth


def _metrics_of(msg: Message) -> dict[str, object]:
    out: dict[str, object] = {}
    for record in msg.content.metric_records.values():
        out.update(record)
    return out


CLIENT_SCORE_KEYS = {"score-z": "score-z", "vote": "votes"}
"""A round record's per-client entry -> the list of a CLAIR round's detail it comes from."""


def round_detail(strategy: Strategy, server_round: int, metrics: MetricRecord | None) -> dict[str, object]:
    """The round's full train metrics: the strategy's ``round_details`` entry when it keeps one
    (per-client lists are never in the MetricRecord it hands Flower), else the MetricRecord."""
    details = getattr(strategy, "round_details", None)
    if isinstance(details, Mapping) and server_round in details:
        return dict(details[server_round])
    return dict(metrics) if metrics is not None else {}


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


class RecordingStrategy(Strategy):
    """Wrap ``strategy``; write a round record to ``writer`` after each evaluation.

    Parameters
    ----------
    strategy : Strategy
        The strategy that does the work.
    writer : RunWriter
        Where round records go.
    label : str
        Strategy name in the records and logs.
    oracle : bool
        Feed the wrapped strategy only the truly benign train replies.
    round_offset : int
        Rounds completed before this ``start`` (a resumed run): ``Strategy.start`` counts
        from 1, while the wrapped strategy, the clients and the records see the true round
        ``server_round + round_offset``.
    checkpoints : RoundCheckpoints, optional
        Saves the server state after each round's record is written.
    """

    def __init__(self, strategy: Strategy, writer: RunWriter, *, label: str, oracle: bool = False,
                 round_offset: int = 0, checkpoints: RoundCheckpoints | None = None) -> None:
        self.strategy = strategy
        self.writer = writer
        self.label = label
        self.oracle = oracle
        self.round_offset = round_offset
        self.checkpoints = checkpoints
        self.partition_of: dict[int, int] = {}
        self.truth: dict[int, int] = {}
        self.rounds: list[dict[str, object]] = []
        self.arrays: ArrayRecord | None = None
        self._round: dict[str, object] = {}
        self._t_round = 0.0

    def summary(self) -> None:
        self.strategy.summary()

    # -- training ------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        self._t_round = time.perf_counter()
        self.arrays = arrays
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        down = [_message_bytes(m) for m in messages]
        self._round = {"round": server_round, "num-sampled": len(messages),
                       "bytes-down": int(np.mean(down)) if down else 0,
                       "bytes-down-total": int(sum(down))}
        return messages

    def _learn_identities(self, replies: list[Message]) -> None:
        for msg in replies:
            pid, truth = _strip_ground_truth(msg)
            nid = msg.metadata.src_node_id
            if pid is not None:
                self.partition_of[nid] = pid
            if truth is not None:
                self.truth[nid] = truth

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        replies = list(replies)
        self._learn_identities(replies)
        if self.oracle:
            replies = [m for m in replies if self.truth.get(m.metadata.src_node_id, 0) == 0]
        ok = [m for m in replies if not m.has_error() and m.has_content()]
        up = [_message_bytes(m) for m in ok]
        train_secs = [float(_metrics_of(m).get(TRAIN_SECONDS, np.nan)) for m in ok]
        t0 = time.perf_counter()
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        server_seconds = time.perf_counter() - t0
        if arrays is not None:
            self.arrays = arrays  # what Strategy.start carries into the next round
        detail = round_detail(self.strategy, server_round, metrics)
        self._round.update({
            "num-replies": len(ok), "bytes-up": int(np.mean(up)) if up else 0,
            "bytes-up-total": int(sum(up)), "server-seconds": server_seconds,
            "client-train-seconds": _mean([s for s in train_secs if np.isfinite(s)]),
            **self._train_accuracy(ok),
            "train-metrics": detail,
        })
        self._record_flags(detail)
        self._record_rejections()
        return arrays, metrics

    def _train_accuracy(self, replies: list[Message]) -> dict[str, float | None]:
        """Benign clients' mean train token accuracy at the end of their local steps and after
        three quarters of them: the experiments' convergence check reads the difference."""
        benign = [_metrics_of(m) for m in replies if not self.truth.get(m.metadata.src_node_id, 0)]
        out: dict[str, float | None] = {}
        for key in (TRAIN_TOKEN_ACC, TRAIN_TOKEN_ACC_Q3):
            vals = [float(m[key]) for m in benign if key in m]  # type: ignore[arg-type]
            out[key] = _mean([v for v in vals if np.isfinite(v)])
        return out

    def _record_flags(self, detail: Mapping[str, object]) -> None:
        """Flagged partitions, TPR/FPR against the ground truth, and each client's CLAIR score
        (``client-scores``, by partition) with the rules' ``thresholds``, for the heatmap."""
        if "flagged-node-ids" not in detail:
            return
        flagged_nodes = {int(n) for n in detail["flagged-node-ids"]}  # type: ignore[attr-defined]
        seen = [int(n) for n in detail.get("node-ids", [])]  # type: ignore[attr-defined]
        population = {self.partition_of[n] for n in seen if n in self.partition_of}
        flagged = {self.partition_of[n] for n in flagged_nodes if n in self.partition_of}
        bad = {self.partition_of[n] for n, t in self.truth.items() if t and n in self.partition_of}
        self._round["flagged-partitions"] = sorted(flagged)
        self._round["contaminated-partitions"] = sorted(bad & population)
        self._round.update(detection_rates(flagged, bad & population, population))
        scores = {key: detail.get(source) for key, source in CLIENT_SCORE_KEYS.items()}
        if all(isinstance(v, list) and len(v) == len(seen) for v in scores.values()):
            self._round["client-scores"] = {
                self._client_key(n): {**{key: vals[i] for key, vals in scores.items()},  # type: ignore[index]
                                      "flagged": int(n in flagged_nodes)}
                for i, n in enumerate(seen)}
            if isinstance(detail.get("thresholds"), Mapping):
                self._round["thresholds"] = dict(detail["thresholds"])  # type: ignore[arg-type]

    def _client_key(self, node_id: int) -> str:
        """A client's key in a round record: its partition id, or ``node-<id>`` without one."""
        return str(self.partition_of[node_id]) if node_id in self.partition_of else f"node-{node_id}"

    def _record_rejections(self) -> None:
        report = getattr(self.strategy, "last_report", None)
        if report is None:
            return
        self._round["rejected"] = {str(self.partition_of.get(n, f"node-{n}")): reason
                                   for n, reason in report.rejected.items()}

    # -- evaluation ----------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        replies = list(replies)
        per_client = self._per_client_eval(replies)
        agg = self.strategy.aggregate_evaluate(server_round, replies)
        self._finish_round(server_round, per_client)
        return agg

    def _per_client_eval(self, replies: list[Message]) -> dict[int, dict[str, object]]:
        out: dict[int, dict[str, object]] = {}
        for msg in replies:
            pid, truth = _strip_ground_truth(msg)
            if pid is None:
                continue
            nid = msg.metadata.src_node_id
            self.partition_of[nid] = pid
            if truth is not None:
                self.truth[nid] = truth
            m = _metrics_of(msg)
            out[pid] = {k: m[k] for k in ("token-acc", "exact-acc", "loss", "backdoor-asr") if k in m}
            out[pid]["contaminated"] = self.truth.get(nid, 0)
        return out

    def _finish_round(self, server_round: int, per_client: Mapping[int, Mapping[str, object]]) -> None:
        benign = [c for c in per_client.values() if not c["contaminated"]]
        rec = self._round if self._round.get("round") == server_round else {"round": server_round}
        rec.update({
            "strategy": self.label,
            "benign-token-acc": _mean([float(c["token-acc"]) for c in benign if "token-acc" in c]),
            "benign-exact-acc": _mean([float(c["exact-acc"]) for c in benign if "exact-acc" in c]),
            "num-evaluated": len(per_client),
            "clients": {str(p): dict(c) for p, c in sorted(per_client.items())},
            "round-seconds": time.perf_counter() - self._t_round,
        })
        asr = [float(c["backdoor-asr"]) for c in benign if "backdoor-asr" in c]
        if asr:
            rec["benign-backdoor-asr"] = _mean(asr)
        self.rounds.append(rec)
        self.writer.append_round(rec)
        self._log_round(rec)
        if self.checkpoints is not None and self.arrays is not None:
            # After the record: a checkpoint of round N means rounds 1..N are in the log.
            self.checkpoints.save(server_round, self.arrays, self.strategy, self.partition_of)

    def _log_round(self, rec: Mapping[str, object]) -> None:
        flags = ""
        if "flagged-partitions" in rec:
            flags = (f" | flagged partitions {rec['flagged-partitions']} "
                     f"(TPR {_pct(rec.get('tpr'))}, FPR {_pct(rec.get('fpr'))})")
        log(INFO, "[%s] round %s: benign token-acc %s, exact-acc %s%s | server %.2f s, client train %s s",
            self.label, rec["round"], _pct(rec.get("benign-token-acc")), _pct(rec.get("benign-exact-acc")),
            flags, float(rec.get("server-seconds", 0.0)), _fmt_s(rec.get("client-train-seconds")))


def _pct(value: object) -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{float(value):.3f}"  # type: ignore[arg-type]


def _fmt_s(value: object) -> str:
    return "n/a" if value is None else f"{float(value):.2f}"  # type: ignore[arg-type]

