"""Fast exact solver: first-order methods on the reduced problem.

(Over 400 lines: one solver whose ADMM sweep, partial SVT and FISTA share private state and
helpers; split, each part would import the others' internals.)

The problem handed in is usually :func:`~clair_flower.clair.decomposition.reduced_problem`, whose size
depends on the client ranks and the pair count only, so the iterations below never touch
``p x q`` data. Both methods are run to a tight tolerance (default ``1e-7`` relative), which is
what makes them agree with the cvxpy reference rather than merely approximate it.

* Constrained form: inexact augmented Lagrangian (ADMM on ``L + S = X``; Lin, Chen, Ma 2010)
  with the penalty ``mu`` set by residual balancing; stopped on primal and dual residuals.
  The dual and ``S`` are per-block multiples of one array, and everything after the SVT runs
  as one sweep over cache-sized column chunks of the stack (:func:`_sweep`) with torch's
  fused elementwise kernels: the iteration's elementwise part costs as much as its GEMMs.
* Penalized form: FISTA on ``(L, S)`` jointly (the smooth part has Lipschitz constant 2) with
  function-value restart; stopped on the relative change of the iterates.

Singular value thresholding uses a dense thin SVD when the smaller side is modest and a
*verified* partial SVD otherwise: randomised subspace iteration (warm-started from the last
left singular vectors) grown until the smallest computed singular value is below the
threshold, so no singular value above it is missed and the prox is still the exact one up to
the subspace-iteration accuracy.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext

import numpy as np
import scipy.linalg
import torch

from clair_flower.clair.decomposition import BlockProblem, block_norms, objective_constrained, objective_penalized
from clair_flower.clair.solvers import SolveResult, svd_of
from clair_flower.clair.threads import blas_threads, blas_thread_count

DENSE_SVD_MAX = 128
"""Use the exact Gram-eigh SVT when ``min(X.shape)`` is at most this, else the partial one."""

PARTIAL_OVERSAMPLE = 8

SMALL_PROBLEM = 200_000
"""Below this many entries, BLAS runs single-threaded: thread hand-offs on tiny matrices cost
far more than they save (measured 10-60x slower on a loaded 2-core machine)."""


def _block_shrink(Y: np.ndarray, widths: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Prox of ``tau sum ||.||_F`` over column blocks: scale each block towards zero."""
    nrm = block_norms(Y, widths, accumulate=Y.dtype)
    fac = np.where(nrm > tau, 1.0 - tau / np.maximum(nrm, 1e-300), 0.0)
    return Y * np.repeat(fac, widths).astype(Y.dtype, copy=False)[None, :], nrm * fac


class LowRank:
    """``L = left @ right`` kept as factors: the ADMM only ever needs ``T - L``, which it forms
    chunk by chunk with an in-place GEMM, never writing ``L`` out."""

    def __init__(self, left: np.ndarray, right: np.ndarray) -> None:
        self.left, self.right = left, right

    def dense(self) -> np.ndarray:
        return self.left @ self.right


_SYEVR: dict[tuple[str, int], tuple] = {}
"""``(driver, lwork, liwork)`` of LAPACK's ``syevr`` per ``(dtype char, n)``: the workspace query
and scipy's argument checks cost more than the eigendecomposition itself on the 40 x 40 Grams
of a small round (0.6 ms against 0.3 ms per ADMM iteration)."""


def eigh_above(G: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of the symmetric ``G`` with eigenvalues in ``(floor, inf)``, ascending.

    The same LAPACK call as ``scipy.linalg.eigh(G, subset_by_value=(floor, inf),
    driver="evr", check_finite=False)``, so bit-identical results, with the workspace query
    done once per size and dtype.
    """
    n = G.shape[0]
    if n == 0 or G.dtype.char not in "fd":
        return scipy.linalg.eigh(G, subset_by_value=(floor, np.inf), driver="evr", check_finite=False)
    key = (G.dtype.char, n)
    if key not in _SYEVR:
        drv, drvlw = scipy.linalg.lapack.get_lapack_funcs(("syevr", "syevr_lwork"), (G,))
        lwork, liwork, info = drvlw(n, lower=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"syevr workspace query failed (LAPACK info {info})")
        _SYEVR[key] = (drv, int(lwork), int(liwork))
    drv, lwork, liwork = _SYEVR[key]
    w, v, m, _isuppz, info = drv(a=G, overwrite_a=0, range="V", vl=floor, vu=np.inf, lower=1,
                                 compute_v=1, lwork=lwork, liwork=liwork)
    if info != 0:
        raise np.linalg.LinAlgError(f"syevr failed (LAPACK info {info})")
    return w[:m], v[:, :m]


def _svt_gram(Y: np.ndarray, tau: float) -> tuple[LowRank, np.ndarray, np.ndarray | None]:
    """Exact SVT via the eigh of the smaller Gram matrix (LAPACK's SVD of wide blocks is slow).

    ``SVT(Y) = U_k diag(1 - tau/s_k) U_k^T Y`` needs only the singular pairs above ``tau``;
    returns ``L``, its singular values and (wide ``Y``) its left singular vectors;
    the eigenvalues carry absolute error ``eps ||Y||^2``, far below the thresholds used.
    """
    wide = Y.shape[0] <= Y.shape[1]
    G = Y @ Y.T if wide else Y.T @ Y
    # Only the eigenpairs above tau^2 are needed: LAPACK's MRRR (syevr) with a value range
    # skips the rest, about 3x faster than a full eigh at the sizes met here.
    e, V = eigh_above(G, tau * tau)
    s = np.sqrt(np.maximum(e[::-1], 0.0))
    V = V[:, ::-1]
    k = int(np.sum(s > tau))
    Vk = (V[:, :k] * (1.0 - tau / s[:k])).astype(Y.dtype)
    Vw = V[:, :k].astype(Y.dtype)
    L = LowRank(Vk, Vw.T @ Y) if wide else LowRank(Y @ Vw, Vk.T)
    return L, s[:k] - tau, (V[:, :k] if wide else None)


def orthonormal_basis(P: np.ndarray) -> np.ndarray:
    """An orthonormal basis of the columns of a tall ``P`` (full column rank), in ``P``'s dtype.

    Cholesky QR, twice, on the float64 Gram: small GEMMs instead of Householder QR, which cost
    15% of an ADMM iteration on the ``columns x k`` blocks of the partial SVT (numpy's QR is
    1.7x slower on them; scipy's holds the GIL that concurrent solves share). The second pass
    restores orthogonality to float64 precision for condition numbers up to ~1e7; a Gram that
    is not positive definite (rank-deficient ``P``) falls back to Householder.
    """
    V = P.astype(np.float64)
    try:
        for _ in range(2):
            R = np.linalg.cholesky(V.T @ V).T  # upper triangular, V = Q R
            V = V @ scipy.linalg.solve_triangular(R, np.eye(R.shape[0]), check_finite=False)
        if not np.isfinite(V).all():
            raise np.linalg.LinAlgError("Cholesky QR broke down")
    except np.linalg.LinAlgError:
        return np.linalg.qr(P)[0]
    return V.astype(P.dtype, copy=False)


class _SVT:
    """Singular value thresholding with a remembered subspace for the partial path.

    ``left`` holds the left singular vectors of the last result (``None`` if not at hand), so
    the solver need not decompose ``L`` again.
    """

    def __init__(self, seed: int = 0) -> None:
        self.basis: np.ndarray | None = None
        self.left: np.ndarray | None = None
        self.rng = np.random.default_rng(seed)
        self.rank = 8

    def __call__(self, Y: np.ndarray, tau: float, proj: tuple[np.ndarray, np.ndarray] | None = None
                 ) -> tuple[LowRank, np.ndarray]:
        """``SVT_tau(Y)`` as factors, and its nonzero singular values.

        ``proj = (Q, Y^T Q)`` hands in the first pass of the partial SVT, computed by the caller
        while ``Y`` was in cache (``Q`` from :meth:`start`; wide ``Y`` only).
        """
        if min(Y.shape) <= DENSE_SVD_MAX:
            L, s, self.left = _svt_gram(Y, tau)
            return L, s
        L, s = self._partial(Y, tau, proj)
        self.left = self.basis if Y.shape[0] <= Y.shape[1] else None
        return L, s

    def uses_start(self, shape: tuple[int, int]) -> bool:
        """Whether a call on a matrix of this shape takes ``proj`` (partial SVT of a wide matrix)."""
        return min(shape) > DENSE_SVD_MAX and shape[0] <= shape[1]

    def start(self, n: int, dtype, k: int | None = None) -> np.ndarray:
        """Orthonormal ``n x k`` start of the next partial SVT: the last left singular vectors,
        then random columns (``k`` defaults to the last rank plus the oversampling)."""
        k = min(self.rank + PARTIAL_OVERSAMPLE, n) if k is None else k
        start = self.rng.standard_normal((n, k)).astype(dtype)
        if self.basis is not None:
            m = min(self.basis.shape[1], k)
            start[:, :m] = self.basis[:, :m]
        return orthonormal_basis(start)

    def _partial(self, Y: np.ndarray, tau: float, proj: tuple[np.ndarray, np.ndarray] | None = None
                 ) -> tuple[LowRank, np.ndarray]:
        if Y.shape[0] > Y.shape[1]:
            L, s = self._partial(Y.T, tau)
            return LowRank(L.right.T, L.left.T), s
        n = Y.shape[0]
        Q, P = proj if proj is not None else (None, None)
        while True:
            if P is None:
                Q = self.start(n, Y.dtype, None if Q is None else min(2 * Q.shape[1], n))
                P = Y.T @ Q
            # one power half-step to the right space, then Rayleigh-Ritz there: two passes over
            # Y (Y^T Q, then Y V) instead of three; the warm left basis carries the iteration on
            Vq = orthonormal_basis(P)
            YV = (Vq.T @ Y.T).T if Y.flags.f_contiguous else Y @ Vq  # the faster GEMM layout
            u, s, wt = np.linalg.svd(YV.astype(np.float64), full_matrices=False)
            if s[-1] <= tau or Q.shape[1] >= n:
                break  # the k-th value is below tau: none above it was missed
            P = None  # grow the subspace
        keep = int(np.sum(s > tau))
        U = u[:, :keep].astype(Y.dtype)
        self.basis, self.rank = U, max(keep, 1)
        right = wt[:keep].astype(Y.dtype) @ Vq.T
        return LowRank(U * (s[:keep] - tau).astype(Y.dtype), right), s[:keep] - tau


def spectral_norm(X: np.ndarray) -> float:
    """``||X||_2`` from the smaller Gram (exact) or by power iteration (large reduced problems)."""
    if min(X.shape) > DENSE_SVD_MAX:
        return _top_sv(X)
    G = X @ X.T if X.shape[0] <= X.shape[1] else X.T @ X
    return float(np.sqrt(max(np.linalg.eigvalsh(G.astype(np.float64))[-1], 0.0)))


CHUNK_BYTES = 1 << 20
"""Target size of one column chunk of the stack in the ADMM sweep: the chunk and its few
temporaries stay in cache while every elementwise step runs on them."""


def _column_chunks(widths: np.ndarray, rows: int, itemsize: int) -> list[tuple]:
    """``(c0, c1, b0, b1, starts)``: columns ``c0:c1`` holding whole blocks ``b0:b1`` (starting
    at ``starts`` within the chunk), about :data:`CHUNK_BYTES` each (a block wider than that is
    a chunk of its own)."""
    target = max(1, CHUNK_BYTES // max(rows * itemsize, 1))
    off = np.concatenate([[0], np.cumsum(widths)]).astype(int)
    chunks, b0 = [], 0
    while b0 < len(widths):
        b1 = b0 + 1
        while b1 < len(widths) and off[b1 + 1] - off[b0] <= target:
            b1 += 1
        chunks.append((int(off[b0]), int(off[b1]), b0, b1, off[b0:b1] - off[b0]))
        b0 = b1
    return chunks


def _column_views(arr: np.ndarray, chunks: list) -> list[torch.Tensor]:
    """Per chunk, ``arr[:, c0:c1]`` as a transposed torch view (C-contiguous ``w x rows``)
    sharing ``arr``'s memory (``arr`` column-major); made once per solve."""
    return [torch.from_numpy(arr[:, c0:c1].T) for c0, c1, *_ in chunks]


def _per_column(coef: np.ndarray, widths: np.ndarray, dtype) -> torch.Tensor:
    """Per-block coefficients (rows of ``coef``) repeated over each block's columns: one torch
    column vector per row of ``coef``, as the columns of one ``(columns, rows)`` tensor."""
    return torch.from_numpy(np.repeat(np.atleast_2d(coef).T.astype(dtype), widths, axis=0))


def _form_W(X: np.ndarray, views: dict, d: np.ndarray, widths: np.ndarray, chunks: list,
            Q: np.ndarray | None) -> np.ndarray | None:
    """``W = X + Ys - S = X + d T`` (``d = a - s`` per block) and, with a start basis ``Q``,
    ``W^T Q`` (at the start and after a penalty change)."""
    P = None if Q is None else np.empty((X.shape[1], Q.shape[1]), X.dtype)
    dc = _per_column(d, widths, X.dtype)
    for (c0, c1, *_), Xc, Tc, Wc in zip(chunks, views["X"], views["T"], views["W"]):
        torch.addcmul(Xc, Tc, dc[c0:c1], out=Wc)
        if P is not None:
            P[c0:c1] = Wc.numpy() @ Q
    return P


def _sweep(X: np.ndarray, views: dict, coef: tuple[np.ndarray, np.ndarray], L: LowRank, widths: np.ndarray,
           chunks: list, thr: float, Q: np.ndarray | None, buf: torch.Tensor
           ) -> tuple[np.ndarray, float, float, np.ndarray | None]:
    """One ADMM pass after the SVT, chunk by chunk.

    The iterates are kept as ``Ys_b = a_b T_b`` and ``S_b = s_b T_b`` per block ``b``
    (``coef = (a, s)``): the ``S`` step scales ``T+ = X + Ys - L`` blockwise, so the new ``S``
    and dual are ``f T+`` and ``(1 - f) T+`` with one shrink factor ``f`` per block, and one
    array stands for both. Per chunk: ``T+`` into the cache buffer ``buf[0]``; ``f`` from its
    block norms; both residuals (``buf[1]``); ``T`` overwritten by ``T+`` and ``(a, s)`` by
    ``(1 - f, f)``; the next SVT input ``W = X + (1 - 2f) T+`` and, given ``Q``, ``W^T Q``.
    ``views`` holds the chunk views of ``X``, ``T`` and ``W``. Returns the block norms of the
    new ``S``, ``||S+ - S||^2``, ``||Ys+ - Ys||^2`` and ``W^T Q``.

    Each chunk is read once and written once (read ``X`` and ``T``, write ``T`` and ``W``), and
    its elementwise steps run as torch kernels on views of the same memory: torch vectorises
    the per-column scalings and fuses them with the adds (``addcmul``), about twice numpy's
    speed here, and the iteration's elementwise part costs as much as its GEMMs.
    """
    P = None if Q is None else np.empty((X.shape[1], Q.shape[1]), X.dtype)
    a, s = coef
    old = _per_column(np.stack([a, s]), widths, X.dtype)  # columns: a, s
    norms = np.empty(len(widths))
    d2 = p2 = 0.0
    # T+ -= L chunk by chunk on the transposed views: right^T left^T (torch's GEMM releases
    # the GIL, scipy's f2py one does not: it serialised two concurrent solves)
    left_t = torch.from_numpy(np.ascontiguousarray(L.left.T, dtype=X.dtype))
    right_t = torch.from_numpy(np.ascontiguousarray(L.right.T, dtype=X.dtype))
    for (c0, c1, b0, b1, starts), Xc, Tc, Wc in zip(chunks, views["X"], views["T"], views["W"]):
        ac, sc = old[c0:c1, 0:1], old[c0:c1, 1:2]
        tc, u = buf[0, : c1 - c0], buf[1, : c1 - c0]
        torch.addcmul(Xc, Tc, ac, out=tc)  # X + Ys
        if left_t.shape[0]:
            tc.addmm_(right_t[c0:c1], left_t, alpha=-1.0)
        col = torch.linalg.vector_norm(tc, dim=1).numpy().astype(np.float64)
        nrm = np.sqrt(np.add.reduceat(col * col, starts))
        f = np.maximum(1.0 - thr / np.maximum(nrm, 1e-300), 0.0)  # 0 where nrm <= thr
        norms[b0:b1] = nrm * f
        new = _per_column(np.stack([f, 1.0 - f, 1.0 - 2.0 * f]), widths[b0:b1], X.dtype)
        torch.mul(tc, new[:, 1:2], out=u).addcmul_(Tc, ac, value=-1.0)  # Ys+ - Ys
        p2 += float(torch.dot(u.view(-1), u.view(-1)))
        torch.mul(tc, new[:, 0:1], out=u).addcmul_(Tc, sc, value=-1.0)  # S+ - S
        d2 += float(torch.dot(u.view(-1), u.view(-1)))
        Tc.copy_(tc)
        torch.addcmul(Xc, tc, new[:, 2:3], out=Wc)
        if P is not None:
            P[c0:c1] = Wc.numpy() @ Q
        a[b0:b1], s[b0:b1] = 1.0 - f, f
    return norms, d2, p2, P


def admm_constrained(
    X: np.ndarray, widths: np.ndarray, lam: float, tol: float = 1e-7, max_iter: int = 2000,
    warm: SolveResult | None = None, state: dict | None = None, svt: "_SVT | None" = None,
) -> tuple[LowRank, np.ndarray, np.ndarray, np.ndarray, int, bool]:
    """Inexact ALM for ``min ||L||_* + lam sum ||S_kl||  s.t. L + S = X``.

    Returns ``L`` (factors), ``S``, singular values of L, block norms of S, iterations,
    converged; the final iterate and penalty are left in ``state`` for warm starts. The
    iteration streams the whole reduced stack, so it keeps ``L`` as factors, holds the
    scaled dual ``Ys = Y / mu`` and ``S`` as per-block multiples of one array ``T`` (see
    :func:`_sweep`) and runs everything after the SVT as one cache-sized sweep per column chunk,
    which also takes the SVT's first pass for the next iteration. After the ``S`` step
    ``Ys+ = (X + Ys - L) - S+``, so the primal residual ``X - L - S+`` is ``Ys+ - Ys``. The
    penalty follows residual balancing (Boyd et al. 2011, sec. 3.4.1).
    """
    state = {} if state is None else state
    X = np.asfortranarray(X)
    normX = float(np.linalg.norm(X))
    if warm is not None and warm.state is not None and "T" in warm.state:
        mu = float(warm.state["mu"])
        T = np.array(warm.state["T"], dtype=X.dtype, order="F")
        a, s = warm.state["a"].copy(), warm.state["s"].copy()
        basis = warm.state.get("basis")  # the partial SVT's last subspace
    else:  # Ys = X / (mu max(...)), S = 0
        norm2 = spectral_norm(X)
        mu = 1.25 / norm2
        T = X.copy(order="F")
        a = np.full(len(widths), 1.0 / (mu * max(norm2, float(block_norms(X, widths).max()) / lam)))
        s = np.zeros(len(widths))
        basis = None
    svt = _SVT() if svt is None else svt
    if basis is not None and svt.basis is None:
        svt.basis, svt.rank = basis, max(basis.shape[1], 1)
    chunks = _column_chunks(widths, X.shape[0], X.itemsize)
    wmax = max(c1 - c0 for c0, c1, *_ in chunks)
    buf = torch.empty((2, wmax, X.shape[0]), dtype=torch.from_numpy(X[:1, :1]).dtype)
    W = np.empty_like(T, order="F")
    views = {k: _column_views(A, chunks) for k, A in (("X", X), ("T", T), ("W", W))}
    partial = svt.uses_start(X.shape)
    Q = svt.start(X.shape[0], X.dtype) if partial else None
    P = _form_W(X, views, a - s, widths, chunks, Q)
    sv, s_norms = np.zeros(0), block_norms(T, widths) * s
    L = LowRank(np.zeros((X.shape[0], 0), X.dtype), np.zeros((0, X.shape[1]), X.dtype))
    converged, it = False, 0
    for it in range(1, max_iter + 1):
        L, sv = svt(W, 1.0 / mu, (Q, P) if partial else None)
        Q = svt.start(X.shape[0], X.dtype) if partial else None
        s_norms, d2, p2, P = _sweep(X, views, (a, s), L, widths, chunks, lam / mu, Q, buf)
        dual, primal = mu * math.sqrt(d2) / normX, math.sqrt(p2) / normX
        if primal < tol and dual < tol:
            converged = True
            break
        if primal > 5.0 * dual or dual > 5.0 * primal:
            scale = 0.5 if primal > 5.0 * dual else 2.0
            mu /= scale
            a *= scale
            P = _form_W(X, views, a - s, widths, chunks, Q)
    del W, views
    S = T * np.repeat(s.astype(X.dtype), widths)[None, :]
    state.update(T=T, a=a, s=s, mu=mu, basis=svt.basis)
    return L, S, sv, s_norms, it, converged


def _top_sv(X: np.ndarray, iters: int = 30) -> float:
    """Largest singular value by power iteration (large reduced problems)."""
    v = np.random.default_rng(0).standard_normal(X.shape[1]).astype(X.dtype)
    s = 0.0
    for _ in range(iters):
        u = X @ v
        v = X.T @ u
        s_new = float(np.sqrt(np.linalg.norm(v)))
        v /= max(np.linalg.norm(v), 1e-300)
        if abs(s_new - s) < 1e-4 * s_new:  # a scale for the first penalty: 1e-4 is plenty
            return s_new
        s = s_new
    return s


def fista_penalized(
    X: np.ndarray, widths: np.ndarray, lam: float, mu: float, tol: float = 1e-7,
    max_iter: int = 5000, warm: SolveResult | None = None, svt: "_SVT | None" = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, bool]:
    """FISTA for ``1/2||X - L - S||^2 + mu (||L||_* + lam sum ||S_kl||)`` (step 1/2)."""
    normX = float(np.linalg.norm(X))
    L = np.zeros_like(X) if warm is None else warm.L.astype(X.dtype)
    S = np.zeros_like(X) if warm is None else warm.S.astype(X.dtype)
    ZL, ZS, t = L.copy(), S.copy(), 1.0
    svt = _SVT() if svt is None else svt
    f_old = np.inf
    sv, s_norms = np.zeros(0), np.zeros(len(widths))
    for it in range(1, max_iter + 1):
        G = X - ZL - ZS
        Ln, sv = svt(ZL + 0.5 * G, 0.5 * mu)
        Ln = Ln.dense()
        Sn, s_norms = _block_shrink(ZS + 0.5 * G, widths, 0.5 * mu * lam)
        f = objective_penalized(float(np.linalg.norm(X - Ln - Sn)), sv, s_norms, lam, mu)
        change = (float(np.linalg.norm(Ln - L)) + float(np.linalg.norm(Sn - S))) / normX
        if f > f_old:  # restart momentum
            t = 1.0
        t_new = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
        beta = (t - 1.0) / t_new
        ZL = Ln + beta * (Ln - L)
        ZS = Sn + beta * (Sn - S)
        L, S, t, f_old = Ln, Sn, t_new, f
        if change < tol:
            return L, S, sv, s_norms, it, True
    return L, S, sv, s_norms, max_iter, False


def solve_fast(
    problem: BlockProblem, lam: float, form: str = "constrained", mu: float | None = None,
    tol: float = 1e-7, max_iter: int = 2000, warm: SolveResult | None = None,
) -> SolveResult:
    """Solve ``problem`` (reduced or dense) to tolerance ``tol``; see the module docstring.

    The tolerance is floored at ``50 eps`` of the stack's dtype (6e-6 for float32 inputs).
    """
    t0 = time.perf_counter()
    X, widths = problem.X, problem.widths
    tol = max(tol, 50 * float(np.finfo(X.dtype).eps))  # float32 stacks cannot reach 1e-8
    threads = 1 if X.size <= SMALL_PROBLEM else blas_thread_count()
    with blas_threads(threads) if threads else nullcontext():
        state: dict = {}
        svt = _SVT()
        L, S, sv, s_norms, it, ok, obj = _run(X, widths, lam, form, mu, tol, max_iter, warm, state, svt)
        u, right, s = _singular_factors(L, sv, svt.left)
    return SolveResult(
        L_left=u, L_right=right, L_sv=s, S=S, S_norms=block_norms(S, widths),
        objective=obj, iterations=it, status="optimal" if ok else "max_iter",
        seconds=time.perf_counter() - t0, solver="fast", state=state or None,
    )


def _singular_factors(L: "LowRank | np.ndarray", sv: np.ndarray, left: np.ndarray | None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(U, R, s)`` with ``L = U @ R``, ``U`` the left singular vectors and ``s`` the singular values.

    The SVT's own left vectors are used when at hand, so ``L`` is never formed densely.
    """
    if left is not None and left.shape[1] == sv.size:
        if isinstance(L, LowRank):
            return left, (left.T @ L.left) @ L.right, sv
        return left, left.T @ L, sv
    dense = L.dense() if isinstance(L, LowRank) else L
    u, s = svd_of(dense)
    return u, u.T.astype(dense.dtype, copy=False) @ dense, s


def _run(X, widths, lam, form, mu, tol, max_iter, warm, state, svt):
    """The chosen first-order method; returns ``L, S, sv, S norms, iterations, converged, obj``."""
    if form == "constrained":
        L, S, sv, s_norms, it, ok = admm_constrained(X, widths, lam, tol, max_iter, warm, state, svt)
        obj = objective_constrained(sv, s_norms, lam)
    else:
        if mu is None:
            raise ValueError("penalized form needs mu")
        L, S, sv, s_norms, it, ok = fista_penalized(X, widths, lam, mu, tol, max_iter * 5, warm, svt)
        obj = objective_penalized(float(np.linalg.norm(X - L - S)), sv, s_norms, lam, mu)
    return L, S, sv, s_norms, it, ok, obj
