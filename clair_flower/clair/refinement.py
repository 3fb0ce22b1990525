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


def top_factors(left: np.ndarray, s: np.ndarray, right: np.ndarray, rank: int, scaling: float, dtype,
                total2: float | None = None) -> tuple[LoraFactors, float]:
    """Rank-``rank`` factors from the top singular triplets.

    The error counts every value of ``s``, or is taken against ``total2`` (the exact squared
    norm) when ``s`` holds only the leading values.
    """
    k = min(rank, left.shape[1])
    f, _ = refactor_lowrank(left[:, :k], np.diag(s[:k]), right[:k], rank, scaling, dtype=dtype)
    if total2 is None:
        total2, tail2 = float(np.sum(s**2)), float(np.sum(s[k:] ** 2))
    else:
        tail2 = max(float(total2) - float(np.sum(s[:k] ** 2)), 0.0)
    return f, (float(np.sqrt(tail2 / total2)) if total2 > 0 else 0.0)


def mean_factors(B: Sequence[np.ndarray], A: Sequence[np.ndarray], members: Sequence[int]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Factors of ``mean_{l in members} B_l A_l`` (scaling already folded into ``B``)."""
    Bm = np.concatenate([B[l] for l in members], axis=1)
    Bm *= 1.0 / len(members)
    Am = np.concatenate([A[l] for l in members], axis=0)
    return Bm, Am


RANGE_MIN_COLUMNS = 256
"""Collaborative factor columns (sum of ranks) above which, given the clients' inner products,
the mean's dominant range is found by subspace iteration instead of two Gram
eigendecompositions of that size: 0.15 s to 0.05 s per module at N = 50, rank 8 (360 columns),
for a mean truncation error 0.3% higher (1.4638e-2 to 1.4680e-2); 1.5 s to 0.1 s at N = 100,
rank 16."""
RANGE_OVERSAMPLE = 10
RANGE_PASSES = 1


def refine_module(
    B: Sequence[np.ndarray], A: Sequence[np.ndarray], scalings: Sequence[float], U: np.ndarray,
    collaborative: Sequence[int], policy: str = "consensus", z_rank: int | None = None,
    inner: np.ndarray | None = None,
) -> tuple[list[LoraFactors], list[float], LoraFactors]:
    """Refined factors (at each client's own rank) and truncation errors for one module.

    ``B[k]`` carries the scaling (``dW_k = B[k] @ A[k]``); ``scalings[k]`` is divided back out.
    ``z_rank`` is the number of terms of ``Z`` kept (default ``r_max + r_hat``; larger is exact
    in more cases and costs more). ``inner`` (``<dW_k, dW_l>`` for all clients, as the
    reduction computes it) enables the large-module path of :func:`_refine_ranged`. Returns
    ``(refined per client, truncation error per client, consensus at the max rank)``.
    """
    if policy not in POLICIES:
        raise ValueError(f"flagged_policy must be one of {POLICIES}, got {policy!r}")
    dtype = B[0].dtype
    ranks = [b.shape[1] for b in B]
    r_max = max(ranks)
    members = sorted(collaborative)
    Bm, Am = mean_factors(B, A, members)
    if inner is not None and Bm.shape[1] > RANGE_MIN_COLUMNS:
        return _refine_ranged(B, A, scalings, U, members, policy, Bm, Am, inner,
                              r_max + U.shape[1] if z_rank is None else z_rank)
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
            f = LoraFactors(B=np.zeros_like(B[k]), A=np.zeros_like(A[k]), scaling=float(scalings[k]))
            err = 0.0
        refined.append(f)
        errors.append(float(err))
    return refined, errors, consensus


def _dominant_range(Bm: np.ndarray, Am: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Orthonormal ``p x k`` basis of the dominant left range of ``Bm @ Am`` (subspace iteration)."""
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(Bm @ (Am @ rng.standard_normal((Am.shape[1], k)).astype(Am.dtype)))[0]
    for _ in range(RANGE_PASSES):
        W = np.linalg.qr(Am.T @ (Bm.T @ Q))[0]
        Q = np.linalg.qr(Bm @ (Am @ W))[0]
    return Q


def _refine_ranged(B, A, scalings, U, members, policy, Bm, Am, inner, t) -> tuple[
        list[LoraFactors], list[float], LoraFactors]:
    """:func:`refine_module` for large modules: ``Z`` and ``m`` kept on a found range.

    The mean's dominant range ``Q_m`` (``r_hat + t`` + oversampling columns) gives the
    consensus and, projected off ``U``, the basis ``Q_z`` of ``Z``'s kept part ``Q_z Q_z^T Z``.
    Each benign client's ``P dW_k + Q_z Q_z^T Z = [U, Q_z] R_k`` is re-factored from the small
    Gram ``R_k R_k^T``. Errors stay exact: ``||Z||^2 = ||m||^2 - ||U^T m||^2`` with ``||m||^2``
    from ``inner``, and the dropped part of ``Z`` is orthogonal to ``[U, Q_z]``.
    """
    dtype = B[0].dtype
    ranks = [b.shape[1] for b in B]
    r_max = max(ranks)
    Uw = U.astype(dtype)
    idx = np.asarray(members)
    m_norm2 = float(inner[np.ix_(idx, idx)].sum()) / len(members) ** 2
    Qm = _dominant_range(Bm, Am, U.shape[1] + t + RANGE_OVERSAMPLE)
    K = np.concatenate([Qm, Uw], axis=1).T @ Bm  # [Q_m, U]^T B_members / |C|
    KA = (K @ Am).astype(np.float64)
    mq, um = KA[: Qm.shape[1]], KA[Qm.shape[1] :]  # Q_m^T m and U^T m
    u, m_s, m_right = np.linalg.svd(mq, full_matrices=False)
    m_left = Qm @ u.astype(dtype)
    kmax = int(np.argmax(ranks))
    consensus, _ = top_factors(m_left, m_s, m_right, r_max, scalings[kmax], dtype, m_norm2)
    QmU = (Qm.T @ Uw).astype(np.float64)
    Qz = Qm - Uw @ QmU.T.astype(dtype)
    uz, sz, vzt = np.linalg.svd(Qz - Uw @ (Uw.T @ Qz), full_matrices=False)  # twice: orthogonal to U
    keep = sz > 1e-5  # directions of Q_m (almost) inside span(U) carry nothing of Z
    Qz = uz[:, keep]
    # Q_z^T Z = Q_z^T m (Q_z is orthogonal to U), from the products at hand: Q_z = (I - P) Q_m V / s
    Zq = (vzt[keep] / sz[keep, None]) @ (mq - QmU @ um)
    z_tail2 = max(m_norm2 - float(np.sum(um**2)) - float(np.sum(Zq**2)), 0.0)
    left = np.concatenate([Uw, Qz], axis=1)
    ZZ = Zq @ Zq.T
    z_rows = Zq.astype(dtype)
    consensus_at: dict[tuple, tuple[LoraFactors, float]] = {}  # flagged clients share one per rank
    benign = _refactor_members(left, K[Qm.shape[1] :].astype(np.float64) * len(members), Am, A, members,
                               ranks, scalings, ZZ, z_tail2, z_rows)
    refined, errors = [], []
    for k in range(len(B)):
        if k in benign:
            f, err = benign[k]
        elif policy == "consensus":
            key = (ranks[k], float(scalings[k]))
            if key not in consensus_at:
                consensus_at[key] = top_factors(m_left, m_s, m_right, ranks[k], scalings[k], dtype, m_norm2)
            f, err = consensus_at[key]
        elif policy == "local":
            own = lowrank_svd(B[k], A[k])
            f, err = refactor_lowrank(own.left, np.diag(own.s), own.right, ranks[k], scalings[k], dtype=dtype)
        else:
            f, err = LoraFactors(B=np.zeros_like(B[k]), A=np.zeros_like(A[k]), scaling=float(scalings[k])), 0.0
        refined.append(f)
        errors.append(float(err))
    return refined, errors, consensus


class DeferredFactors(LoraFactors):
    """Refined factors ``B = left @ b_coef``, ``A = a_own @ A_k + a_z @ Z_rows``, built on access.

    At LLM sizes every client's refined adapter is as large as its upload; holding them all
    beside the uploads would double the server's memory. The pieces kept here are shared
    (``left``, ``Z_rows``), the client's own upload (``A_k``) and matrices of rank size, so a
    round's result costs little memory and a caller (e.g. a strategy serialising one reply at a
    time) builds each adapter when it needs it. Each access builds anew: keep what you use.
    """

    def __init__(self, left: np.ndarray, b_coef: np.ndarray, a_own: np.ndarray, A_k: np.ndarray,
                 a_z: np.ndarray, z_rows: np.ndarray, scaling: float) -> None:
        object.__setattr__(self, "_parts", (left, b_coef, a_own, A_k, a_z, z_rows))
        object.__setattr__(self, "scaling", float(scaling))

    @property
    def A(self) -> np.ndarray:  # type: ignore[override]
        _, _, a_own, A_k, a_z, z_rows = self._parts
        return a_own @ A_k + a_z @ z_rows

    @property
    def B(self) -> np.ndarray:  # type: ignore[override]
        left, b_coef = self._parts[:2]
        return left @ b_coef

    @property
    def rank(self) -> int:
        return int(self._parts[1].shape[1])

    @property
    def out_features(self) -> int:
        return int(self._parts[0].shape[0])

    @property
    def in_features(self) -> int:
        return int(self._parts[3].shape[1])

    @property
    def nbytes(self) -> int:
        return (self.out_features + self.in_features) * self.rank * self._parts[0].dtype.itemsize


def _refactor_members(left: np.ndarray, CB: np.ndarray, Am: np.ndarray, A: Sequence[np.ndarray],
                      members: Sequence[int], ranks: Sequence[int], scalings: Sequence[float], ZZ: np.ndarray,
                      z_tail2: float, z_rows: np.ndarray) -> dict[int, tuple[LoraFactors, float]]:
    """Best rank-``r_k`` factors of ``left @ R_k``, ``R_k = [c_k A_k; Zq]``, for every member ``k``.

    ``CB = U^T [B_members]`` holds the ``c_k`` side by side, ``Am`` the members' ``A`` rows and
    ``z_rows`` is ``Zq`` in the working dtype. ``R_k = W diag(s) V^T`` from the eigh of
    ``R_k R_k^T = [[c_k G_k c_k^T, c_k A_k Zq^T], [., Zq Zq^T]]`` with ``G_k = A_k A_k^T``, so
    neither ``V`` nor ``c_k A_k`` is formed: ``A~ = diag(1/sqrt(s scaling)) W_r^T R_k``. Balanced
    split as in :func:`clair_flower.lora.refactor`; the error includes the dropped tail of ``Z``.
    Clients of equal rank are done in one batch. The factors are :class:`DeferredFactors`
    sharing ``left`` and ``z_rows``.
    """
    dtype = z_rows.dtype
    h, tz = CB.shape[0], ZZ.shape[0]
    off = np.concatenate([[0], np.cumsum([ranks[k] for k in members])]).astype(int)
    AZ = (Am @ z_rows.T).astype(np.float64)  # A_k Zq^T for every member, stacked
    by_rank: dict[int, list[int]] = {}
    for j, k in enumerate(members):
        by_rank.setdefault(ranks[k], []).append(j)
    out: dict[int, tuple[LoraFactors, float]] = {}
    for r, js in by_rank.items():
        g = len(js)
        rows_of = np.concatenate([np.arange(off[j], off[j] + r) for j in js])
        C = CB[:, rows_of].reshape(h, g, r).transpose(1, 0, 2)  # (g, h, r)
        A3 = Am[rows_of].reshape(g, r, -1)
        Gk = np.matmul(A3, A3.transpose(0, 2, 1)).astype(np.float64)
        G = np.empty((g, h + tz, h + tz))
        G[:, :h, :h] = np.matmul(np.matmul(C, Gk), C.transpose(0, 2, 1))
        G[:, :h, h:] = np.matmul(C, AZ[rows_of].reshape(g, r, tz))
        G[:, h:, :h] = G[:, :h, h:].transpose(0, 2, 1)
        G[:, h:, h:] = ZZ
        e, W = np.linalg.eigh(G)
        e, W = np.maximum(e[:, ::-1], 0.0), W[:, :, ::-1]
        sc = np.asarray([scalings[members[j]] for j in js], dtype=np.float64)[:, None]
        kept = min(r, e.shape[1])
        valid = e[:, :kept] > 1e-14 * e[:, :1]
        s_ = np.where(valid, np.sqrt(e[:, :kept]), 0.0)
        Wr = W[:, :, :kept] * valid[:, None, :]
        b_coef = np.zeros((g, W.shape[1], r))
        b_coef[:, :, :kept] = Wr * np.sqrt(s_ / sc)[:, None, :]
        rows = Wr.transpose(0, 2, 1) / np.where(valid, np.sqrt(np.maximum(s_, 1e-300) * sc), 1.0)[:, :, None]
        a_own = np.zeros((g, r, r))
        a_own[:, :kept] = np.matmul(rows[:, :, :h], C)
        a_z = np.zeros((g, r, tz))
        a_z[:, :kept] = rows[:, :, h:]
        dropped = np.arange(e.shape[1])[None, :] >= valid.sum(axis=1)[:, None]
        total2 = e.sum(axis=1) + z_tail2
        tail2 = np.where(dropped, e, 0.0).sum(axis=1) + z_tail2
        err = np.sqrt(np.divide(tail2, total2, out=np.zeros_like(total2), where=total2 > 0))
        for i, j in enumerate(js):
            k = members[j]
            f = DeferredFactors(left, b_coef[i].astype(dtype), a_own[i].astype(dtype), A[k],
                                a_z[i].astype(dtype), z_rows, scalings[k])
            out[k] = (f, float(err[i]))
    return out
