"""The fast solver's ADMM on many small problems of one shape at once (issue #21).

A small CLAIR round (10 clients, rank 4: a 40 x 360 reduced stack per module) runs ~100 ADMM
solves of ~10 iterations whose arithmetic is microseconds; their cost is the few dozen torch
and numpy calls of each iteration. Here the problems of one shape (every module of an
unstructured round, both points of a path batch) advance in lockstep: the elementwise steps of
:func:`~clair_flower.clair.solvers.fast._sweep` run once on a ``(problems, columns, rows)``
tensor, and only what must stay per problem (the SVT's Gram and its eigendecomposition, the
GEMM removing ``L``, the residuals' dot products) is called per problem, with the same calls
and in the same order as :func:`~clair_flower.clair.solvers.fast.admm_constrained`, chunk by
chunk. Each problem's iterates are therefore the single solver's, bit for bit (tested), and
a problem stops at the iteration it would have stopped at alone; it only leaves the batch.

Only what the single solver handles with its exact Gram SVT is batched: the constrained form,
wide stacks (rows <= columns) with at most :data:`~clair_flower.clair.solvers.fast.DENSE_SVD_MAX`
rows and :data:`BATCH_MAX_BYTES` bytes. Everything else goes through
:func:`~clair_flower.clair.solvers.solve` one at a time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from clair_flower.clair.decomposition import BlockProblem, block_norms, objective_constrained
from clair_flower.clair.solvers import SolveResult, solve
from clair_flower.clair.solvers.fast import (DENSE_SVD_MAX, SMALL_PROBLEM, _column_chunks, eigh_above,
                                             spectral_norm)
from clair_flower.clair.threads import blas_thread_count, blas_threads


BATCH_MAX_BYTES = 1 << 18
"""Only stacks of at most this many bytes are batched (a 10-client rank-4 stack is 58 kB): on
larger ones the arithmetic outweighs the per-call overhead, and a batch of them would no longer
fit in cache (30 clients x 16 modules, 1.7 MB stacks: 11.7 CPU s batched against 9.2 threaded)."""

BATCH_BYTES = 1 << 21
"""A lockstep batch holds stacks of at most this many bytes in all (about a cache's worth);
a larger group is solved in several batches."""


@dataclass(frozen=True)
class Request:
    """One solve: the program's ``lam``, the tolerance, a warm start (``None``: cold), and the
    penalized form's weight (unused by the batched constrained solver)."""

    lam: float
    tol: float
    warm: SolveResult | None = None
    mu: float | None = None


def batchable(problem: BlockProblem, form: str, solver: str) -> bool:
    """Whether the lockstep solver takes this problem: fast solver, constrained form, a wide
    stack small enough for the exact Gram SVT (the single solver's dense branch) and for the
    batch to stay in cache (:data:`BATCH_MAX_BYTES`)."""
    rows, cols = problem.X.shape
    return (solver == "fast" and form == "constrained" and problem.X.dtype.char in "fd"
            and 0 < rows <= cols and rows <= DENSE_SVD_MAX and problem.X.nbytes <= BATCH_MAX_BYTES)


def _group_key(problem: BlockProblem) -> tuple:
    """Problems advance together when every array they touch has the same layout."""
    X = problem.X
    threads = 1 if X.size <= SMALL_PROBLEM else blas_thread_count()
    return X.shape, X.dtype.str, tuple(int(w) for w in problem.widths), threads


def solve_many(problems: Sequence[BlockProblem], requests: Sequence[Request], form: str, solver: str,
               max_iter: int) -> list[SolveResult]:
    """``solve(problems[i], requests[i]...)`` for every ``i``; batchable problems of one layout
    run in lockstep (:func:`solve_batch`), the others one at a time."""
    out: list[SolveResult | None] = [None] * len(problems)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(problems):
        if batchable(p, form, solver):
            groups.setdefault(_group_key(p), []).append(i)
        else:
            r = requests[i]
            out[i] = solve(p, r.lam, form, solver, mu=r.mu, tol=r.tol, max_iter=max_iter, warm=r.warm)
    for members in groups.values():
        size = max(1, BATCH_BYTES // max(problems[members[0]].X.nbytes, 1))
        for b0 in range(0, len(members), size):
            part = members[b0 : b0 + size]
            for i, res in zip(part, solve_batch([problems[i] for i in part], [requests[i] for i in part], max_iter)):
                out[i] = res
    return out  # type: ignore[return-value]


def _initial(problem: BlockProblem, lam: float, warm: SolveResult | None) -> tuple:
    """``(X in Fortran order, T, a, s, mu)`` as :func:`~.fast.admm_constrained` starts them."""
    X = np.asfortranarray(problem.X)
    widths = problem.widths
    if warm is not None and warm.state is not None and "T" in warm.state:
        return (X, np.array(warm.state["T"], dtype=X.dtype, order="F"), warm.state["a"].copy(),
                warm.state["s"].copy(), float(warm.state["mu"]))
    norm2 = spectral_norm(X)
    mu = 1.25 / norm2
    a = np.full(len(widths), 1.0 / (mu * max(norm2, float(block_norms(X, widths).max()) / lam)))
    return X, X.copy(order="F"), a, np.zeros(len(widths)), mu


class _Batch:
    """The live problems' iterates, stacked: ``Xt``, ``Tt``, ``Wt`` are ``(B, columns, rows)``
    (each problem's Fortran-ordered ``rows x columns`` array, transposed: the single solver's
    chunk views), ``a``, ``s`` the per-block coefficients ``(B, blocks)``, ``mu`` per problem."""

    def __init__(self, inits: list[tuple], widths: np.ndarray) -> None:
        self.dtype = inits[0][0].dtype
        self.widths = widths
        self.rep = np.repeat(np.arange(len(widths)), widths)
        self.Xt = torch.from_numpy(np.stack([x.T for x, *_ in inits]))
        self.Tt = torch.from_numpy(np.stack([t.T for _, t, *_ in inits]))
        self.Wt = torch.empty_like(self.Xt)
        self.a = np.stack([a for _, _, a, _, _ in inits])
        self.s = np.stack([s for _, _, _, s, _ in inits])
        self.mu = np.array([mu for *_, mu in inits])

    def per_column(self, coef: np.ndarray) -> torch.Tensor:
        """Per-block coefficients ``(B, blocks)`` as ``(B, columns, 1)`` in the stack's dtype (the
        float64 values cast once, as ``fast._per_column`` does)."""
        return torch.from_numpy(np.ascontiguousarray(coef[:, self.rep].astype(self.dtype))[:, :, None])

    def form_W(self) -> None:
        """``W = X + (a - s) T`` for every live problem (``fast._form_W``)."""
        torch.addcmul(self.Xt, self.Tt, self.per_column(self.a - self.s), out=self.Wt)

    def keep(self, idx: np.ndarray) -> None:
        """Drop every problem not in ``idx`` (finished ones)."""
        t = torch.from_numpy(idx)
        self.Xt, self.Tt, self.Wt = self.Xt[t], self.Tt[t], self.Wt[t]
        self.a, self.s, self.mu = self.a[idx], self.s[idx], self.mu[idx]


def _svt(W: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``fast._svt_gram`` on a wide ``W`` (same calls, same results): ``L = left @ right`` with
    ``left`` the shrunk singular vectors, the singular values of ``L`` and the vectors."""
    G = W @ W.T
    e, V = eigh_above(G, tau * tau)
    s = np.sqrt(np.maximum(e[::-1], 0.0))
    V = V[:, ::-1]
    k = int(np.sum(s > tau))
    Vk = (V[:, :k] * (1.0 - tau / s[:k])).astype(W.dtype)
    right = V[:, :k].astype(W.dtype).T @ W
    return Vk, right, s[:k] - tau, V[:, :k]


def _sweep(b: _Batch, svts: list[tuple], lam: np.ndarray, chunks: list, bufs: tuple[torch.Tensor, torch.Tensor]
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``fast._sweep`` for every live problem: the elementwise steps batched, the ``L`` GEMM and
    the residual dot products per problem. Returns the new ``S`` block norms ``(B, blocks)``,
    ``||S+ - S||^2`` and ``||Ys+ - Ys||^2`` per problem."""
    B = b.Xt.shape[0]
    old_a, old_s = b.per_column(b.a), b.per_column(b.s)
    thr = (lam / b.mu)[:, None]
    norms = np.empty_like(b.a)
    d2, p2 = np.zeros(B), np.zeros(B)
    lefts = [torch.from_numpy(np.ascontiguousarray(Vk.T, dtype=b.dtype)) for Vk, *_ in svts]
    rights = [torch.from_numpy(np.ascontiguousarray(right.T, dtype=b.dtype)) for _, right, *_ in svts]
    for c0, c1, b0, b1, starts in chunks:
        Xc, Tc, Wc = b.Xt[:, c0:c1], b.Tt[:, c0:c1], b.Wt[:, c0:c1]
        ac, sc = old_a[:, c0:c1], old_s[:, c0:c1]
        tc, u = bufs[0][:B, : c1 - c0], bufs[1][:B, : c1 - c0]
        torch.addcmul(Xc, Tc, ac, out=tc)  # X + Ys
        for i, (left, right) in enumerate(zip(lefts, rights)):
            if left.shape[0]:
                tc[i].addmm_(right[c0:c1], left, alpha=-1.0)
        col = torch.linalg.vector_norm(tc, dim=2).numpy().astype(np.float64)
        nrm = np.sqrt(np.add.reduceat(col * col, starts, axis=1))
        f = np.maximum(1.0 - thr / np.maximum(nrm, 1e-300), 0.0)
        norms[:, b0:b1] = nrm * f
        rep = np.repeat(np.arange(b1 - b0), b.widths[b0:b1])
        new = [torch.from_numpy(np.ascontiguousarray(x[:, rep].astype(b.dtype))[:, :, None])
               for x in (f, 1.0 - f, 1.0 - 2.0 * f)]
        flat = [u[i].view(-1) for i in range(B)]  # each problem's block of u is contiguous
        torch.mul(tc, new[1], out=u).addcmul_(Tc, ac, value=-1.0)  # Ys+ - Ys
        p2 += [float(torch.dot(x, x)) for x in flat]
        torch.mul(tc, new[0], out=u).addcmul_(Tc, sc, value=-1.0)  # S+ - S
        d2 += [float(torch.dot(x, x)) for x in flat]
        Tc.copy_(tc)
        torch.addcmul(Xc, tc, new[2], out=Wc)
        b.a[:, b0:b1], b.s[:, b0:b1] = 1.0 - f, f
    return norms, d2, p2


def _result(b: _Batch, i: int, svt: tuple, s_norms: np.ndarray, lam: float, it: int, ok: bool,
            seconds: float) -> SolveResult:
    """Problem ``i``'s :class:`SolveResult`, as ``fast.solve_fast`` returns it."""
    Vk, right, sv, left = svt
    T = np.array(b.Tt[i].numpy().T, order="F")
    a, s = b.a[i].copy(), b.s[i].copy()
    S = T * np.repeat(s.astype(b.dtype), b.widths)[None, :]
    return SolveResult(
        L_left=left, L_right=(left.T @ Vk) @ right, L_sv=sv, S=S, S_norms=block_norms(S, b.widths),
        objective=objective_constrained(sv, s_norms, lam), iterations=it, status="optimal" if ok else "max_iter",
        seconds=seconds, solver="fast", state={"T": T, "a": a, "s": s, "mu": float(b.mu[i]), "basis": None})


def solve_batch(problems: Sequence[BlockProblem], requests: Sequence[Request], max_iter: int) -> list[SolveResult]:
    """The constrained ADMM of ``fast.admm_constrained`` on problems of one layout, in lockstep.

    Every problem's sequence of iterates, penalty changes and stopping iteration is that of the
    single solver; a finished problem leaves the batch and the rest go on.
    """
    t0 = time.perf_counter()
    X0 = problems[0].X
    widths = np.asarray(problems[0].widths)
    threads = _group_key(problems[0])[3]
    eps_tol = 50 * float(np.finfo(X0.dtype).eps)
    with blas_threads(threads) if threads else nullcontext():
        inits = [_initial(p, r.lam, r.warm) for p, r in zip(problems, requests)]
        norm_x = np.array([float(np.linalg.norm(x)) for x, *_ in inits])
        b = _Batch(inits, widths)
        del inits
        lam = np.array([r.lam for r in requests])
        tol = np.array([max(r.tol, eps_tol) for r in requests])
        ids = np.arange(len(problems))  # original index of each live problem
        chunks = _column_chunks(widths, X0.shape[0], X0.itemsize)
        wmax = max(c1 - c0 for c0, c1, *_ in chunks)
        shape = (len(problems), wmax, X0.shape[0])
        bufs = (torch.empty(shape, dtype=b.Xt.dtype), torch.empty(shape, dtype=b.Xt.dtype))
        b.form_W()
        out: list[SolveResult | None] = [None] * len(problems)
        for it in range(1, max_iter + 1):
            svts = [_svt(b.Wt[i].numpy().T, 1.0 / float(b.mu[i])) for i in range(len(ids))]
            s_norms, d2, p2 = _sweep(b, svts, lam[ids], chunks, bufs)
            dual = b.mu * np.sqrt(d2) / norm_x[ids]
            primal = np.sqrt(p2) / norm_x[ids]
            done = (primal < tol[ids]) & (dual < tol[ids])
            for i in np.flatnonzero(done):
                out[int(ids[i])] = _result(b, int(i), svts[i], s_norms[i], float(lam[ids[i]]), it, True,
                                           time.perf_counter() - t0)
            # the single solver rebalances the penalty of an unconverged problem, its last
            # iteration included, and forms W again for that problem only
            up, down = ~done & (primal > 5.0 * dual), ~done & (dual > 5.0 * primal)
            for i in np.flatnonzero(up | down):
                scale = 0.5 if up[i] else 2.0
                b.mu[i] /= scale
                b.a[i] *= scale
                torch.addcmul(b.Xt[i], b.Tt[i], b.per_column(b.a[i : i + 1] - b.s[i : i + 1])[0], out=b.Wt[i])
            if it == max_iter:
                for i in np.flatnonzero(~done):
                    out[int(ids[i])] = _result(b, int(i), svts[i], s_norms[i], float(lam[ids[i]]), it, False,
                                               time.perf_counter() - t0)
                break
            if done.any():
                live = np.flatnonzero(~done)
                if live.size == 0:
                    break
                b.keep(live)
                ids = ids[live]
    return out  # type: ignore[return-value]

