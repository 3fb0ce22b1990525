"""Steps 5 and 6: subspace-projected refinement and re-factoring to each client's rank.

For k in the collaborative set ``C``, with ``P = U U^T``,
``dW~_k = P dW_k + (I - P) m``, ``m = mean_{l in C} dW_l``. Everything stays in factor form:

* ``P dW_k = U a_k`` with ``a_k = (U^T B_k) A_k`` (r_hat x q);
* ``Z = (I - P) m = ((I - P) B_C) A_C / |C|`` is common to all of C, so its SVD is computed once
  (exactly, by QR of both factors) and truncated to ``t = r_max + r_hat`` terms;
* ``dW~_k ~ [U, U_Z] [a_k; S_Z V_Z^T]`` with orthonormal left factor (``U_Z`` is orthogonal to
  ``U``), re-factored by :func:`clair_flower.lora.refactor_lowrank` at the client's rank.

The reported truncation error is exact for ``dW~_k``: because ``col(Z_tail)`` is orthogonal to
``U`` and to ``U_Z``, ``||dW~_k - F_k||^2 = (SVD tail of the kept part)^2 + ||Z_tail||^2``.
Flagged clients get the policy: ``consensus`` (``m`` at their rank), ``local`` (their own update
re-factored) or ``zero``; their updates never enter ``m``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from clair_flower.lora import LoraFactors, refactor_lowrank

POLICIES = ("consensus", "local", "zero")


@dataclass
class LowRankSVD:
    """``left @ diag(s) @ right`` with orthonormal ``left`` columns and ``right`` rows."""

    left: np.ndarray
    s: np.ndarray
    right: np.ndarray


def lowrank_svd(B: np.ndarray, A: np.ndarray) -> LowRankSVD:
    """Exact thin SVD of ``B @ A`` from QR of both factors (never forms ``B @ A``)."""
    Qb, Rb = np.linalg.qr(B)
    Qa, Ra = np.linalg.qr(A.T)
    u, s, vt = np.linalg.svd((Rb.astype(np.float64) @ Ra.T.astype(np.float64)), full_matrices=False)
    return LowRankSVD(Qb @ u.astype(Qb.dtype), s, vt.astype(Qa.dtype) @ Qa.T)


@dataclass
class GramRoot:
    """``G = V diag(r^2) V^T`` of a factor's Gram matrix, numerically null modes dropped.

    For ``B`` with ``G = B^T B``, ``B = Q diag(r) V^T`` with orthonormal ``Q = B V / r``; the
    same holds for ``A^T``. A Gram costs half a QR and never forms ``Q``: only the few columns
    a caller keeps are lifted (see :func:`gram_svd`).
    """

    V: np.ndarray
    r: np.ndarray

    @classmethod
    def of(cls, G: np.ndarray, dtype: np.dtype) -> "GramRoot":
        e, V = np.linalg.eigh(np.asarray(G, dtype=np.float64))
        e, V = e[::-1], V[:, ::-1]
        rtol = 1e-13 if np.dtype(dtype) == np.float64 else 1e-6
        keep = e > rtol * e[0] if e.size and e[0] > 0 else np.zeros(e.shape, dtype=bool)
        return cls(V[:, keep], np.sqrt(e[keep]))

    def lift(self, X: np.ndarray, coeff: np.ndarray) -> np.ndarray:
        """``Q @ coeff`` for ``X`` the factor (``B``, or ``A^T`` given as ``A`` rows)."""
        return X @ ((self.V / self.r) @ coeff).astype(X.dtype)


def gram_svd(B: np.ndarray, A: np.ndarray, top: int, rootA: GramRoot | None = None) -> tuple[
        np.ndarray, np.ndarray, np.ndarray]:
    """Top ``top`` singular triplets of ``B @ A`` from the two Gram matrices.

    Returns ``left (p x top)``, all singular values, ``right (top x q)``. Costs two Grams
    (``p m^2 + q m^2``) instead of two QRs with explicit ``Q`` (about four times more), which
    is what keeps LLM-sized refinement cheap; ``rootA`` shares the ``A`` side between calls.
    """
    rb = GramRoot.of(B.T @ B, B.dtype)
    ra = rootA if rootA is not None else GramRoot.of(A @ A.T, A.dtype)
    core = (rb.r[:, None] * rb.V.T) @ (ra.V * ra.r[None, :])
    u, s, vt = np.linalg.svd(core, full_matrices=False)
    t = min(top, s.size)
    left = rb.lift(B, u[:, :t])
    right = ra.lift(A.T, vt[:t].T).T
    return left, s, right


def _refactor_sum(left: np.ndarray, right: np.ndarray, rank: int, scaling: float, dtype
                  ) -> tuple[LoraFactors, float, float]:
    """Re-factor ``left @ right`` (orthonormal ``left``); returns factors, tail^2 and total^2."""
    Qr, Rr = np.linalg.qr(right.T)
    core = Rr.T.astype(np.float64)
    f, err = refactor_lowrank(left, core, Qr.T, rank, scaling, dtype=dtype)
    total2 = float(np.sum(core**2))
    return f, err**2 * total2, total2


def top_factors(left: np.ndarray, s: np.ndarray, right: np.ndarray, rank: int, scaling: float, dtype
                 ) -> tuple[LoraFactors, float]:
    """Rank-``rank`` factors from the top singular triplets; the error counts every value of ``s``."""
    k = min(rank, left.shape[1])
    f, _ = refactor_lowrank(left[:, :k], np.diag(s[:k]), right[:k], rank, scaling, dtype=dtype)
    total = float(np.sqrt(np.sum(s**2)))
    return f, (float(np.sqrt(np.sum(s[k:] ** 2)) / total) if total > 0 else 0.0)


def mean_factors(B: Sequence[np.ndarray], A: Sequence[np.ndarray], members: Sequence[int]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Factors of ``mean_{l in members} B_l A_l`` (scaling already folded into ``B``)."""
    Bm = np.concatenate([B[l] for l in members], axis=1) / len(members)
    Am = np.concatenate([A[l] for l in members], axis=0)
    return Bm, Am


def refine_module(
    B: Sequence[np.ndarray], A: Sequence[np.ndarray], scalings: Sequence[float], U: np.ndarray,
    collaborative: Sequence[int], policy: str = "consensus", z_rank: int | None = None,
) -> tuple[list[LoraFactors], list[float], LoraFactors]:
    """Refined factors (at each client's own rank) and truncation errors for one module.

    ``B[k]`` carries the scaling (``dW_k = B[k] @ A[k]``); ``scalings[k]`` is divided back out.
    ``z_rank`` is the number of terms of ``Z`` kept (default ``r_max + r_hat``; larger is exact
    in more cases and costs more). Returns ``(refined per client, truncation error per client,
    consensus at the max rank)``.
    """
    if policy not in POLICIES:
        raise ValueError(f"flagged_policy must be one of {POLICIES}, got {policy!r}")
    dtype = B[0].dtype
    ranks = [b.shape[1] for b in B]
    r_max = max(ranks)
    members = sorted(collaborative)
    Bm, Am = mean_factors(B, A, members)
    Uw = U.astype(dtype)
    rootA = GramRoot.of(Am @ Am.T, Am.dtype)
    t = r_max + U.shape[1] if z_rank is None else z_rank
    Uz, z_s, z_right = gram_svd(Bm - Uw @ (Uw.T @ Bm), Am, t, rootA)
    t = Uz.shape[1]
    Zright = z_s[:t, None].astype(dtype) * z_right
    z_tail2 = float(np.sum(z_s[t:] ** 2))
    left = np.concatenate([Uw, Uz], axis=1)
    m_left, m_s, m_right = gram_svd(Bm, Am, r_max, rootA)
    kmax = int(np.argmax(ranks))
    consensus, _ = top_factors(m_left, m_s, m_right, r_max, scalings[kmax], dtype)
    member_set = set(members)
    refined, errors = [], []
    for k in range(len(B)):
        if k in member_set:
            a_k = (Uw.T @ B[k]) @ A[k]
            f, tail2, total2 = _refactor_sum(left, np.concatenate([a_k, Zright], 0), ranks[k],
                                             scalings[k], dtype)
            err = float(np.sqrt((tail2 + z_tail2) / (total2 + z_tail2))) if total2 + z_tail2 > 0 else 0.0
        elif policy == "consensus":
            f, err = top_factors(m_left, m_s, m_right, ranks[k], scalings[k], dtype)
        elif policy == "local":
            own = lowrank_svd(B[k], A[k])
            f, err = refactor_lowrank(own.left, np.diag(own.s), own.right, ranks[k], scalings[k], dtype=dtype)
        else:
            f = LoraFactors(np.zeros_like(A[k]), np.zeros_like(B[k]), float(scalings[k]))
            err = 0.0
        refined.append(f)
        errors.append(float(err))
    return refined, errors, consensus
