"""Reference solver: the program handed verbatim to cvxpy (SCS).

cvxpy turns the nuclear norm into an SDP of order ``rows + cols``, so this is for small
instances only (e.g. 6 to 8 clients, ``p = q <= 12``); it exists to check the fast solver.
SCS is used (Clarabel is far slower on nuclear norms) at tight tolerances, and a status other
than ``optimal`` (``optimal_inaccurate`` included) is reported, never hidden.
"""

from __future__ import annotations

import time

import cvxpy as cp
import numpy as np

from clair_flower.clair.decomposition import BlockProblem, block_norms
from clair_flower.clair.solvers import SolveResult, svd_of

SCS_EPS = 1e-9


def solve_reference(
    problem: BlockProblem, lam: float, form: str = "constrained", mu: float | None = None,
    tol: float = SCS_EPS, max_iters: int = 200_000,
) -> SolveResult:
    """Solve ``problem`` with cvxpy/SCS; ``status`` is cvxpy's ``problem.status``."""
    t0 = time.perf_counter()
    X = problem.X.astype(np.float64)
    off = problem.offsets
    L = cp.Variable(X.shape)
    if form == "constrained":
        S_expr = X - L
        groups = [cp.norm(S_expr[:, off[i] : off[i + 1]], "fro") for i in range(len(problem.pairs))]
        obj = cp.normNuc(L) + lam * cp.sum(cp.hstack(groups))
    else:
        if mu is None:
            raise ValueError("penalized form needs mu")
        S = cp.Variable(X.shape)
        S_expr = S
        groups = [cp.norm(S[:, off[i] : off[i + 1]], "fro") for i in range(len(problem.pairs))]
        obj = 0.5 * cp.sum_squares(X - L - S) + mu * (cp.normNuc(L) + lam * cp.sum(cp.hstack(groups)))
    prob = cp.Problem(cp.Minimize(obj))
    eps = min(tol, SCS_EPS)
    prob.solve(solver=cp.SCS, eps_abs=eps, eps_rel=eps, max_iters=max_iters)
    if L.value is None:
        raise RuntimeError(f"cvxpy/SCS returned no solution (status {prob.status})")
    Lv = np.asarray(L.value)
    Sv = np.asarray(S_expr.value)
    u, s = svd_of(Lv)
    return SolveResult(
        L_left=u, L_right=u.T @ Lv, L_sv=s, S=Sv, S_norms=block_norms(Sv, problem.widths),
        objective=float(prob.value), iterations=int(prob.solver_stats.num_iters or 0),
        status=str(prob.status), seconds=time.perf_counter() - t0, solver="reference",
    )
