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

from collections.abc import Mapping
from typing import Any
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord
from flwr.supercore import log

from clair_flower.lora import LORA_A_SUFFIX, LORA_B_SUFFIX
from clair_flower.strategies.base import ConfigValue, LoraStrategy, State, weighted_mean_state
from clair_flower.strategies.protocol import FACTOR_A, FACTOR_B, TRAIN_FACTORS, UPLOAD_FACTORS
from clair_flower.strategies.records import from_arrayrecord, to_arrayrecord
from clair_flower.strategies.screen import Template
from clair_flower.strategies.state import CheckpointError, StrategyState
from clair_flower.strategies.uploads import ScreenReport, Upload

FACTORS = (FACTOR_A, FACTOR_B)
SUFFIX = {FACTOR_A: LORA_A_SUFFIX, FACTOR_B: LORA_B_SUFFIX}


def factor_for(completed: int, first: str = FACTOR_B) -> str:
    """The factor trained after ``completed`` successful aggregations (alternating)."""
    other = FACTOR_A if first == FACTOR_B else FACTOR_B
    return first if completed % 2 == 0 else other


def factor_keys(state: Mapping[str, np.ndarray], factor: str) -> list[str]:
    """Keys of ``state`` holding the given LoRA factor (PEFT naming)."""
    return [k for k in state if k.endswith(SUFFIX[factor])]


def factor_template(state: Mapping[str, np.ndarray], factor: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the active factor only: what a correct upload must hold, nothing more."""
    return {k: tuple(np.shape(state[k])) for k in factor_keys(state, factor)}


class RoLoRA(LoraStrategy):
    """Alternate B-then-A rounds; average the trained factor; broadcast the full adapter.

    Parameters
    ----------
    first_factor : {"B", "A"}
        Factor of the first round. Keep ``"B"`` with PEFT's zero-initialised ``B``.
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, min_available_nodes
        Sampling, as in FedAvg (see :class:`~clair_flower.strategies.base.LoraStrategy`).
    weighted_by_key, arrayrecord_key, configrecord_key, metricrecord_key : str
        Weight metric and record names (FlowerTune convention).
    max_norm_ratio : float
        Sanity bound of the :class:`ReplyScreen` (not a defence); only the trained factor's
        keys are accepted.
    """

    def __init__(self, *, first_factor: str = FACTOR_B, **kwargs: Any) -> None:
        if first_factor not in FACTORS:
            raise ValueError(f"first_factor must be 'A' or 'B', got {first_factor!r}")
        super().__init__(**kwargs)
        self.first_factor = first_factor
        self.completed_aggregations = 0
        self.factor_sent: dict[int, str] = {}
        self.global_state: State | None = None

    # -- the phase ---------------------------------------------------------------------
    def current_factor(self) -> str:
        """Factor the next train round trains (see the module docstring's parity rule)."""
        return factor_for(self.completed_aggregations, self.first_factor)

    # -- checkpoint --------------------------------------------------------------------
    def export_state(self) -> StrategyState:
        """The phase counter (the parity rule's completed aggregations), first factor and
        communication totals.

        The full adapter is the global arrays ``Strategy.start`` carries; the checkpoint
        saves those separately, and ``configure_train`` takes them back each round.
        """
        state = super().export_state()
        state.meta.update({"completed-aggregations": self.completed_aggregations,
                           "first-factor": self.first_factor})
        return state

    def restore_state(self, state: StrategyState) -> None:
        """Continue the alternation where the checkpoint left it (and the communication totals)."""
        first = state.meta.get("first-factor", self.first_factor)
        if first != self.first_factor:
            raise CheckpointError(f"the checkpoint alternates from factor {first}, this strategy "
                                  f"from {self.first_factor}")
        completed = state.meta.get("completed-aggregations")
        if not isinstance(completed, int) or isinstance(completed, bool) or completed < 0:
            raise CheckpointError(f"checkpoint 'completed-aggregations' must be a count, got {completed!r}")
        super().restore_state(state)
        self.completed_aggregations = completed

    def summary(self) -> None:
        log(INFO, "\t├──> RoLoRA: alternating factors, first %s, exact aggregation of the trained factor",
            self.first_factor)
        super().summary()

    # -- LoraStrategy's hooks ----------------------------------------------------------
    def begin_train(self, server_round: int, arrays: ArrayRecord) -> None:
        self.global_state = from_arrayrecord(arrays)
        self.factor_sent[server_round] = self.current_factor()

    def train_config(self, server_round: int) -> dict[str, ConfigValue]:
        factor = self.factor_sent[server_round]
        return {TRAIN_FACTORS: factor, UPLOAD_FACTORS: factor}

    def train_plan(self, server_round: int) -> str:
        return (f" train factor {self.factor_sent[server_round]} "
                f"(aggregations so far: {self.completed_aggregations})")

    def train_factor(self, server_round: int) -> str:
        """The factor ``server_round`` asked for (the current one if it sent none)."""
        return self.factor_sent.get(server_round, self.current_factor())

    def train_template(self, server_round: int) -> Template:
        assert self.global_state is not None, "configure_train runs first"
        return factor_template(self.global_state, self.train_factor(server_round))

    # -- aggregation -------------------------------------------------------------------
    def aggregate_factor(self, server_round: int, factor: str, uploads: list[Upload]
                         ) -> tuple[State | None, dict[str, object]]:
        """The new value of ``factor`` from this round's accepted uploads (weighted mean).

        Returns ``None`` to skip the round (the phase then does not advance).
        """
        return weighted_mean_state([u.state for u in uploads], self.upload_weights(uploads)), {}

    def aggregate_uploads(self, server_round: int, report: ScreenReport
                          ) -> tuple[ArrayRecord | None, dict[str, object]]:
        assert self.global_state is not None, "configure_train runs first"
        factor = self.train_factor(server_round)
        metrics: dict[str, object] = {**report.metrics(), "train-factor-B": int(factor == FACTOR_B)}
        new_factor: State | None = None
        if report.accepted:
            new_factor, extra = self.aggregate_factor(server_round, factor, report.accepted)
            metrics.update(extra)
            metrics.update(self.train_metric_means(report.accepted))
        if new_factor is None:
            log(WARNING, "Round %d: factor %s not aggregated; it is trained again next round",
                server_round, factor)
            metrics["aggregations-completed"] = self.completed_aggregations
            return None, metrics
        self.global_state = {**self.global_state, **new_factor}
        self.completed_aggregations += 1
        metrics["aggregations-completed"] = self.completed_aggregations
        return to_arrayrecord(self.global_state), metrics
