"""The CLAIR program for one module: pair set, stacked differences, lambda rule, objectives.

Steps 1 and 2 of ``docs/DESIGN.md`` section 3. For clients ``k`` with updates ``dW_k = s_k B_k A_k`` and a
pair set ``P``, ``M = [D_kl]_{(k,l) in P}`` with ``D_kl = dW_k - dW_l`` (p x q|P|). The program is

* constrained: ``min ||L||_* + lam * sum_kl ||S_kl||_F  s.t.  L + S = M``;
* penalized:   ``min 1/2||M - L - S||_F^2 + mu (||L||_* + lam * sum_kl ||S_kl||_F)``.

Both are solved on ``X = alpha * M`` with ``alpha = sqrt(|P|) / ||M||_F`` (so every block has
unit RMS norm and ``lam`` is scale-free) and ``lam = c / sqrt(|P|)``; the penalized weight is
``mu = penalty * ||X||_2``. The solvers see a :class:`BlockProblem`: a matrix whose column
blocks are the pairs. Two representations of the *same* program exist:

* :func:`dense_problem` stacks the dense ``D_kl`` (the reference solver's input, small sizes);
* :func:`reduced_problem` is the exact reduction: ``X~ = Q^T M diag(R_kl)`` with ``Q`` an
  orthonormal basis of ``span{B_k}`` and ``R_kl`` of ``rowspan(A_k) + rowspan(A_l)``. Both
  norms in the objective are invariant under these isometries and the optimum lies inside
  those spaces, so the optimal values, singular values of ``L`` and block norms of ``S``
  coincide, and ``L = Q L~ R^T`` blockwise. ``Q`` and the block coordinates come from the
  Gram matrices ``B_i^T B_j`` and ``A_i A_j^T`` only (or, for small inputs, from an SVD of the
  stacked ``B`` for accuracy); its size depends on the ranks and ``|P|``, never on ``p, q``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

Pair = tuple[int, int]


def all_pairs(n: int) -> list[Pair]:
    """Every unordered pair of client indices, ``k < l``."""
    return [(k, l) for k in range(n) for l in range(k + 1, n)]


def default_degree(n: int) -> int:
    """Pair degree of the sampled set: ``2 ceil(log2 n)`` (O(log N) pairs per client)."""
    return 2 * max(1, math.ceil(math.log2(max(n, 2))))


def sampled_pairs(n: int, degree: int | None = None, seed: int = 0) -> list[Pair]:
    """A seeded union of ``ceil(degree/2)`` random Hamiltonian cycles.

    Every client lies in at least 2 and at most ``2 ceil(degree/2)`` pairs, the graph is
    connected, and the total is ``O(N log N)`` pairs so the solver cost is near-linear in N.
    Falls back to all pairs when ``degree >= n - 1``.
    """
    d = default_degree(n) if degree is None else int(degree)
    if d < 2:
        raise ValueError(f"pair degree must be >= 2, got {d}")
    if d >= n - 1:
        return all_pairs(n)
    rng = np.random.default_rng(seed)
    edges: set[Pair] = set()
    for _ in range(math.ceil(d / 2)):
        perm = rng.permutation(n)
        for i in range(n):
            a, b = int(perm[i]), int(perm[(i + 1) % n])
            edges.add((min(a, b), max(a, b)))
    return sorted(edges)


def make_pairs(n: int, mode: str = "all", degree: int | None = None, seed: int = 0) -> list[Pair]:
    """The pair set ``P`` by name (``"all"`` or ``"sampled"``)."""
    if mode == "all":
        return all_pairs(n)
    if mode == "sampled":
        return sampled_pairs(n, degree, seed)
    raise ValueError(f"pairs must be 'all' or 'sampled', got {mode!r}")


def lam_from_c(c: float, n_pairs: int) -> float:
    """The documented rule ``lam = c / sqrt(|P|)`` on the normalised stack."""
    return float(c) / math.sqrt(n_pairs)


def lam_grid(pairs: Sequence[Pair], n_clients: int, num: int = 12) -> np.ndarray:
    """Grid of ``c`` for the data-driven path, geometric from 1 to ``2 sqrt(|P| / mean degree)``.

    A crude balance of the two norms puts the useful window at roughly
    ``sqrt(r*) < c < sqrt(|P| / deg)`` (a benign block is cheaper in ``L`` above the left end,
    a contaminated client's blocks are cheaper in ``S`` below the right end), so the grid spans
    it with a ratio of about 1.2 between steps, independently of the attack.
    """
    deg = 2.0 * len(pairs) / n_clients
    hi = max(4.0, 2.0 * math.sqrt(len(pairs) / deg))
    return np.geomspace(1.0, hi, num)


@dataclass
class ClientFactors:
    """One module's factors for all clients, scaling folded into ``B`` (``dW_k = B_k A_k``)."""

    B: list[np.ndarray]
    A: list[np.ndarray]
    stacked_B: np.ndarray | None = field(default=None, repr=False)
    """``[B_1 .. B_N]`` when ``B`` are views of it (see :meth:`scaled`), so it is not copied again."""

    @classmethod
    def scaled(cls, B: Sequence[np.ndarray], A: Sequence[np.ndarray], scalings: Sequence[float],
               dtype: type) -> "ClientFactors":
        """Fold ``scalings`` into ``B`` with one stacked copy (``B`` become views of it).

        At LLM sizes every copy of the uploads costs as much as a Gram matrix of them.
        """
        widths = [b.shape[1] for b in B]
        off = np.concatenate([[0], np.cumsum(widths)]).astype(int)
        stacked = np.empty((B[0].shape[0], int(off[-1])), dtype=dtype)
        for k, (b, s) in enumerate(zip(B, scalings)):
            # the scale in the stack's dtype: a Python float would make the product float64
            np.multiply(b, np.asarray(s, dtype=dtype), out=stacked[:, off[k] : off[k + 1]], casting="same_kind")
        views = [stacked[:, off[k] : off[k + 1]] for k in range(len(B))]
        return cls(views, [a.astype(dtype, copy=False) for a in A], stacked)

    @property
    def n(self) -> int:
        return len(self.B)

    @property
    def ranks(self) -> list[int]:
        return [b.shape[1] for b in self.B]

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.ranks)]).astype(int)

    def B_all(self) -> np.ndarray:
        return self.stacked_B if self.stacked_B is not None else np.concatenate(self.B, axis=1)

    def A_all(self) -> np.ndarray:
        return np.concatenate(self.A, axis=0)

    def dense(self, k: int) -> np.ndarray:
        return self.B[k] @ self.A[k]


@dataclass
class LeftBasis:
    """An orthonormal basis of ``span{B_k}``, never formed: ``Q = factor @ transform``, or with
    ``triangular = (cols, R)`` (pivoted Cholesky) ``Q = factor[:, cols] @ R^-1``.

    At LLM sizes ``Q`` would be a ``p x rank(B_all)`` product costing as much as the whole
    reduction; only the few columns a caller needs (``U_hat``) are lifted, and ``R^-1`` is
    applied to those few columns by a triangular solve instead of being formed.
    """

    factor: np.ndarray
    transform: np.ndarray | None = None
    triangular: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def rank(self) -> int:
        if self.triangular is not None:
            return int(self.triangular[1].shape[0])
        return self.factor.shape[1] if self.transform is None else self.transform.shape[1]

    def lift(self, Ut: np.ndarray) -> np.ndarray:
        """``Q @ Ut``."""
        if self.triangular is not None:
            cols, R = self.triangular
            coef = np.zeros((self.factor.shape[1], Ut.shape[1]))
            coef[cols] = scipy.linalg.solve_triangular(R, Ut, check_finite=False)
            return self.factor @ coef.astype(self.factor.dtype, copy=False)
        if self.transform is None:
            return self.factor @ Ut.astype(self.factor.dtype, copy=False)
        return self.factor @ (self.transform @ Ut).astype(self.factor.dtype, copy=False)

    def matrix(self) -> np.ndarray:
        """``Q`` itself (tests and small problems)."""
        return self.lift(np.eye(self.rank))


@dataclass
class BlockProblem:
    """A column-block matrix ``X`` (blocks = pairs) and how to map results back to ``p x q``."""

    X: np.ndarray
    widths: np.ndarray
    pairs: list[Pair]
    alpha: float
    """``X = alpha * (representation of M)``; divide by it to return to the input scale."""
    block_norms: np.ndarray
    """``||X_kl||_F`` per pair (normalised scale)."""
    left: LeftBasis | None = None
    """``Q`` (p x n) for the reduced problem; ``None`` for the dense one (``Q = I``)."""
    right: list[np.ndarray] | None = None
    """``R_kl^T`` (d_kl x q) per pair for the reduced problem; ``None`` for the dense one."""
    inner: np.ndarray | None = None
    """``<dW_k, dW_l>_F`` for every pair of clients (reduced problem, from the Grams at no cost)."""
    info: dict = field(default_factory=dict)

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.widths)]).astype(int)

    def lift_left(self, Ut: np.ndarray) -> np.ndarray:
        """``Q @ Ut``: left singular vectors of ``L~`` as vectors of ``R^p``."""
        return Ut if self.left is None else self.left.lift(Ut)

    def lift_blocks(self, Y: np.ndarray) -> np.ndarray:
        """Dense ``p x q|P|`` matrix from a reduced one, at the input scale (tests only)."""
        if self.left is None:
            return Y / self.alpha
        off, Q = self.offsets, self.left.matrix()
        blocks = [Q @ Y[:, off[i] : off[i + 1]] @ self.right[i] for i in range(len(self.pairs))]
        return np.concatenate(blocks, axis=1) / self.alpha


def block_norms(Y: np.ndarray, widths: np.ndarray, accumulate: type = np.float64) -> np.ndarray:
    """Frobenius norm of every column block of ``Y``, column sums accumulated in ``accumulate``
    (float64 by default, without a copy; the solvers' inner loops use the stack's dtype)."""
    col = np.einsum("ij,ij->j", Y, Y, dtype=accumulate)
    off = np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(int)
    return np.sqrt(np.maximum(np.add.reduceat(col.astype(np.float64), off), 0.0)) if Y.shape[1] else np.zeros(0)


def _normalise(norms: np.ndarray, n_pairs: int, ref: float) -> float:
    """``alpha`` with ``||alpha X||_F = sqrt(|P|)`` from the block norms of ``X`` (accumulated in
    float64: a float32 dot over the whole stack is off by ~1e-4); ``ref`` is the RMS update norm
    times ``sqrt(|P|)``."""
    nrm = float(np.sqrt(np.sum(norms**2)))
    if nrm <= 1e-9 * ref or nrm == 0.0:
        raise ValueError("all pairwise differences are zero: every client uploaded the same update")
    return math.sqrt(n_pairs) / nrm


def dense_problem(cf: ClientFactors, pairs: Sequence[Pair]) -> BlockProblem:
    """The stacked dense differences ``M`` (small sizes; the reference solver's input)."""
    dense = [cf.dense(k).astype(np.float64) for k in range(cf.n)]
    X = np.concatenate([dense[k] - dense[l] for k, l in pairs], axis=1)
    q = dense[0].shape[1]
    widths = np.full(len(pairs), q, dtype=int)
    ref = math.sqrt(np.mean([np.sum(d**2) for d in dense]) * len(pairs))
    norms = block_norms(X, widths)
    alpha = _normalise(norms, len(pairs), ref)
    X *= alpha
    return BlockProblem(X, widths, list(pairs), alpha, norms * alpha)


def _sqrt_factor(G: np.ndarray, rtol: float) -> tuple[np.ndarray, np.ndarray]:
    """``V_+ sqrt(e_+)`` and ``V_+ / sqrt(e_+)`` of a PSD Gram matrix, tiny modes dropped.

    The Gram's eigenvalues carry absolute error ``~eps ||G||``, so modes below ``rtol ||G||``
    are numerically null and dropped; what remains reproduces ``G`` (hence the program) to
    that accuracy.
    """
    e, V = np.linalg.eigh(G)
    return _keep_modes(e, V, rtol)


def _keep_modes(e: np.ndarray, V: np.ndarray, rtol: float) -> tuple[np.ndarray, np.ndarray]:
    e, V = e[::-1], V[:, ::-1]
    emax = e[0] if e.size and e[0] > 0 else 0.0
    keep = e > rtol * emax if emax > 0 else np.zeros_like(e, dtype=bool)
    root = np.sqrt(e[keep])
    return V[:, keep] * root, V[:, keep] / root


def _pivoted_cholesky(G: np.ndarray, rtol: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``G = F^T F`` with ``F`` (rank x n) from LAPACK's pivoted Cholesky (``pstrf``).

    Returns ``F``, the pivot columns and ``R11`` (rank x rank, upper triangular):
    ``Q = B[:, piv] R11^-1`` is orthonormal and ``B = Q F``. Pivots below ``rtol * max diag`` end the factorisation (the
    numerical rank). About 15x cheaper than the eigendecomposition at n = 1600.
    """
    c, piv, rank, info = scipy.linalg.lapack.dpstrf(G, lower=0, tol=rtol * float(np.max(np.diag(G))))
    if info < 0:
        raise ValueError(f"pivoted Cholesky failed (LAPACK info {info})")
    piv = piv - 1
    R = np.triu(c[:rank])  # pivoted order: P^T G P = R^T R
    F = np.empty_like(R)
    F[:, piv] = R
    return F, piv[:rank], np.ascontiguousarray(R[:, :rank])


def _gram_rtol(dtype: np.dtype) -> float:
    return 1e-13 if np.dtype(dtype) == np.float64 else 1e-6


def reduced_problem(
    cf: ClientFactors, pairs: Sequence[Pair], method: str = "auto", keep_right: bool = False
) -> BlockProblem:
    """The exact reduction of :func:`dense_problem`, from factors only.

    Left: ``B_all = [B_1 .. B_N] = Q F`` with ``F`` from an SVD of ``B_all`` (``"svd"``: small
    float64 inputs, most accurate), the eigendecomposition of the Gram ``B_all^T B_all``
    (``"gram"``) or its pivoted Cholesky factor (``"cholesky"``: large inputs, ~15x cheaper);
    ``Q`` is never formed (:class:`LeftBasis`). Right, per pair: ``[A_k; A_l] = Ca R^T`` from
    the eigh of the ``(r_k+r_l)^2`` sub-block of the Gram ``A_all A_all^T`` (batched over pairs).
    Then ``X~_kl = [F_k, -F_l] Ca`` (n x d_kl), so ``X~_kl X~_kl^T`` equals
    ``Q^T D_kl D_kl^T Q``: the same program.
    """
    Ball, Aall = cf.B_all(), cf.A_all()
    dtype = np.result_type(Ball.dtype, Aall.dtype)
    off = cf.offsets
    rtol = _gram_rtol(dtype)
    if method == "auto":
        small = Ball.shape[1] <= 512
        method = ("svd" if dtype == np.float64 else "gram") if small else "cholesky"
    if method == "svd":
        Uq, s, Vt = np.linalg.svd(Ball.astype(np.float64), full_matrices=False)
        keep = s > 1e-10 * (s[0] if s.size else 0.0)
        F = s[keep, None] * Vt[keep]
        basis = LeftBasis(Uq[:, keep])
        GB = F.T @ F
    elif method == "gram":
        GB = (Ball.T @ Ball).astype(np.float64)
        Fh, T = _sqrt_factor(GB, rtol)
        F = Fh.T
        basis = LeftBasis(Ball, T)
    elif method == "cholesky":
        GB = (Ball.T @ Ball).astype(np.float64)
        F, piv, R11 = _pivoted_cholesky(GB, rtol)
        basis = LeftBasis(Ball, triangular=(piv, R11))
    else:
        raise ValueError(f"unknown reduction method {method!r}")
    GA = (Aall @ Aall.T).astype(np.float64)
    work = np.float32 if dtype == np.float32 else np.float64  # the stack in the inputs' precision
    cas = _pair_right_factors(GA, off, pairs, rtol)
    widths_arr = np.asarray([ca.shape[1] for ca, _ in cas], dtype=int)
    X = np.empty((F.shape[0], int(widths_arr.sum())), dtype=work, order="F")  # blocks contiguous
    rights, col = [], 0
    for (k, l), (Ca, T) in zip(pairs, cas):
        rk = off[k + 1] - off[k]
        d = Ca.shape[1]
        X[:, col : col + d] = F[:, off[k] : off[k + 1]] @ Ca[:rk] - F[:, off[l] : off[l + 1]] @ Ca[rk:]
        col += d
        if keep_right:
            idx = np.r_[off[k] : off[k + 1], off[l] : off[l + 1]]
            rights.append(T.T @ Aall[idx].astype(np.float64))
    inner = client_inner(GB, GA, off)
    ref = math.sqrt(max(float(np.mean(np.diag(inner))), 0.0) * len(pairs))
    norms = block_norms(X, widths_arr)
    alpha = _normalise(norms, len(pairs), ref)
    X *= alpha
    info = {"method": method, "reduced_shape": [int(X.shape[0]), int(X.shape[1])]}
    return BlockProblem(
        X, widths_arr, list(pairs), alpha, norms * alpha,
        left=basis, right=rights if keep_right else None, inner=inner, info=info,
    )


def _pair_right_factors(GA: np.ndarray, off: np.ndarray, pairs: Sequence[Pair], rtol: float
                        ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(Ca, T)`` of :func:`_sqrt_factor` for every pair's ``A`` Gram, eighs batched by size.

    Hundreds of 32 x 32 eigendecompositions cost ~20x more one call at a time than batched.
    """
    idx = [np.r_[off[k] : off[k + 1], off[l] : off[l + 1]] for k, l in pairs]
    out: list = [None] * len(pairs)
    by_size: dict[int, list[int]] = {}
    for i, ix in enumerate(idx):
        by_size.setdefault(ix.size, []).append(i)
    for members in by_size.values():
        ix = np.stack([idx[i] for i in members])
        e, V = np.linalg.eigh(GA[ix[:, :, None], ix[:, None, :]])
        for j, i in enumerate(members):
            out[i] = _keep_modes(e[j], V[j], rtol)
    return out


def client_inner(GB: np.ndarray, GA: np.ndarray, off: np.ndarray) -> np.ndarray:
    """``<B_k A_k, B_l A_l>_F = sum(GB_kl * GA_kl)`` for every pair of clients (N x N).

    ``GB``/``GA`` are the Grams of the stacked ``B`` columns and ``A`` rows; the result gives
    every update's norm and every mean's norm exactly, at no cost beyond the two Grams.
    """
    rows = np.add.reduceat(GB * GA, off[:-1], axis=0)
    return np.add.reduceat(rows, off[:-1], axis=1)


def objective_constrained(L_sv: np.ndarray, S_norms: np.ndarray, lam: float) -> float:
    """``||L||_* + lam sum ||S_kl||_F`` from singular values and block norms."""
    return float(np.sum(L_sv) + lam * np.sum(S_norms))


def objective_penalized(
    resid_norm: float, L_sv: np.ndarray, S_norms: np.ndarray, lam: float, mu: float
) -> float:
    """``1/2 ||X - L - S||^2 + mu (||L||_* + lam sum ||S_kl||_F)``."""
    return float(0.5 * resid_norm**2 + mu * (np.sum(L_sv) + lam * np.sum(S_norms)))
