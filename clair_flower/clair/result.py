"""What one CLAIR aggregation returns: per client, per module and for the round."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np

from clair_flower.lora import LoraFactors

ClientId = Hashable


@dataclass
class ClientReport:
    """One client's outcome. ``refined`` maps modules to factors at the client's rank; for large
    modules these are :class:`~clair_flower.clair.refinement.DeferredFactors`, built when read."""

    vote: float
    score: float
    flagged: bool
    refined: dict[str, LoraFactors]
    truncation_error: dict[str, float]
    reason: str = ""
    in_subspace_z: float | None = None
    clean_vote: float = 0.0
    """Flagged fraction of the pairs whose partner is not flagged (the decision statistic)."""
    score_z: float = 0.0
    """Robust z-score of ``score`` among this round's clients (what a caller keeps as history
    and what a round without structure flags on)."""
    distance: float = 0.0
    """Mean distance of the client's update to the others', on each module's block scale, RMS
    over modules (:func:`~clair_flower.clair.detection.client_scores` of the raw differences)."""


@dataclass
class ModuleReport:
    """One module's shared subspace ``U`` (p x rank) and its diagnostics (JSON values)."""

    U: np.ndarray
    rank: int
    diagnostics: dict


@dataclass
class ClairResult:
    """The round: collaborative and flagged clients, per-client reports, the consensus
    (mean of the collaborative updates) per module, per-module reports and diagnostics."""

    collaborative_set: frozenset
    flagged: frozenset
    clients: dict
    consensus: dict[str, LoraFactors]
    modules: dict[str, ModuleReport]
    diagnostics: dict = field(default_factory=dict)
    decision: str = "vote"
    """Which rule decided the flags: ``"vote"`` (the pair vote, on a round whose decomposition
    found structure), ``"fallback"`` (no structure or an inconclusive vote: robust outliers of
    the score) or ``"none"`` (neither flagged anyone)."""
