"""Solvers for the CLAIR program of :mod:`clair_flower.clair.decomposition`.

``fast`` (default) solves the exactly reduced problem with an inexact ALM / ADMM (constrained
form) or accelerated proximal gradient (penalized form); ``reference`` hands the dense problem
to cvxpy/SCS and is only usable at small sizes. Both return a :class:`SolveResult` on the
normalised scale of the :class:`~clair_flower.clair.decomposition.BlockProblem` they were given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FORMS = ("constrained", "penalized")


@dataclass
class SolveResult:
    """Minimiser ``(L, S)`` of one program instance plus what a caller needs from it."""

    L_left: np.ndarray
    """Left singular vectors of ``L`` (columns, descending singular values), in the problem's row space."""
    L_right: np.ndarray
    """``L = L_left @ L_right``: ``L`` is kept in factors (at LLM sizes the dense ``L`` is as large
    as the stack and is never needed by CLAIR itself); see :attr:`L`."""
    L_sv: np.ndarray
    """Singular values of ``L`` (descending)."""
    S: np.ndarray
    S_norms: np.ndarray
    """``||S_kl||_F`` per pair."""
    objective: float
    iterations: int
    status: str
    seconds: float
    solver: str
    state: dict | None = None
    """Solver state for warm starts (ADMM: the iterate ``T`` with its per-block dual and ``S``
    coefficients ``a`` and ``s``, the penalty ``mu`` and the partial SVT's last subspace
    ``basis``)."""

    @property
    def L(self) -> np.ndarray:
        """The dense low-rank part (formed on each access)."""
        return self.L_left @ self.L_right.astype(self.L_left.dtype, copy=False)


def svd_of(L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left singular vectors and singular values of ``L`` (via the smaller Gram side)."""
    if L.size == 0:
        return np.zeros((L.shape[0], 0)), np.zeros(0)
    L = L.astype(np.float64)
    if L.shape[0] <= L.shape[1]:  # eigh of the small Gram; LAPACK's SVD of wide blocks is slow
        e, V = np.linalg.eigh(L @ L.T)
        return V[:, ::-1], np.sqrt(np.maximum(e[::-1], 0.0))
    u, s, _ = np.linalg.svd(L, full_matrices=False)
    return u, s


def solve(problem, lam: float, form: str = "constrained", solver: str = "fast", mu: float | None = None,
          tol: float = 1e-7, max_iter: int = 2000, warm: SolveResult | None = None) -> SolveResult:
    """Dispatch to the named solver; ``mu`` is the penalized form's weight (ignored otherwise)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if solver == "fast":
        from clair_flower.clair.solvers.fast import solve_fast
        return solve_fast(problem, lam, form, mu=mu, tol=tol, max_iter=max_iter, warm=warm)
    if solver == "reference":
        from clair_flower.clair.solvers.reference import solve_reference
        return solve_reference(problem, lam, form, mu=mu, tol=tol)
    raise ValueError(f"solver must be 'fast' or 'reference', got {solver!r}")
