"""Step 4: from the block-sparse part to a collaborative set, plus the in-subspace second stage.

* Pair evidence: ``e_kl = ||S_kl||_F / median_{ij} ||M_ij||_F`` per module (the block scale is the
  median block norm of the normalised stack, robust to the contaminated minority).
* Multi-module rule: a **joint group norm** over modules, ``e_kl = sqrt(mean_m e_kl(m)^2)``, i.e.
  the Frobenius norm of the pair's ``S`` over all modules after each module is put on its own
  block scale, divided by ``sqrt(#modules)``: the reported score. The round's flags are the union
  of the votes of the modules whose chosen point is admissible (``run.py``), each pair judged
  against the noise-calibrated threshold of :mod:`clair_flower.clair.calibration`; the joint norm
  diluted the few modules that separate the contaminated clients.
* Distance score: the same mean, with ``||M_kl||`` (the raw difference) in place of ``||S_kl||``:
  a client's mean distance to the others on each module's block scale. It needs no structure,
  so it is what a round without structure flags on (robust outliers of it).
* Votes: pairs whose difference is numerically zero (``||M_kl|| <= 1e-9`` block scale, e.g. two
  colluders uploading the same update) carry no evidence and are left out of both the vote and the
  consistency check. ``vote_k`` = flagged fraction of client k's informative pairs; the
  continuous ``score_k`` is the mean ``e_kl`` over them. The decision uses the majority over the
  pairs whose partner is not itself flagged (``clean_vote``, iterated from the plain majority; see
  :func:`majority_vote`): needed for sampled pair sets, identical to the plain vote otherwise.
* In-subspace second stage (optional, ``docs/DESIGN.md`` section 3, CLAIR+): the off-subspace test cannot see
  attacks inside ``span(U)`` (sign flip, scaling, IPM). Two one-sided robust tests on the clients
  still in the collaborative set, either of which flags a client:

  - *magnitude*: a robust z-score of ``||c_k - median_j c_j||`` on the coefficients
    ``c_k = U^T dW_k`` (median/MAD across clients, joint over modules) above ``z_threshold``;
  - *direction*: a robust z-score of the client's median cosine to the others (mean over modules
    of ``cos(dW_k, dW_l)``, median over partners ``l``) below ``-z_threshold``, with that median
    cosine negative. An update that
    points against what most clients share (sign flip, IPM) has a negative median cosine
    whatever ``U`` is; the magnitude test missed both on the copy task, whose updates share no
    low-rank ``U`` and whose task direction lies mostly outside the ``U`` CLAIR estimates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from clair_flower.clair.decomposition import Pair

ZERO_BLOCK_RTOL = 1e-9


def block_scale(block_norms: np.ndarray) -> float:
    """Median norm of the non-zero blocks (the unit in which ``||S_kl||`` is judged)."""
    nz = block_norms[block_norms > 0]
    return float(np.median(nz)) if nz.size else 1.0


def pair_evidence(S_norms: np.ndarray, block_norms: np.ndarray) -> np.ndarray:
    """``||S_kl|| / block scale`` for one module."""
    return np.asarray(S_norms, dtype=np.float64) / block_scale(block_norms)


def informative_pairs(block_norms: np.ndarray) -> np.ndarray:
    """Pairs whose difference is not numerically zero."""
    return block_norms > ZERO_BLOCK_RTOL * block_scale(block_norms)


def combine_modules(evidence: Sequence[np.ndarray]) -> np.ndarray:
    """Joint group norm over modules: ``sqrt(mean_m e_kl(m)^2)``."""
    E = np.stack([np.asarray(e, dtype=np.float64) for e in evidence])
    return np.sqrt(np.mean(E**2, axis=0))


def client_scores(pairs: Sequence[Pair], n: int, evidence: np.ndarray, informative: np.ndarray) -> np.ndarray:
    """Mean evidence of each client's informative pairs (0 for a client with none)."""
    return _fractions(pairs, n, np.zeros(len(pairs)), evidence, lambda i, o: informative[i])[1]


@dataclass
class Votes:
    """Per-client outcome of the vote (indices are client positions)."""

    vote: np.ndarray
    """Plain vote: flagged fraction of the client's informative pairs."""
    score: np.ndarray
    flagged: np.ndarray
    pair_flags: np.ndarray
    clean_vote: np.ndarray
    """Vote over the pairs whose partner is not flagged (the decision statistic)."""


def _fractions(pairs, n, pf, values, use) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cnt, tot, ssum = np.zeros(n), np.zeros(n), np.zeros(n)
    for i, (k, l) in enumerate(pairs):
        for c, other in ((k, l), (l, k)):
            if use(i, other):
                tot[c] += 1
                cnt[c] += pf[i]
                ssum[c] += values[i]
    frac = np.divide(cnt, tot, out=np.zeros(n), where=tot > 0)
    mean = np.divide(ssum, tot, out=np.zeros(n), where=tot > 0)
    return frac, mean, tot


def majority_vote(
    pairs: Sequence[Pair], n: int, evidence: np.ndarray, informative: np.ndarray,
    flag_threshold: float, vote_threshold: float = 0.5, max_rounds: int = 10,
) -> Votes:
    """Flag pairs by ``evidence > flag_threshold``, then clients by majority.

    Start from the plain majority vote; then, until it stops changing, re-vote each client over
    only the pairs whose partner is currently not flagged (a pair is flagged when *either* end is
    contaminated, so a benign client whose sampled partners happen to be mostly contaminated
    would otherwise lose a plain vote). A client with no such pair keeps its plain vote. With
    all pairs and a contaminated minority both votes give the same set; with a sampled pair set
    only the second is reliable.
    """
    pf = (evidence > flag_threshold) & informative
    vote, score, _ = _fractions(pairs, n, pf, evidence, lambda i, o: informative[i])
    flagged = vote > vote_threshold
    clean = vote
    for _ in range(max_rounds):
        cv, _, tot = _fractions(pairs, n, pf, evidence, lambda i, o: informative[i] and not flagged[o])
        clean = np.where(tot > 0, cv, vote)
        new = clean > vote_threshold
        if np.array_equal(new, flagged):
            break
        flagged = new
    return Votes(vote, score, flagged, pf, clean)


def consistency(pairs: Sequence[Pair], pair_flags: np.ndarray, flagged: np.ndarray,
                informative: np.ndarray) -> float:
    """Fraction of informative pairs with at most one flagged end where ``flagged(k,l) == (k or
    l flagged)``.

    1.0 means the flagged-pair pattern is explained by a client set, which is what the
    model predicts when the decomposition separated benign from contaminated correctly. The
    model says nothing about a pair of two contaminated clients: independent attackers differ
    (flagged pair), a coordinated group sending near-copies does not (its pairs cost nothing in
    ``S``). Such pairs are left out; counting them as inconsistent rejected the right point of
    the lambda path for every group of near-copies above ~2% of the pairs (issue #18).
    """
    ok = tot = 0
    for i, (k, l) in enumerate(pairs):
        if informative[i] and not (flagged[k] and flagged[l]):
            tot += 1
            ok += bool(pair_flags[i]) == bool(flagged[k] or flagged[l])
    return ok / tot if tot else 1.0


def robust_z(x: np.ndarray) -> np.ndarray:
    """``(x - median) / (1.4826 MAD)``, with a floor on the MAD for identical values."""
    med = float(np.median(x))
    mad = 1.4826 * float(np.median(np.abs(x - med)))
    floor = 1e-12 * max(float(np.max(np.abs(x))), 1e-300)
    return (x - med) / max(mad, floor)


def in_subspace_scores(coeffs: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """Joint robust distance of each client's in-subspace coefficients to the median client.

    ``coeffs[m][j]`` is ``U_m^T dW_j`` (r x q) of candidate j in module m. Each module's
    distances are divided by their median so modules weigh equally, then combined as an RMS.
    """
    per_module = []
    for cm in coeffs:
        C = np.stack([np.asarray(c, dtype=np.float64) for c in cm])
        med = np.median(C, axis=0)
        d = np.sqrt(np.sum((C - med) ** 2, axis=(1, 2)))
        scale = float(np.median(d))
        per_module.append(d / scale if scale > 0 else d)
    return np.sqrt(np.mean(np.stack(per_module) ** 2, axis=0))


def in_subspace_flags(coeffs: Sequence[Sequence[np.ndarray]], z_threshold: float = 3.5
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Robust z-scores of :func:`in_subspace_scores` and the flags ``z > z_threshold``."""
    z = robust_z(in_subspace_scores(coeffs))
    return z, z > z_threshold


def product_gram(B: Sequence[np.ndarray], A: Sequence[np.ndarray]) -> np.ndarray:
    """``G_kl = <B_k A_k, B_l A_l>_F`` in float64 from the factors (no dense product).

    Invariant to re-factoring ``(B R, R^-1 A)``: it depends on the products only.
    """
    B64 = [np.asarray(b, dtype=np.float64) for b in B]
    A64 = [np.asarray(a, dtype=np.float64) for a in A]
    n = len(B64)
    G = np.empty((n, n))
    for k in range(n):
        for l in range(k, n):
            G[k, l] = G[l, k] = float(np.sum((B64[k].T @ B64[l]) * (A64[k] @ A64[l].T)))
    return G


def mean_cosines(grams: Sequence[np.ndarray]) -> np.ndarray:
    """Mean over modules of the clients' pairwise cosines ``G_kl / sqrt(G_kk G_ll)``.

    Each module weighs equally whatever its norm; a client with a zero update in a module gets
    cosine 0 there (no direction).
    """
    out = []
    for G in grams:
        d = np.sqrt(np.clip(np.diag(G), 0.0, None))
        den = np.outer(d, d)
        out.append(np.divide(G, den, out=np.zeros_like(G), where=den > 0))
    return np.mean(out, axis=0)


def direction_scores(cosines: np.ndarray) -> np.ndarray:
    """Each client's median cosine to the other clients.

    The median over partners keeps a benign client's score benign while contaminated clients
    are a minority of its partners, and a contaminated client's score is read off its benign
    partners even when the contaminated ones upload identical updates (cosine 1 to each other).
    """
    C = np.asarray(cosines, dtype=np.float64)
    n = len(C)
    return np.array([np.median(np.delete(C[k], k)) for k in range(n)]) if n > 1 else np.zeros(n)


def direction_flags(cosines: np.ndarray, z_threshold: float = 3.5) -> tuple[np.ndarray, np.ndarray]:
    """Robust z of :func:`direction_scores` and the flags: ``z < -z_threshold`` *and* a negative
    median cosine (the update points, on balance, against its partners').

    One-sided: an update more aligned with the others than the benign ones is not taken as
    evidence. The sign condition gives the scale-free z an absolute meaning: on the synthetic
    model benign cosines are ~0.95 with a MAD of ~0.003, so z alone flagged a group at 0.92 that
    is a benign update as far as the model can tell (``test_colluders``).
    """
    scores = direction_scores(cosines)
    z = robust_z(scores)
    return z, (z < -z_threshold) & (scores < 0)
