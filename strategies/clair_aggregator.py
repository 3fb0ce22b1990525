"""One CLAIR round on the server, for both CLAIR strategies.

:class:`ClairAggregator` is what :class:`~clair_flower.strategies.clair.ClairStrategy` (full adapters) and
:class:`~clair_flower.strategies.clair_rolora.ClairRoLoRA` (one factor per round) share: it runs
:func:`clair_flower.clair.run_clair` on one round's uploads, keeps every node's flag and
score-z histories, and builds the round's metrics; :class:`UsesClairAggregator` writes the
round's one INFO line from them (the rule that decided, the flagged clients by partition id,
server seconds). One failure rule: with fewer than 3 uploads, or when ``run_clair`` (or turning
the uploads into LoRA factors) raises any exception, the round falls back (its type and message
are logged as a WARNING and the metrics say ``clair-fallback = 1``); what a fallback means is
the strategy's business (ClairStrategy keeps every adapter, ClairRoLoRA skips the round).

A round's metrics hold per-client lists (``node-ids``, ``votes``, ``scores``, ``score-z``,
``flagged-node-ids``) and strings (``clair-decision``); the strategy keeps them in its
``round_details`` and hands Flower only the scalars
(:class:`~clair_flower.strategies.records.RoundReporting`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from logging import WARNING
from typing import Any

import numpy as np
from flwr.supercore import log

from clair_flower.clair import ClairConfig, ClairResult, run_clair
from clair_flower.lora import LoraFactors
from clair_flower.strategies.records import client_names
from clair_flower.strategies.uploads import ScreenReport, Upload

DECISIONS = ("vote", "fallback", "none")
"""Which rule decided a round's flags (see :attr:`clair_flower.clair.ClairResult.decision`)."""

MIN_UPLOADS = 3
"""CLAIR compares pairwise differences: with fewer uploads there is no majority to trust."""

FALLBACK_METRICS: dict[str, object] = {"clair-fallback": 1, "num-flagged": 0}

DECISION_KEY = "clair-decision"
"""Detail key (a string, so never in the MetricRecord) naming the rule that decided the round."""


def clair_config(config: ClairConfig | None, **settings: Any) -> ClairConfig:
    """``config``, or a :class:`ClairConfig` from keyword settings (``None``: the default).

    A strategy takes its CLAIR settings either as ``config=`` or as keyword arguments; a
    keyword setting that differs from ClairConfig's default next to ``config`` is an error,
    as it would be silently one or the other.

    Raises
    ------
    TypeError
        If ``config`` is given together with non-default keyword settings (named).
    """
    default = ClairConfig()
    given = {k: v for k, v in settings.items() if v is not None and v != getattr(default, k)}
    if config is None:
        return dataclasses.replace(default, **given)
    if given:
        raise TypeError(f"CLAIR settings go either in config= or in keyword arguments, not both: "
                        f"{', '.join(sorted(given))}")
    return config


class ClairAggregator:
    """Run CLAIR each round, keep per-node histories, report the round.

    Parameters
    ----------
    config : ClairConfig
        The CLAIR settings of every round.
    label : str
        Name in the round's log line (``"CLAIR"``, ``"CLAIR-RoLoRA"``).
    fallback : str
        What the strategy does in a fallback round, for the WARNING (``"adapters kept as
        they were"``).
    use_score_history : bool
        Hand ``run_clair`` each node's score-z history (``ClairConfig.z_memory``). CLAIR-RoLoRA
        does not: its B and A rounds score different factors, so their z-scores do not add up.
    """

    def __init__(self, config: ClairConfig, *, label: str = "CLAIR", fallback: str = "round skipped",
                 use_score_history: bool = True) -> None:
        config.validate()
        self.config = config
        self.label = label
        self.fallback = fallback
        self.use_score_history = use_score_history
        self.flag_history: dict[int, list[int]] = {}
        self.score_z_history: dict[int, list[float]] = {}

    def run(self, server_round: int, uploads: list[Upload],
            as_factors: Callable[[Upload], Mapping[str, LoraFactors]], note: str = ""
            ) -> tuple[ClairResult | None, dict[str, object]]:
        """CLAIR on ``uploads`` (each turned into per-module factors by ``as_factors``).

        Returns
        -------
        (ClairResult or None, dict)
            The result (``None`` for a fallback round) and the round's metrics.
        """
        if len(uploads) < MIN_UPLOADS:
            log(WARNING, "CLAIR needs at least %d usable uploads, got %d: %s",
                MIN_UPLOADS, len(uploads), self.fallback)
            return None, {**FALLBACK_METRICS, "clair-note": note,
                          "clair-fallback-reason": f"{len(uploads)} usable uploads, CLAIR needs {MIN_UPLOADS}"}
        t0 = time.perf_counter()
        try:
            updates: dict[Hashable, Mapping[str, LoraFactors | np.ndarray]] = {
                u.node_id: as_factors(u) for u in uploads}
            prior: dict[Hashable, Sequence[float]] | None = None
            if self.use_score_history:
                prior = {n: h for n, h in self.score_z_history.items()}
            result = run_clair(updates, self.config, prior)
        except Exception as err:  # noqa: BLE001 - a failed solve must not end the ServerApp
            log(WARNING, "CLAIR failed this round (%s: %s): %s", type(err).__name__, err, self.fallback)
            return None, {**FALLBACK_METRICS, "clair-note": note,
                          "clair-fallback-reason": f"CLAIR failed: {type(err).__name__}"}
        seconds = time.perf_counter() - t0
        for nid, client in result.clients.items():
            self.flag_history.setdefault(nid, []).append(int(client.flagged))
            self.score_z_history.setdefault(nid, []).append(float(client.score_z))
        return result, {**self.round_metrics(result, [u.node_id for u in uploads], seconds), "clair-note": note}

    def round_metrics(self, result: ClairResult, nids: list[int], seconds: float) -> dict[str, object]:
        """Flags, votes, scores, the decision, lambda and the solver's health of one round.

        The per-client lists follow ``node-ids``; ``thresholds`` holds the two rules' cut-offs
        (``vote``: a client's pair vote above it flags it when the vote decides; ``score-z``: a
        robust z of the score above it flags it when the score-outlier fallback decides), so a
        per-client plot can draw them.
        """
        diag = result.diagnostics
        trunc = [max(result.clients[n].truncation_error.values(), default=0.0) for n in nids]
        lams = [float(m.diagnostics.get("lam", float("nan"))) for m in result.modules.values()]
        statuses = [str(m.diagnostics.get("status", "")) for m in result.modules.values()]
        ok = all(s.startswith("optimal") or s == "converged" for s in statuses)
        if not ok:
            log(WARNING, "CLAIR solver status this round: %s", sorted(set(statuses)))
        return {
            "clair-fallback": 0,
            **{f"decided-by-{d}": int(result.decision == d) for d in DECISIONS},
            "num-flagged": len(result.flagged),
            "flagged-node-ids": sorted(result.flagged),
            "node-ids": nids,
            "votes": [float(result.clients[n].vote) for n in nids],
            "scores": [float(result.clients[n].score) for n in nids],
            "score-z": [float(result.clients[n].score_z) for n in nids],
            DECISION_KEY: result.decision,
            "trusted-get": str(diag.get("trusted_get", "refined")),
            "thresholds": {"vote": float(self.config.vote_threshold), "score-z": float(self.config.z_threshold)},
            "lambda": float(np.nanmedian(lams)) if lams else float("nan"),
            "solver-ok": int(ok),
            "solver-seconds": float(diag.get("seconds", seconds)),
            "clair-seconds": float(seconds),
            "max-truncation-error": float(max(trunc, default=0.0)),
            "truncation-error-by-module": truncation_by_module(result, nids),
        }


def truncation_by_module(result: ClairResult, nids: list[int]) -> dict[str, float]:
    """Per module, the mean over the trusted clients of the share of the refined update's norm
    that the refit at the client's rank loses (what the ``merged-delta`` downlink sends)."""
    trusted = [n for n in nids if not result.clients[n].flagged] or nids
    return {m: float(np.mean([result.clients[n].truncation_error.get(m, 0.0) for n in trusted]))
            for m in result.modules}


class UsesClairAggregator:
    """The settings and flag history a strategy reads from its ``self.clair`` aggregator."""

    clair: ClairAggregator

    @property
    def config(self) -> ClairConfig:
        """The CLAIR settings of every round."""
        return self.clair.config

    @property
    def flag_history(self) -> dict[int, list[int]]:
        """Every node's flags, one per CLAIR round it took part in."""
        return self.clair.flag_history

    def round_line(self, server_round: int, report: ScreenReport, detail: Mapping[str, object]) -> str:
        """The round's INFO line: the rule that decided, the flagged clients (by partition id when
        their replies report one), what the trusted clients get, server and CLAIR seconds."""
        head = f"{self.clair.label} round {server_round}{detail.get('clair-note', '')}"
        seconds = f"server {float(detail['server-seconds']):.2f} s"  # type: ignore[arg-type]
        rejected = self.rejected_text(report)  # type: ignore[attr-defined]
        if DECISION_KEY not in detail:
            reason = detail.get("clair-fallback-reason", "no usable uploads")
            return f"{head}: not decided ({reason}), {self.clair.fallback}{rejected}, {seconds}"
        flagged = client_names(detail.get("flagged-node-ids", []), self.partition_of)  # type: ignore[arg-type, attr-defined]
        tail = f", {self.clair.fallback}" if detail.get("clair-fallback") else ""
        return (f"{head}: decided by {detail[DECISION_KEY]}, flagged {flagged}, trusted clients get "
                f"{detail.get('trusted-get')}{tail}{rejected}, {seconds} "
                f"(CLAIR {float(detail.get('clair-seconds', 0.0)):.2f} s)")  # type: ignore[arg-type]
