"""Steps 1 to 3 for every module: the stacked differences, their decomposition, the subspace.

Each module's outcome is a :class:`ModuleFit`. The first module runs the lambda path; with
``share_c`` every other module is solved at the ``c`` it chose and keeps it where it is
admissible there (``selection = "shared"``), so a many-module round solves one path, not one per
module. Modules run on a thread each (:mod:`clair_flower.clair.threads`), or, in small rounds,
in lockstep: their solves batched into one ADMM per layout (:data:`LOCKSTEP`), same results.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from clair_flower.clair import detection
from clair_flower.clair.config import ClairConfig
from clair_flower.clair.decomposition import BlockProblem, ClientFactors, Pair, dense_problem, reduced_problem
from clair_flower.clair.inputs import ClairInputError
from clair_flower.clair.path import PathChoice, solve_path, solve_paths
from clair_flower.clair.solvers import SolveResult
from clair_flower.clair.solvers.batched import BATCH_MAX_BYTES
from clair_flower.clair.solvers.fast import DENSE_SVD_MAX
from clair_flower.clair.threads import map_all

Factors = dict[str, dict]
"""Validated uploads, ``[module][client]`` to :class:`~clair_flower.lora.LoraFactors`."""

LOCKSTEP = True
"""Small rounds solve every module's path in lockstep (:func:`~clair_flower.clair.path.solve_paths`),
the same solves batched into one ADMM per layout (issue #21), instead of one module per thread;
``False`` keeps the threaded path. Both give the same iterates, flags and adapters (tested)."""



@dataclass
class ModuleFit:
    """One module's decomposition, in the reduced coordinates the solver used.

    ``L = L_left @ L_right`` (``L_left`` orthonormal in the reduced row space, ``lifted`` its
    image in the module's output space, p x k); ``offsets`` are the column offsets of the pair
    blocks; ``evidence`` the pair evidence ``||S_kl|| / block scale``; ``inner`` the clients'
    inner products ``<dW_k, dW_l>`` (read off the Grams; ``None`` for dense problems).
    """

    offsets: np.ndarray
    lifted: np.ndarray
    L_left: np.ndarray
    L_right: np.ndarray
    evidence: np.ndarray
    distance: np.ndarray
    """``||M_kl|| / block scale``: the evidence of the point ``S = M`` (no structure assumed)."""
    informative: np.ndarray
    inner: np.ndarray | None
    diagnostics: dict
    admissible: bool = False
    """The module's chosen point is admissible (see :mod:`clair_flower.clair.path`)."""
    U: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    rank: int = 0


def client_factors(fac: Factors, m: str, active: list) -> ClientFactors:
    """One module's factors with the scaling folded into ``B``, rebuilt on demand (not stored:
    at LLM sizes a second copy of every upload would double the peak memory)."""
    dtype = np.float32 if all(fac[m][c].A.dtype == np.float32 for c in active) else np.float64
    return ClientFactors.scaled([fac[m][c].B for c in active], [fac[m][c].A for c in active],
                                [fac[m][c].scaling for c in active], dtype)


def build_problem(cf: ClientFactors, pairs: Sequence[Pair], cfg: ClairConfig) -> tuple[BlockProblem, float]:
    """Step 1 for one module: the stacked differences (reduced for the fast solver), and seconds."""
    t0 = time.perf_counter()
    problem = dense_problem(cf, pairs) if cfg.solver == "reference" else reduced_problem(cf, pairs)
    problem.info["span_rank"] = int(min(cf.B[0].shape[0], sum(cf.ranks)))
    return problem, time.perf_counter() - t0


def fit_module(problem: BlockProblem, t_red: float, res: SolveResult, choice: PathChoice,
               seconds: float, form: str) -> ModuleFit:
    """Step 2's outcome for one module, from the solve at the chosen point."""
    k = int(np.sum(res.L_sv > 1e-10 * res.L_sv[0])) if res.L_sv.size and res.L_sv[0] > 0 else 0
    L_left = res.L_left[:, :k]
    diag = {"solver": res.solver, "form": form, "status": res.status, "iterations": res.iterations,
            "objective": res.objective, "seconds": t_red + seconds, "reduce_seconds": t_red,
            "singular_values": [float(s) for s in res.L_sv[:10]], **choice.diagnostics(), **problem.info}
    return ModuleFit(offsets=problem.offsets, lifted=np.asarray(problem.lift_left(L_left), dtype=np.float64),
                     L_left=L_left, L_right=res.L_right[:k].astype(np.float64),
                     evidence=detection.pair_evidence(res.S_norms, problem.block_norms),
                     distance=detection.pair_evidence(problem.block_norms, problem.block_norms),
                     informative=detection.informative_pairs(problem.block_norms), inner=problem.inner,
                     diagnostics=diag, admissible=choice.admissible)


def decompose_modules(fac: Factors, modules: list[str], active: list, pairs: Sequence[Pair],
                      cfg: ClairConfig, n: int) -> dict[str, ModuleFit]:
    """Steps 1-2 for every module; the first module's ``c`` is offered to the rest (``share_c``).

    The first module runs its path alone, on every worker; with an admissible pick it is then
    polished at that ``c`` (from its path point) while every other module is solved at it, on
    the same pool. Small rounds do the same in lockstep (:data:`LOCKSTEP`).
    """
    if _lockstep(fac, modules, active, pairs, cfg):
        return _decompose_lockstep(fac, modules, active, pairs, cfg, n)

    def one(m: str, c_shared: float | None = None, pre: tuple | None = None,
            first_path: PathChoice | None = None, solved: tuple | None = None,
            warm: SolveResult | None = None) -> ModuleFit:
        def run() -> ModuleFit:
            problem, t_red = pre if pre is not None else build_problem(client_factors(fac, m, active), pairs, cfg)
            t0 = time.perf_counter()
            res, choice = solved if solved is not None else solve_path(problem, cfg, n, c_shared, warm=warm)
            path_seconds = first_path.seconds if first_path is not None else choice.seconds
            return fit_module(problem, t_red, res, _as_first(choice, first_path),
                              path_seconds + time.perf_counter() - t0, cfg.form)
        return _checked(run, m, active)

    workers = cfg.workers or os.cpu_count() or 1
    m0 = modules[0]
    share = cfg.share_c and cfg.c == "auto"
    pre0 = _checked(lambda: build_problem(client_factors(fac, m0, active), pairs, cfg), m0, active)
    t0 = time.perf_counter()
    res0, path0 = _checked(lambda: solve_path(pre0[0], cfg, n, workers=workers, defer_admissible=share), m0, active)
    path0.seconds = time.perf_counter() - t0
    if path0.deferred:  # an admissible c: every module, the first included, is solved at it
        c = path0.c
        fits = map_all(lambda m: one(m, c, pre0, path0, warm=res0) if m == m0 else one(m, c),
                       modules, cfg.workers)
        return dict(zip(modules, fits))
    first = one(m0, pre=pre0, solved=(res0, path0))  # no admissible pick (or no sharing): the rest run their own
    rest = map_all(lambda m: one(m), modules[1:], cfg.workers)
    return dict(zip(modules, [first, *rest]))


def _checked(fn: Callable, m: str, active: list):
    """``fn()``, a ``ValueError`` re-raised as :class:`ClairInputError` naming the module(s)."""
    try:
        return fn()
    except ValueError as e:  # e.g. every active client uploaded the same update
        raise ClairInputError(f"module {m!r}: {e} (clients: {active!r})") from e


def _as_first(choice: PathChoice, first_path: PathChoice | None) -> PathChoice:
    """The first module at its own pick keeps its path as the reported selection."""
    if first_path is None or choice.selection != "shared":
        return choice
    return PathChoice(first_path.c, first_path.lam, first_path.mu, first_path.selection, first_path.path,
                      first_path.iterations_total + choice.iterations_total, admissible=first_path.admissible)


def _lockstep(fac: Factors, modules: list[str], active: list, pairs: Sequence[Pair], cfg: ClairConfig) -> bool:
    """:data:`LOCKSTEP` applies: fast constrained solver, and every module's reduced stack (its
    size bounded from the ranks: ``sum r_k`` rows, ``r_k + r_l`` columns per pair) small enough
    to be batched (:func:`~clair_flower.clair.solvers.batched.batchable`); larger rounds keep
    the threads, which overlap arithmetic that then outweighs the calls."""
    if not LOCKSTEP or cfg.solver != "fast" or cfg.form != "constrained" or len(modules) < 2:
        return False
    for m in modules:
        ranks = [fac[m][c].rank for c in active]
        rows = min(fac[m][active[0]].out_features, sum(ranks))
        cols = sum(ranks[k] + ranks[l] for k, l in pairs)
        itemsize = 4 if all(fac[m][c].A.dtype == np.float32 for c in active) else 8
        if rows > DENSE_SVD_MAX or rows * cols * itemsize > BATCH_MAX_BYTES:
            return False
    return True


def _decompose_lockstep(fac: Factors, modules: list[str], active: list, pairs: Sequence[Pair],
                        cfg: ClairConfig, n: int) -> dict[str, ModuleFit]:
    """:func:`decompose_modules` with every stack built first and the paths solved in lockstep:
    the first module's path (its batch's points side by side), then every module at its ``c``
    or, without an admissible pick, the other modules' paths together. The seconds a module
    reports are its share of the lockstep's."""
    label = ",".join(modules)
    built = {m: _checked(lambda m=m: build_problem(client_factors(fac, m, active), pairs, cfg), m, active)
             for m in modules}
    m0 = modules[0]
    share = cfg.share_c and cfg.c == "auto"
    t0 = time.perf_counter()
    res0, path0 = _checked(lambda: solve_paths([built[m0][0]], cfg, n, defer_admissible=share)[0], m0, active)
    path0.seconds = time.perf_counter() - t0
    if path0.deferred:  # an admissible c: every module, the first included, is solved at it
        todo, first = modules, None
        warms = [res0 if m == m0 else None for m in modules]
        c_shared = path0.c
    else:  # no admissible pick (or no sharing): the rest run their own paths
        todo, first = modules[1:], fit_module(*built[m0], res0, path0, path0.seconds, cfg.form)
        warms, c_shared = None, None
    t1 = time.perf_counter()
    solved = _checked(lambda: solve_paths([built[m][0] for m in todo], cfg, n, c_shared, warms=warms),
                      label, active) if todo else []
    share_s = (time.perf_counter() - t1) / max(len(todo), 1)
    fits = {} if first is None else {m0: first}
    for m, (res, choice) in zip(todo, solved):
        lead = path0 if m == m0 else None
        fits[m] = fit_module(*built[m], res, _as_first(choice, lead),
                             (path0.seconds if lead is not None else 0.0) + share_s, cfg.form)
    return {m: fits[m] for m in modules}


def gap_rank(sv: np.ndarray) -> int:
    """Rank at the largest ratio ``sigma_i / sigma_{i+1}`` (tiny values floored at 1e-12 sigma_1)."""
    if sv.size == 0 or sv[0] <= 0:
        return 1
    s = np.maximum(np.append(sv, 0.0), 1e-12 * sv[0])
    return int(np.argmax(s[:-1] / s[1:])) + 1


def subspace(fit: ModuleFit, benign_pairs: np.ndarray, rank: int | None) -> tuple[np.ndarray, int, np.ndarray]:
    """Step 3: ``U_hat`` from the blocks of ``L_hat`` whose pairs are both collaborative.

    Pairs touching a contaminated client do not cancel the common component ``C``, so ``L_hat``
    may carry its direction there; restricted to collaborative pairs it lies in ``span(U)`` in
    the model. ``r_hat`` is ``rank`` or the largest singular-value gap of that restriction.
    """
    off = fit.offsets
    cols = np.concatenate([np.arange(off[i], off[i + 1]) for i in np.flatnonzero(benign_pairs)] or [np.zeros(0, int)])
    if cols.size == 0:  # no collaborative pair: fall back to all of L
        cols = np.arange(off[-1])
    # L_b = L_left @ R_b with orthonormal L_left: its left singular vectors are L_left W for the
    # eigenvectors W of the small Gram R_b R_b^T, and Q L_left W = lifted @ W (only p x k kept)
    Rb = fit.L_right[:, cols]
    e, W = np.linalg.eigh(Rb @ Rb.T)
    s, W = np.sqrt(np.maximum(e[::-1], 0.0)), W[:, ::-1]
    r_hat = rank if rank is not None else gap_rank(s)
    r_hat = max(1, min(r_hat, W.shape[1]))
    U = fit.lifted @ W[:, :r_hat]
    return np.linalg.qr(U)[0], int(r_hat), s


def set_subspaces(fits: dict[str, ModuleFit], pairs: Sequence[Pair], flagged: np.ndarray,
                  rank: int | None, p: dict[str, int] | None = None) -> None:
    """Fill ``U``/``rank`` of every module from the pairs among non-flagged clients.

    With ``p`` (module output sizes) every ``U`` is left empty (``p x 0``): the round found no
    structure, and a subspace taken from it would be meaningless.
    """
    benign = np.array([not (flagged[k] or flagged[l]) for k, l in pairs])
    for m, fit in fits.items():
        if p is not None:
            fit.U, fit.rank = np.zeros((p[m], 0)), 0
            fit.diagnostics["rank"] = 0
            continue
        U, r_hat, s = subspace(fit, benign, rank)
        fit.U, fit.rank = U, r_hat
        fit.diagnostics["subspace_singular_values"] = [float(x) for x in s[: max(r_hat + 5, 10)]]
        fit.diagnostics["rank"] = r_hat
