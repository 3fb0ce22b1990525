"""RoLoRA: federated LoRA by alternating optimisation of the two factors.

Chen et al., NeurIPS 2025 (arXiv 2502.01755). Rounds alternate between training and
aggregating ``B`` with ``A`` frozen and ``A`` with ``B`` frozen, **B first**: PEFT initialises
``B`` to zero, so an A-first round would train nothing (the gradient of ``A`` is ``B^T G``).

With the other factor shared and frozen, averaging the trained factor is *exact*::

    mean_k(B_k) @ A == mean_k(B_k @ A)        (and B @ mean_k(A_k) == mean_k(B @ A_k))

whereas FedAvg's ``mean(B_k) @ mean(A_k)`` is not the mean of the products. Clients upload only
the factor they trained (the ``train-factors`` / ``upload-factors`` entries of the config), which
halves the uplink on average; the server broadcasts the full adapter.

Parity rule
-----------
The factor trained in a round comes from a counter of *completed aggregations*, never from
``server_round % 2``: ``B`` when the counter is even, ``A`` when odd. The counter advances only
when ``aggregate_train`` accepted at least one upload of the factor it sent. A round in which
no reply (or no usable reply) arrived changes nothing, and the same factor is sent again; a
round in which a subset answered aggregates that subset and advances. Evaluation rounds never
touch the counter. The factor sent in each round is remembered, so a round's replies are always
screened against the factor that round asked for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log

from strategies.state import CheckpointError, StrategyState
from clair_flower.lora import LORA_A_SUFFIX, LORA_B_SUFFIX
from strategies.personalized import weighted_mean_state
from strategies.records import ARRAYS_KEY, CONFIG_KEY, NUM_EXAMPLES, from_arrayrecord, to_arrayrecord, to_metricrecord
from strategies.screen import ReplyScreen
from strategies.uploads import ScreenReport, Upload, common_scalar_metrics

State = dict[str, np.ndarray]
FACTORS = ("A", "B")
SUFFIX = {"A": LORA_A_SUFFIX, "B": LORA_B_SUFFIX}


def factor_for(completed: int, first: str = "B") -> str:
    """The factor trained after ``completed`` successful aggregations (alternating)."""
    other = "A" if first == "B" else "B"
    return first if completed % 2 == 0 else other


def factor_keys(state: Mapping[str, np.ndarray], factor: str) -> list[str]:
    """Keys of ``state`` holding the given LoRA factor (PEFT naming)."""
    return [k for k in state if k.endswith(SUFFIX[factor])]


def factor_template(state: Mapping[str, np.ndarray], factor: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the active factor only: what a correct upload must hold, nothing more."""
    return {k: tuple(np.shape(state[k])) for k in factor_keys(state, factor)}


def weighted_metrics(metrics: list[Mapping[str, object]], weights: list[float]) -> dict[str, float]:
    """Weighted mean of the scalar metrics all replies share (as Flower's FedAvg reports)."""
    keys = [k for k in common_scalar_metrics(metrics) if k != NUM_EXAMPLES]
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    return {k: float(sum(wi * float(m[k]) for wi, m in zip(w, metrics))) for k in keys}  # type: ignore[arg-type]


class RoLoRA(Strategy):
    """Alternate B-then-A rounds; average the trained factor; broadcast the full adapter.

    Parameters
    ----------
    fraction_train, fraction_evaluate : float
        Fraction of connected nodes sampled for training / evaluation (as in FedAvg).
    min_train_nodes, min_evaluate_nodes, min_available_nodes : int
        Lower bounds on sampled and connected nodes (as in FedAvg).
    weighted_by_key : str
        Scalar metric of each train reply used as its aggregation weight.
    arrayrecord_key, configrecord_key : str
        Record names in the messages (FlowerTune convention: ``"arrays"``, ``"config"``).
    first_factor : {"B", "A"}
        Factor of the first round. Keep ``"B"`` with PEFT's zero-initialised ``B``.
    max_norm_ratio : float
        Sanity bound of the :class:`ReplyScreen` (not a defence).
    """

    def __init__(self, *, fraction_train: float = 1.0, fraction_evaluate: float = 1.0,
                 min_train_nodes: int = 2, min_evaluate_nodes: int = 2, min_available_nodes: int = 2,
                 weighted_by_key: str = NUM_EXAMPLES, arrayrecord_key: str = ARRAYS_KEY,
                 configrecord_key: str = CONFIG_KEY, first_factor: str = "B",
                 max_norm_ratio: float = 1e3) -> None:
        if first_factor not in FACTORS:
            raise ValueError(f"first_factor must be 'A' or 'B', got {first_factor!r}")
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_train_nodes = min_train_nodes
        self.min_evaluate_nodes = min_evaluate_nodes
        self.min_available_nodes = min_available_nodes
        self.weighted_by_key = weighted_by_key
        self.arrayrecord_key = arrayrecord_key
        self.configrecord_key = configrecord_key
        self.first_factor = first_factor
        self.screen = ReplyScreen(max_norm_ratio=max_norm_ratio, arrayrecord_key=arrayrecord_key)
        self.completed_aggregations = 0
        self.factor_sent: dict[int, str] = {}
        self.global_state: State | None = None
        self.last_report = ScreenReport()
        self.last_eval_rejected: dict[int, str] = {}

    # -- the phase ---------------------------------------------------------------------
    def current_factor(self) -> str:
        """Factor the next train round trains (see the module docstring's parity rule)."""
        return factor_for(self.completed_aggregations, self.first_factor)

    # -- checkpoint --------------------------------------------------------------------
    def export_state(self) -> StrategyState:
        """The phase counter (the parity rule's completed aggregations) and first factor.

        The full adapter is the global arrays ``Strategy.start`` carries; the checkpoint
        saves those separately, and ``configure_train`` takes them back each round.
        """
        return StrategyState(meta={"completed-aggregations": self.completed_aggregations,
                                   "first-factor": self.first_factor})

    def restore_state(self, state: StrategyState) -> None:
        """Continue the alternation where the checkpoint left it."""
        first = state.meta.get("first-factor", self.first_factor)
        if first != self.first_factor:
            raise CheckpointError(f"the checkpoint alternates from factor {first}, this strategy "
                                  f"from {self.first_factor}")
        completed = state.meta.get("completed-aggregations")
        if not isinstance(completed, int) or isinstance(completed, bool) or completed < 0:
            raise CheckpointError(f"checkpoint 'completed-aggregations' must be a count, got {completed!r}")
        self.completed_aggregations = completed

    def summary(self) -> None:
        log(INFO, "\t├──> RoLoRA: alternating factors, first %s, exact aggregation of the trained factor",
            self.first_factor)
        self._log_common()

    def _log_common(self) -> None:
        log(INFO, "\t├──> Sampling: fraction train %.2f | evaluate %.2f", self.fraction_train, self.fraction_evaluate)
        log(INFO, "\t├──> Minimum nodes: train %d | evaluate %d | available %d",
            self.min_train_nodes, self.min_evaluate_nodes, self.min_available_nodes)
        log(INFO, "\t├──> Reply screen: max norm ratio %g (only the trained factor's keys accepted)",
            self.screen.max_norm_ratio)
        log(INFO, "\t└──> Keys: weighted by '%s', ArrayRecord '%s', ConfigRecord '%s'",
            self.weighted_by_key, self.arrayrecord_key, self.configrecord_key)

    # -- messages ----------------------------------------------------------------------
    def _sample(self, grid: Grid, fraction: float, minimum: int) -> list[int]:
        if fraction == 0.0:
            return []
        num_nodes = int(len(list(grid.get_node_ids())) * fraction)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, max(num_nodes, minimum))
        return sorted(node_ids)

    def _broadcast(self, arrays: ArrayRecord, config: ConfigRecord, node_ids: list[int],
                   message_type: str, server_round: int) -> list[Message]:
        """One message per node; all carry the same full adapter (shared A, averaged B)."""
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [Message(content=content, dst_node_id=nid, message_type=message_type,
                        group_id=str(server_round)) for nid in node_ids]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.global_state = from_arrayrecord(arrays)
        factor = self.current_factor()
        self.factor_sent[server_round] = factor
        node_ids = self._sample(grid, self.fraction_train, self.min_train_nodes)
        log(INFO, "configure_train: %d nodes train factor %s (aggregations so far: %d)",
            len(node_ids), factor, self.completed_aggregations)
        cfg = ConfigRecord({**dict(config), "server-round": server_round,
                            "train-factors": factor, "upload-factors": factor})
        return self._broadcast(arrays, cfg, node_ids, MessageType.TRAIN, server_round)

    # -- aggregation -------------------------------------------------------------------
    def aggregate_factor(self, server_round: int, factor: str, uploads: list[Upload]
                         ) -> tuple[State | None, dict[str, object]]:
        """The new value of ``factor`` from this round's accepted uploads (weighted mean).

        Returns ``None`` to skip the round (the phase then does not advance).
        """
        return weighted_mean_state([u.state for u in uploads], self._weights(uploads)), {}

    def _weights(self, uploads: list[Upload]) -> list[float]:
        if self.weighted_by_key == NUM_EXAMPLES:
            return [u.num_examples for u in uploads]
        return [float(u.metrics[self.weighted_by_key]) for u in uploads]  # type: ignore[arg-type]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self.global_state is not None, "configure_train runs first"
        factor = self.factor_sent.get(server_round, self.current_factor())
        report = self.screen.train(list(replies), factor_template(self.global_state, factor))
        self.last_report = report
        metrics: dict[str, object] = {**report.metrics(), "train-factor-B": int(factor == "B")}
        new_factor: State | None = None
        if report.accepted:
            new_factor, extra = self.aggregate_factor(server_round, factor, report.accepted)
            metrics.update(extra)
            metrics.update(weighted_metrics([u.metrics for u in report.accepted], self._weights(report.accepted)))
        if new_factor is None:
            log(WARNING, "Round %d: factor %s not aggregated; it is trained again next round",
                server_round, factor)
            metrics["aggregations-completed"] = self.completed_aggregations
            return None, to_metricrecord(metrics)
        self.global_state = {**self.global_state, **new_factor}
        self.completed_aggregations += 1
        metrics["aggregations-completed"] = self.completed_aggregations
        return to_arrayrecord(self.global_state), to_metricrecord(metrics)

    # -- evaluation --------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        node_ids = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes)
        cfg = ConfigRecord({**dict(config), "server-round": server_round})
        return self._broadcast(arrays, cfg, node_ids, MessageType.EVALUATE, server_round)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        ok, bad = self.screen.evaluate(list(replies))
        self.last_eval_rejected = bad
        if not ok:
            return None
        weights = [float(m[NUM_EXAMPLES]) for _, m in ok]  # type: ignore[arg-type]
        return to_metricrecord(weighted_metrics([m for _, m in ok], weights))
