"""The pair threshold, calibrated to the benign pairs' own off-subspace noise.

In the paper's noiseless model a benign pair's block of ``S`` is zero, so any fixed small
threshold separates it from a contaminated pair. Real LoRA updates are not noiseless: on the copy
task, at the path point whose ``L`` has the planted rank, a benign pair keeps 20-40% of a typical
difference in ``S`` (docs/identification.md, "noise-calibrated vote"), above the fixed
``flag_threshold`` of 0.25, so every pair was flagged and the vote decided nothing. A pair is
therefore flagged when its evidence exceeds ``max(flag_threshold, noise_factor * noise)``, where
``noise`` is the median evidence of the pairs among the half of the clients with the lowest
median evidence: with a contaminated minority that half is benign, so ``noise`` is a benign
pair's level whatever the attackers send. On noiseless data ``noise`` is ~0 and the rule is the
fixed threshold, as before.

The calibration only ever *finds* a contaminated minority: a point whose calibrated vote flags
nobody is judged with the fixed threshold instead (:func:`calibrated_vote`). Otherwise a large
``c``, where ``L`` has absorbed the contaminated differences and ``S`` is uniformly small,
certified "nobody is contaminated" on rounds the fixed rule left to the score fallback (the
FlowerTune-style test's random-target clients were lost that way).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from clair_flower.clair import detection
from clair_flower.clair.decomposition import Pair


@dataclass(frozen=True)
class PairThreshold:
    """The threshold a point's pairs are judged against, and the benign noise it came from."""

    noise: float
    """Median evidence of the pairs among the lower half of the clients (a benign pair's level)."""
    threshold: float
    """``max(flag_threshold, noise_factor * noise)``."""


def benign_noise(pairs: Sequence[Pair], n: int, evidence: np.ndarray, informative: np.ndarray) -> float:
    """Median evidence over the informative pairs of the ``ceil(n / 2)`` clients whose own median
    evidence is lowest: those clients are benign when the contaminated clients are a minority."""
    ev = np.asarray(evidence, dtype=np.float64)
    P = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    use = np.asarray(informative, dtype=bool)
    if not use.any():
        return 0.0
    per_client = client_medians(P[use], ev[use], n)
    core = np.zeros(n, dtype=bool)
    core[np.argsort(per_client, kind="stable")[: (n + 1) // 2]] = True
    inner = use & core[P[:, 0]] & core[P[:, 1]]
    return float(np.median(ev[inner])) if inner.any() else float(np.median(ev[use]))


def client_medians(P: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Per client, the median of ``values`` over the pairs ``P`` it belongs to (``inf`` for a
    client in none): one sort of the pair ends instead of a mask per client, bitwise the same
    as ``np.median`` of each client's values (the mean of the two middle ones when even)."""
    ends = np.concatenate([P[:, 0], P[:, 1]])
    vals = np.concatenate([values, values])
    order = np.lexsort((vals, ends))
    ends, vals = ends[order], vals[order]
    count = np.bincount(ends, minlength=n)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    out = np.full(n, np.inf)
    has = count > 0
    lo = start[has] + (count[has] - 1) // 2
    hi = start[has] + count[has] // 2
    out[has] = (vals[lo] + vals[hi]) / 2
    return out


def pair_threshold(pairs: Sequence[Pair], n: int, evidence: np.ndarray, informative: np.ndarray,
                   flag_threshold: float, noise_factor: float) -> PairThreshold:
    """The calibrated threshold (module docstring); ``noise_factor = 0`` gives the fixed one."""
    noise = benign_noise(pairs, n, evidence, informative) if noise_factor > 0 else 0.0
    return PairThreshold(noise=noise, threshold=max(float(flag_threshold), noise_factor * noise))


def calibrated_vote(pairs: Sequence[Pair], n: int, evidence: np.ndarray, informative: np.ndarray,
                    flag_threshold: float, noise_factor: float, vote_threshold: float
                    ) -> tuple[detection.Votes, PairThreshold]:
    """The vote at the calibrated threshold, or at the fixed one when the calibrated vote flags
    nobody (module docstring); the threshold actually used is returned with it."""
    th = pair_threshold(pairs, n, evidence, informative, flag_threshold, noise_factor)
    votes = detection.majority_vote(pairs, n, evidence, informative, th.threshold, vote_threshold)
    if not votes.flagged.any() and th.threshold > flag_threshold:
        th = PairThreshold(noise=th.noise, threshold=float(flag_threshold))
        votes = detection.majority_vote(pairs, n, evidence, informative, th.threshold, vote_threshold)
    return votes, th
