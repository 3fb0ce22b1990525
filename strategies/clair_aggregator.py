"""One CLAIR round on the server, for both CLAIR strategies.

:class:`ClairAggregator` is what :class:`~clair_flower.strategies.clair.ClairStrategy` (full adapters) and
:class:`~clair_flower.strategies.clair_rolora.ClairRoLoRA` (one factor per round) share: it runs
:func:`clair_flower.clair.run_clair` on one round's uploads, keeps every node's flag and
score-z histories, and builds the round's metrics and its one INFO log line. One failure rule:
with fewer than 3 uploads, or when ``run_clair`` (or turning the uploads into LoRA factors)
raises any exception, the round falls back (its type and message are logged as a WARNING and
the metrics say ``clair-fallback = 1``); what a fallback means is the strategy's business
(ClairStrategy keeps every adapter, ClairRoLoRA skips the round).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.supercore import log

from clair_flower.clair import ClairConfig, ClairResult, run_clair
from clair_flower.lora import LoraFactors
from clair_flower.strategies.uploads import Upload

DECISIONS = ("vote", "fallback", "none")
"""Which rule decided a round's flags (see :attr:`clair_flower.clair.ClairResult.decision`)."""

MIN_UPLOADS = 3
"""CLAIR compares pairwise differences: with fewer uploads there is no majority to trust."""

FALLBACK_METRICS: dict[str, object] = {"clair-fallback": 1, "num-flagged": 0}


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
            return None, dict(FALLBACK_METRICS)
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
            return None, dict(FALLBACK_METRICS)
        seconds = time.perf_counter() - t0
        log(INFO, "%s round %d%s: decided by %s, flagged %s, trusted clients get %s, %.2f s", self.label,
            server_round, note, result.decision, sorted(result.flagged) or "none",
            result.diagnostics.get("trusted_get", "refined"), seconds)
        for nid, client in result.clients.items():
            self.flag_history.setdefault(nid, []).append(int(client.flagged))
            self.score_z_history.setdefault(nid, []).append(float(client.score_z))
        return result, self.round_metrics(result, [u.node_id for u in uploads], seconds)

    @staticmethod
    def round_metrics(result: ClairResult, nids: list[int], seconds: float) -> dict[str, object]:
        """Flags, votes, scores, the decision, lambda and the solver's health of one round."""
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
            "lambda": float(np.nanmedian(lams)) if lams else float("nan"),
            "solver-ok": int(ok),
            "solver-seconds": float(diag.get("seconds", seconds)),
            "clair-seconds": float(seconds),
            "max-truncation-error": float(max(trunc, default=0.0)),
        }


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
