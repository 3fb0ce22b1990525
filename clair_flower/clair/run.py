"""CLAIR: public API (steps 1 to 6 of DESIGN section 3 over all adapted modules).

This is the project's reconstruction of CLAIR (Collaborative Low-rank Alignment and
Identifiable Recovery; He, Chen, Feng 2026, arXiv 2605.21217) from the paper's abstract, as
specified in ``DESIGN.md`` section 3; the paper's full text was not available, so the choices
below (pair set, lambda selection, vote thresholds, multi-module rule, second stage) are ours.
Per module, the pairwise differences of the clients' LoRA updates are split into a low-rank
part (the shared subspace ``U``) and a block-sparse part (pairs touching contaminated clients);
a majority vote over pairs gives the collaborative set; each benign client receives its update
projected on ``U`` plus the collaborative mean off ``U``, re-factored at its own rank.

Lambda selection (``lam="auto"``): on the normalised stack, ``lam = c / sqrt(|P|)`` for ``c`` on
the geometric grid of :func:`~clair_flower.clair.decomposition.lam_grid` (solved from large to small
``c``, warm-started, stopping at the first majority-flagged point once an admissible point was
seen, since smaller ``c`` only moves more blocks into ``S``; path points are solved to ``PATH_TOL``
and the chosen one to ``tol``). A grid point is *admissible* when its flagged-pair pattern is explained by
a client set (consistency >= ``1 - consistency_tol``, see
:func:`~clair_flower.clair.detection.consistency`) and the flagged clients are a strict minority. Among
admissible points the one with the lowest effective rank of ``L`` (singular values above
``rank_rtol * sigma_1``) wins, then the fewest flagged clients, then the middle of the remaining
run of ``c``. With no admissible point, the most consistent point with a flagged minority is used and the module's
diagnostics say ``"selection": "fallback"``. A float ``lam`` is the constant ``c`` itself.
Across modules (``share_lam``), the first module runs the path and every other module first
tries the ``c`` it chose, solved to full accuracy; if that point is admissible there it is kept
(``"selection": "shared"``), otherwise that module runs its own path. Modules are decomposed and
refined on ``workers`` threads; the result does not depend on their number.

Default form: ``constrained`` (the DESIGN prototype's). It passes every property test, recovering
``U`` to ~1e-8 noiseless and with error linear in the noise. The ``penalized`` form (weight
``mu = penalty * ||X||_2``) matches the cvxpy reference too, but its shrinkage of ``L`` leaves an
error floor on ``U`` (about 5e-3 at ``penalty=0.01`` on the synthetic model), so it is opt-in.
``U_hat`` is taken from the blocks of ``L_hat`` over pairs of two collaborative clients (see
:func:`_subspace`), and the multi-module rule is the joint group norm of
:mod:`clair_flower.clair.detection`.

Inputs that are all zero for every module (a free-rider, or an untrained adapter) are excluded
before the decomposition and reported as flagged with ``reason="all-zero update"``: a zero update
has no direction to test and would otherwise distort the block scale.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from clair_flower.clair import detection
from clair_flower.clair.decomposition import (
    BlockProblem, ClientFactors, dense_problem, lam_from_c, lam_grid, make_pairs, reduced_problem,
)
from clair_flower.lora import LoraFactors
from clair_flower.clair.refinement import POLICIES, gram_svd, mean_factors, refine_module, top_factors
from clair_flower.clair.solvers import FORMS, SolveResult, solve
from clair_flower.clair.solvers.fast import blas_threads

ClientId = Hashable


PATH_TOL = 1e-4
"""Tolerance of the lambda-path solves; flags and effective ranks are stable far above it. The
chosen point is then polished to ``ClairConfig.tol`` from the path point (warm: a few
iterations), beside the other modules when its ``c`` is shared with them."""

PATH_BATCH = 2
"""Path points solved side by side, each warm-started from the last point of the batch before
(a warm start saves few iterations: the penalty search dominates). The batches are fixed, so
the path does not depend on how many threads run them; on 2 cores this halves the first
module's path, during which no other module can start (they wait for its ``c``)."""


class ClairInputError(ValueError):
    """Updates CLAIR cannot interpret; the message names the client and module."""


@dataclass(frozen=True)
class ClairConfig:
    """Settings of one CLAIR aggregation (see the module docstring for ``lam``)."""

    rank: int | None = None
    solver: str = "fast"
    form: str = "constrained"
    lam: str | float = "auto"
    pairs: str = "all"
    pair_degree: int | None = None
    flag_threshold: float = 0.25
    """Pair flagged when ``||S_kl||_F > flag_threshold * median block norm``: client-specific
    off-subspace error below a quarter of a typical difference is treated as noise."""
    vote_threshold: float = 0.5
    flagged_policy: str = "consensus"
    in_subspace_stage: bool = False
    seed: int = 0
    max_iter: int = 3000
    tol: float = 1e-8
    penalty: float = 0.01
    """Penalized form: ``mu = penalty * ||X||_2`` on the normalised stack."""
    z_threshold: float = 3.5
    """Robust z-score above which a client is flagged: by the in-subspace stage, and by the
    score when the vote is inconclusive."""
    z_memory: int = 3
    """Inconclusive vote: a client is also flagged when the mean of its score's robust z over
    this round and its last ``z_memory - 1`` rounds (``prior_z`` of :func:`run_clair`) is above
    ``z_threshold``, so a persistent outlier is not lost to one round's dip."""
    rank_rtol: float = 0.05
    consistency_tol: float = 0.02
    path_points: int = 12
    blas_threads: int | None = 1
    """BLAS threads inside :func:`run_clair`; 1 avoids OpenBLAS thread hand-offs that made LAPACK
    calls 10x slower on a shared 2-core machine; ``None`` keeps the library's setting."""
    workers: int | None = None
    """Modules decomposed concurrently (threads; numpy and LAPACK release the GIL). ``None``:
    one per CPU core. Results do not depend on it. Two solves on two threads each run about 40%
    slower than one alone (Python-level work between kernels holds the GIL), so 2 cores give
    about 1.4x."""
    share_lam: bool = True
    """With ``lam="auto"``: reuse the ``c`` chosen on the first module for every other module
    whose point at that ``c`` is admissible (the rest run their own path)."""

    def validate(self) -> None:
        if self.solver not in ("fast", "reference"):
            raise ValueError(f"solver must be 'fast' or 'reference', got {self.solver!r}")
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {self.form!r}")
        if self.flagged_policy not in POLICIES:
            raise ValueError(f"flagged_policy must be one of {POLICIES}, got {self.flagged_policy!r}")
        if not (self.lam == "auto" or (isinstance(self.lam, (int, float)) and self.lam > 0)):
            raise ValueError(f"lam must be 'auto' or a positive float, got {self.lam!r}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be None or >= 1, got {self.rank}")
        if self.z_memory < 1:
            raise ValueError(f"z_memory must be >= 1, got {self.z_memory}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be None or >= 1, got {self.workers}")


@dataclass
class ClientReport:
    """One client's outcome. ``refined`` maps modules to factors at the client's rank; for large
    modules these are :class:`~clair_flower.clair.refinement.DeferredFactors`, built when read."""

    vote: float
    score: float
    flagged: bool
    refined: dict[str, LoraFactors]
    truncation_error: dict[str, float]
    reason: str = ""
    in_subspace_z: float | None = None
    clean_vote: float = 0.0
    """Flagged fraction of the pairs whose partner is not flagged (the decision statistic)."""
    score_z: float = 0.0
    """Robust z-score of ``score`` among this round's clients (what a caller keeps as history)."""


@dataclass
class ModuleReport:
    U: np.ndarray
    rank: int
    diagnostics: dict


@dataclass
class ClairResult:
    collaborative_set: frozenset
    flagged: frozenset
    clients: dict
    consensus: dict[str, LoraFactors]
    modules: dict[str, ModuleReport]
    diagnostics: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- input handling


def _as_factors(x: object, cid: ClientId, name: str) -> LoraFactors:
    """Validate one upload; dense arrays become exact-rank factors (scaling 1)."""
    if isinstance(x, LoraFactors):
        f = x
        arrays = (f.A, f.B)
    else:
        arr = np.asarray(x)
        if arr.ndim != 2:
            raise ClairInputError(f"client {cid!r}, module {name!r}: dense update must be 2-D, got {arr.shape}")
        arrays = (arr,)
    for a in arrays:
        if not np.issubdtype(a.dtype, np.floating):
            raise ClairInputError(f"client {cid!r}, module {name!r}: non-float dtype {a.dtype}")
        if not np.all(np.isfinite(a)):
            raise ClairInputError(f"client {cid!r}, module {name!r}: update contains NaN or Inf")
    if isinstance(x, LoraFactors):
        if not math.isfinite(f.scaling):
            raise ClairInputError(f"client {cid!r}, module {name!r}: non-finite scaling")
        return f
    dtype = np.float32 if arr.dtype == np.float32 else np.float64
    u, s, vt = np.linalg.svd(arr.astype(np.float64), full_matrices=False)
    r = max(1, int(np.sum(s > 1e-12 * (s[0] if s.size else 0.0))))
    root = np.sqrt(s[:r])
    return LoraFactors((root[:, None] * vt[:r]).astype(dtype), (u[:, :r] * root).astype(dtype), 1.0)


def _validate(updates: Mapping) -> tuple[list, list[str], dict[str, dict]]:
    """Client order, module names and validated factors; raises :class:`ClairInputError`."""
    if not isinstance(updates, Mapping) or len(updates) < 3:
        n = len(updates) if isinstance(updates, Mapping) else "no mapping"
        raise ClairInputError(f"CLAIR needs at least 3 clients, got {n}")
    cids = list(updates.keys())
    try:
        cids = sorted(cids)
    except TypeError:
        pass
    modules = sorted(str(m) for m in updates[cids[0]].keys()) if isinstance(updates[cids[0]], Mapping) else []
    if not modules:
        raise ClairInputError(f"client {cids[0]!r}: no modules (module: none)")
    out: dict[str, dict] = {m: {} for m in modules}
    for cid in cids:
        mods = updates[cid]
        if not isinstance(mods, Mapping):
            raise ClairInputError(f"client {cid!r}: updates must map module names to factors (module: all)")
        missing = set(modules) - set(mods.keys())
        extra = set(mods.keys()) - set(modules)
        if missing or extra:
            bad = sorted(missing or extra)[0]
            what = "missing" if missing else "not uploaded by other clients"
            raise ClairInputError(f"client {cid!r}, module {bad!r}: module {what}")
        for m in modules:
            out[m][cid] = _as_factors(mods[m], cid, m)
    for m in modules:
        ref_cid = cids[0]
        shape = out[m][ref_cid].shape
        for cid in cids:
            if out[m][cid].shape != shape:
                raise ClairInputError(
                    f"client {cid!r}, module {m!r}: update shape {out[m][cid].shape} differs from "
                    f"{shape} of client {ref_cid!r}"
                )
    return cids, modules, out


def _is_zero(f: LoraFactors) -> bool:
    return f.scaling == 0 or not np.any(f.A) or not np.any(f.B)


# ----------------------------------------------------------------------------- per module


def _effective_rank(sv: np.ndarray, rtol: float) -> int:
    return int(np.sum(sv > rtol * sv[0])) if sv.size and sv[0] > 0 else 0


def gap_rank(sv: np.ndarray) -> int:
    """Rank at the largest ratio ``sigma_i / sigma_{i+1}`` (tiny values floored at 1e-12 sigma_1)."""
    if sv.size == 0 or sv[0] <= 0:
        return 1
    s = np.maximum(np.append(sv, 0.0), 1e-12 * sv[0])
    return int(np.argmax(s[:-1] / s[1:])) + 1


def _assess(res: SolveResult, problem: BlockProblem, cfg: ClairConfig, n: int, c: float, lam: float,
            informative: np.ndarray) -> dict:
    """One path point: effective rank of ``L``, flagged clients, consistency, admissibility."""
    ev = detection.pair_evidence(res.S_norms, problem.block_norms)
    v = detection.majority_vote(problem.pairs, n, ev, informative, cfg.flag_threshold, cfg.vote_threshold)
    cons = detection.consistency(problem.pairs, v.pair_flags, v.flagged, informative)
    nflag = int(v.flagged.sum())
    return {"c": c, "lam": lam, "effective_rank": _effective_rank(res.L_sv, cfg.rank_rtol),
            "n_flagged": nflag, "consistency": cons, "status": res.status, "iterations": res.iterations,
            "admissible": cons >= 1 - cfg.consistency_tol and 2 * nflag < n}


def _solve_path(problem: BlockProblem, cfg: ClairConfig, n: int, c_shared: float | None = None,
                workers: int = 1, defer_admissible: bool = False, warm: SolveResult | None = None
                ) -> tuple[SolveResult, dict]:
    """Solve along the lambda path and pick the admissible point (module docstring).

    With ``c_shared`` (the ``c`` another module chose), that point is solved first and kept if
    admissible (warm-started from ``warm`` if given), which spares the path on every module but
    one. The path's points are solved in batches of :data:`PATH_BATCH` on up to ``workers``
    threads. With ``defer_admissible``, an admissible pick is returned at the path's tolerance,
    with ``info["deferred"]``: the caller polishes it to full accuracy (``c_shared`` and
    ``warm``) beside the other modules.
    """
    pairs = problem.pairs
    cs = [float(cfg.lam)] if cfg.lam != "auto" else list(lam_grid(pairs, n, cfg.path_points))[::-1]
    mu = None
    if cfg.form == "penalized":
        mu = cfg.penalty * float(np.linalg.norm(problem.X.astype(np.float64), 2))
    informative = detection.informative_pairs(problem.block_norms)
    spent = 0
    if c_shared is not None and cfg.lam == "auto":
        lam = lam_from_c(c_shared, len(pairs))
        res = solve(problem, lam, cfg.form, cfg.solver, mu=mu, tol=cfg.tol, max_iter=cfg.max_iter, warm=warm)
        point = _assess(res, problem, cfg, n, c_shared, lam, informative)
        if point["admissible"]:
            return res, {"c": c_shared, "lam": lam, "mu": mu, "selection": "shared", "path": [point],
                         "iterations_total": res.iterations}
        spent = res.iterations
    path, results, warm = [], [], None
    path_tol = cfg.tol if len(cs) == 1 or cfg.solver == "reference" else max(cfg.tol, PATH_TOL)
    batch = PATH_BATCH if cfg.solver == "fast" else 1
    for b0 in range(0, len(cs), batch):
        def point(c: float, warm: SolveResult | None = warm) -> SolveResult:
            return solve(problem, lam_from_c(c, len(pairs)), cfg.form, cfg.solver, mu=mu, tol=path_tol,
                         max_iter=cfg.max_iter, warm=warm)

        done = False
        for c, res in zip(cs[b0 : b0 + batch], _map_lazy(point, cs[b0 : b0 + batch], workers)):
            warm = res if cfg.solver == "fast" else None
            path.append(_assess(res, problem, cfg, n, c, lam_from_c(c, len(pairs)), informative))
            results.append(res)
            _drop_dominated(path, results)
            if 2 * path[-1]["n_flagged"] >= n and any(p["admissible"] for p in path):
                done = True  # smaller c only moves more blocks into S: the rest is inadmissible
                break
        if done:
            break
    adm = [i for i, p in enumerate(path) if p["admissible"]]
    if adm:
        best = min((path[i]["effective_rank"], path[i]["n_flagged"]) for i in adm)
        ties = [i for i in adm if (path[i]["effective_rank"], path[i]["n_flagged"]) == best]
        pick, how = ties[len(ties) // 2], "admissible"
    else:
        # A flagged majority contradicts the model (contaminated clients are a minority):
        # prefer minority points, then consistency, then low rank.
        pick = max(range(len(path)), key=lambda i: (2 * path[i]["n_flagged"] < n, path[i]["consistency"],
                                                     -path[i]["effective_rank"], -path[i]["n_flagged"]))
        how = "fallback" if len(cs) > 1 else "fixed"
    if len(cs) == 1 and adm:
        how = "fixed"
    if defer_admissible and how == "admissible":
        return results[pick], {"c": path[pick]["c"], "lam": path[pick]["lam"], "mu": mu, "selection": how,
                               "path": path, "iterations_total": spent + int(sum(p["iterations"] for p in path)),
                               "deferred": True}
    if path_tol > cfg.tol:  # polish the chosen point to full accuracy (warm start)
        res = solve(problem, path[pick]["lam"], cfg.form, cfg.solver, mu=mu, tol=cfg.tol,
                    max_iter=cfg.max_iter, warm=results[pick])
        path[pick]["iterations"] += res.iterations
        results[pick] = res
    info = {"c": path[pick]["c"], "lam": path[pick]["lam"], "mu": mu, "selection": how, "path": path,
            "iterations_total": spent + int(sum(p["iterations"] for p in path))}
    return results[pick], info


def _client_factors(fac: dict, m: str, active: list) -> ClientFactors:
    """One module's factors with the scaling folded into ``B``, rebuilt on demand (not stored:
    at LLM sizes a second copy of every upload would double the peak memory)."""
    dtype = np.float32 if all(fac[m][c].A.dtype == np.float32 for c in active) else np.float64
    return ClientFactors.scaled([fac[m][c].B for c in active], [fac[m][c].A for c in active],
                                [fac[m][c].scaling for c in active], dtype)


def _drop_dominated(path: list[dict], results: list) -> None:
    """Free the arrays of path points that can no longer be picked (memory at LLM sizes).

    Once an admissible point exists, inadmissible points and admissible points with a worse
    ``(effective rank, flagged count)`` key cannot win; only their metrics are kept.
    """
    adm = [i for i, p in enumerate(path) if p["admissible"]]
    if not adm:  # only the current fallback choice can still be picked among these
        keep = max(range(len(path)), key=lambda i: (path[i]["consistency"], -path[i]["effective_rank"]))
        for i in range(len(path) - 1):
            if i != keep:
                results[i] = None
        return
    best = min((path[i]["effective_rank"], path[i]["n_flagged"]) for i in adm)
    for i, p in enumerate(path):
        key = (p["effective_rank"], p["n_flagged"])
        if results[i] is not None and (not p["admissible"] or key != best):
            results[i] = None


def _problem(cf: ClientFactors, pairs, cfg: ClairConfig) -> tuple[BlockProblem, float]:
    """Step 1 for one module: the stacked differences (reduced for the fast solver), and seconds."""
    t0 = time.perf_counter()
    problem = dense_problem(cf, pairs) if cfg.solver == "reference" else reduced_problem(cf, pairs)
    return problem, time.perf_counter() - t0


def _module(problem: BlockProblem, t_red: float, cfg: ClairConfig, n: int, c_shared: float | None = None,
            path: dict | None = None, solved: tuple[SolveResult, dict] | None = None,
            warm: SolveResult | None = None) -> tuple[dict, np.ndarray]:
    """Step 2 for one module; returns its report pieces and the pair evidence.

    ``path`` is this module's own path whose pick is ``c_shared`` (the first module's, solved
    at that ``c`` beside the others, from its path point ``warm``): it stays the reported
    selection. ``solved`` is a ``_solve_path`` result already at hand.
    """
    t0 = time.perf_counter()
    res, info = solved if solved is not None else _solve_path(problem, cfg, n, c_shared, warm=warm)
    if path is not None and info["selection"] == "shared":
        info = {**path, "iterations_total": path["iterations_total"] + info["iterations_total"]}
    info = dict(info)
    path_seconds = info.pop("seconds", 0.0)  # the first module's path, run before
    ev = detection.pair_evidence(res.S_norms, problem.block_norms)
    k = int(np.sum(res.L_sv > 1e-10 * res.L_sv[0])) if res.L_sv.size and res.L_sv[0] > 0 else 0
    L_left = res.L_left[:, :k]
    L_right = res.L_right[:k].astype(np.float64)  # L = L_left @ L_right
    diag = {"solver": res.solver, "form": cfg.form, "status": res.status, "iterations": res.iterations,
            "objective": res.objective, "seconds": t_red + path_seconds + time.perf_counter() - t0,
            "reduce_seconds": t_red, "singular_values": [float(s) for s in res.L_sv[:10]], **info, **problem.info}
    inform = detection.informative_pairs(problem.block_norms)
    lifted = problem.lift_left(L_left)
    return {"offsets": problem.offsets, "lifted": np.asarray(lifted, dtype=np.float64), "L_left": L_left,
            "L_right": L_right, "diagnostics": diag, "informative": inform, "inner": problem.inner}, ev


def _map_lazy(fn, items: Sequence, workers: int | None) -> Iterator:
    """``fn`` over ``items`` in order on up to ``workers`` threads (``None``: one per core; BLAS
    and LAPACK release the GIL); on one worker sequential and lazy, so a caller may stop early."""
    workers = min(len(items), workers or os.cpu_count() or 1)
    if workers <= 1:
        return map(fn, items)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return iter(list(pool.map(fn, items)))


def _map_modules(fn, modules: list[str], workers: int | None) -> list:
    """``[fn(m) for m in modules]`` on a thread pool."""
    return list(_map_lazy(fn, modules, workers))


def _decompose_modules(fac: dict, modules: list[str], active: list, pairs, cfg: ClairConfig, n: int) -> dict:
    """Steps 1-2 for every module; the first module's ``c`` is offered to the rest (``share_lam``).

    The first module runs its path alone, on every worker; with an admissible pick it is then
    polished at that ``c`` (from its path point) while every other module is solved at it, on
    the same pool.
    """
    def checked(fn, m: str):
        try:
            return fn()
        except ValueError as e:  # e.g. every active client uploaded the same update
            raise ClairInputError(f"module {m!r}: {e} (clients: {active!r})") from e

    def one(m: str, c_shared: float | None = None, pre: tuple | None = None, path: dict | None = None,
            solved: tuple | None = None, warm: SolveResult | None = None) -> dict:
        def run() -> dict:
            problem, t_red = pre if pre is not None else _problem(_client_factors(fac, m, active), pairs, cfg)
            out, ev = _module(problem, t_red, cfg, n, c_shared, path, solved, warm)
            out["evidence"] = ev
            return out
        return checked(run, m)

    workers = cfg.workers or os.cpu_count() or 1
    m0 = modules[0]
    share = cfg.share_lam and cfg.lam == "auto"
    pre0 = checked(lambda: _problem(_client_factors(fac, m0, active), pairs, cfg), m0)
    t0 = time.perf_counter()
    res0, path0 = checked(lambda: _solve_path(pre0[0], cfg, n, workers=workers, defer_admissible=share), m0)
    path0["seconds"] = time.perf_counter() - t0
    if path0.pop("deferred", False):  # an admissible c: every module, the first included, is solved at it
        c = path0["c"]
        outs = _map_modules(lambda m: one(m, c, pre0, path0, warm=res0) if m == m0 else one(m, c),
                            modules, cfg.workers)
        return dict(zip(modules, outs))
    first = one(m0, pre=pre0, solved=(res0, path0))  # no admissible pick (or no sharing): the rest run their own
    rest = _map_modules(lambda m: one(m), modules[1:], cfg.workers)
    return dict(zip(modules, [first, *rest]))


def _subspace(out: dict, benign_pairs: np.ndarray, rank: int | None) -> tuple[np.ndarray, int, np.ndarray]:
    """Step 3: ``U_hat`` from the blocks of ``L_hat`` whose pairs are both collaborative.

    Pairs touching a contaminated client do not cancel the common component ``C``, so ``L_hat``
    may carry its direction there; restricted to collaborative pairs it lies in ``span(U)`` in
    the model. ``r_hat`` is ``rank`` or the largest singular-value gap of that restriction.
    """
    off = out["offsets"]
    cols = np.concatenate([np.arange(off[i], off[i + 1]) for i in np.flatnonzero(benign_pairs)] or [np.zeros(0, int)])
    if cols.size == 0:  # no collaborative pair: fall back to all of L
        cols = np.arange(off[-1])
    # L_b = L_left @ R_b with orthonormal L_left: its left singular vectors are L_left W for the
    # eigenvectors W of the small Gram R_b R_b^T, and Q L_left W = lifted @ W (only p x k kept)
    Rb = out["L_right"][:, cols]
    e, W = np.linalg.eigh(Rb @ Rb.T)
    s, W = np.sqrt(np.maximum(e[::-1], 0.0)), W[:, ::-1]
    r_hat = rank if rank is not None else gap_rank(s)
    r_hat = max(1, min(r_hat, W.shape[1]))
    U = out["lifted"] @ W[:, :r_hat]
    return np.linalg.qr(U)[0], int(r_hat), s


# ----------------------------------------------------------------------------- entry point


def run_clair(updates: Mapping[ClientId, Mapping[str, LoraFactors | np.ndarray]],
              cfg: ClairConfig | None = None,
              prior_z: Mapping[ClientId, Sequence[float]] | None = None) -> ClairResult:
    """Run CLAIR on one round of uploads; see the module docstring and DESIGN section 3.

    ``prior_z`` maps a client to its ``score_z`` of earlier rounds (oldest first); it only
    matters when the vote is inconclusive (see ``ClairConfig.z_memory``).
    """
    cfg = cfg or ClairConfig()
    cfg.validate()
    if cfg.blas_threads is None:
        return _run_clair(updates, cfg, prior_z or {})
    with blas_threads(cfg.blas_threads):
        return _run_clair(updates, cfg, prior_z or {})


def _persistent_outliers(active: list, z: np.ndarray, prior_z: Mapping, cfg: ClairConfig) -> np.ndarray:
    """``z > z_threshold``, or the mean z over the last ``z_memory`` rounds above it."""
    out = z > cfg.z_threshold
    for i, c in enumerate(active):
        recent = [float(v) for v in prior_z.get(c, ())][-(cfg.z_memory - 1):] if cfg.z_memory > 1 else []
        if recent and np.mean([*recent, z[i]]) > cfg.z_threshold:
            out[i] = True
    return out


def _run_clair(updates: Mapping, cfg: ClairConfig, prior_z: Mapping) -> ClairResult:
    t0 = time.perf_counter()
    cids, modules, fac = _validate(updates)
    zero = [c for c in cids if all(_is_zero(fac[m][c]) for m in modules)]
    active = [c for c in cids if c not in zero]
    if len(active) < 3:
        raise ClairInputError(
            f"CLAIR needs at least 3 clients with non-zero updates; all-zero: {zero!r} (module: all)"
        )
    n = len(active)
    pairs = make_pairs(n, cfg.pairs, cfg.pair_degree, cfg.seed)
    mod_out = _decompose_modules(fac, modules, active, pairs, cfg, n)
    evidence = [mod_out[m]["evidence"] for m in modules]
    informative = np.logical_or.reduce([mod_out[m]["informative"] for m in modules])
    combined = detection.combine_modules(evidence)
    votes = detection.majority_vote(pairs, n, combined, informative, cfg.flag_threshold, cfg.vote_threshold)
    flagged = votes.flagged.copy()
    score_z = detection.robust_z(votes.score)
    inconclusive = 2 * int(flagged.sum()) >= n
    if inconclusive:
        # A flagged majority contradicts the model (contaminated clients are a minority):
        # the vote is inconclusive, so only robust outliers of the continuous score are flagged.
        flagged = _persistent_outliers(active, score_z, prior_z, cfg)
    _set_subspaces(mod_out, modules, pairs, flagged, cfg.rank)
    z_scores = None
    if cfg.in_subspace_stage:
        cand = [i for i in range(n) if not flagged[i]]
        coeffs = []
        for m in modules:
            cf = _client_factors(fac, m, active)
            coeffs.append([(mod_out[m]["U"].T @ cf.B[i].astype(np.float64)) @ cf.A[i] for i in cand])
        z, zflag = detection.in_subspace_flags(coeffs, cfg.z_threshold)
        z_scores = dict(zip(cand, z))
        for j, i in enumerate(cand):
            flagged[i] |= bool(zflag[j])
    collab = [i for i in range(n) if not flagged[i]]
    if not collab:
        raise RuntimeError("CLAIR flagged every client; no collaborative set to aggregate")
    _set_subspaces(mod_out, modules, pairs, flagged, cfg.rank)
    refined: dict = {c: {} for c in cids}
    errors: dict = {c: {} for c in cids}
    consensus: dict[str, LoraFactors] = {}

    def refine(m: str) -> tuple:
        cf = _client_factors(fac, m, active)
        scal = [fac[m][c].scaling for c in active]
        ref, err, cons = refine_module(cf.B, cf.A, scal, mod_out[m]["U"], collab, cfg.flagged_policy,
                                       inner=mod_out[m]["inner"])
        zeros = {c: _policy_for_zero(fac[m][c], cf, collab, cfg.flagged_policy) for c in zero}
        return ref, err, cons, zeros

    for m, (ref, err, cons, zeros) in zip(modules, _map_modules(refine, modules, cfg.workers)):
        consensus[m] = cons
        for i, c in enumerate(active):
            refined[c][m], errors[c][m] = ref[i], err[i]
        for c in zero:  # excluded clients get the policy as well
            refined[c][m], errors[c][m] = zeros[c]
    clients = {}
    for i, c in enumerate(active):
        clients[c] = ClientReport(float(votes.vote[i]), float(votes.score[i]), bool(flagged[i]), refined[c],
                                  errors[c], reason=_reason(i, votes, flagged, inconclusive),
                                  in_subspace_z=None if z_scores is None or i not in z_scores else float(z_scores[i]),
                                  clean_vote=float(votes.clean_vote[i]), score_z=float(score_z[i]))
    for c in zero:
        clients[c] = ClientReport(1.0, float("inf"), True, refined[c], errors[c], reason="all-zero update",
                                  clean_vote=1.0)
    flagged_ids = frozenset(c for c in cids if clients[c].flagged)
    modules_rep = {m: ModuleReport(mod_out[m]["U"], mod_out[m]["rank"], mod_out[m]["diagnostics"]) for m in modules}
    statuses = sorted({modules_rep[m].diagnostics["status"] for m in modules})
    diag = {"solver": cfg.solver, "form": cfg.form, "status": statuses[0] if len(statuses) == 1 else ",".join(statuses),
            "seconds": time.perf_counter() - t0, "n_clients": len(cids), "n_active": n, "n_pairs": len(pairs),
            "pairs": cfg.pairs, "lam": {m: modules_rep[m].diagnostics["lam"] for m in modules},
            "c": {m: modules_rep[m].diagnostics["c"] for m in modules},
            "rank": {m: modules_rep[m].rank for m in modules},
            "excluded_zero": [str(c) for c in zero], "in_subspace_stage": cfg.in_subspace_stage,
            "vote_inconclusive": bool(inconclusive)}
    return ClairResult(frozenset(c for c in cids if c not in flagged_ids), flagged_ids, clients, consensus,
                       modules_rep, diag)


def _set_subspaces(mod_out: dict, modules, pairs, flagged: np.ndarray, rank: int | None) -> None:
    """Fill ``U``/``rank`` of every module from the pairs among non-flagged clients."""
    benign = np.array([not (flagged[k] or flagged[l]) for k, l in pairs])
    for m in modules:
        U, r_hat, s = _subspace(mod_out[m], benign, rank)
        mod_out[m]["U"], mod_out[m]["rank"] = U, r_hat
        mod_out[m]["diagnostics"]["subspace_singular_values"] = [float(x) for x in s[: max(r_hat + 5, 10)]]
        mod_out[m]["diagnostics"]["rank"] = r_hat


def _reason(i: int, votes: detection.Votes, flagged: np.ndarray, inconclusive: bool) -> str:
    if inconclusive and flagged[i]:
        return "score outlier (vote inconclusive)"
    if votes.flagged[i] and flagged[i]:
        return "off-subspace majority vote"
    if flagged[i]:
        return "in-subspace stage"
    return ""


def _policy_for_zero(f: LoraFactors, cf: ClientFactors, collab, policy: str
                     ) -> tuple[LoraFactors, float]:
    """The flagged policy for an excluded all-zero client (its own rank and scaling)."""
    dtype = cf.B[0].dtype
    if policy == "consensus":
        Bm, Am = mean_factors(cf.B, cf.A, collab)
        return top_factors(*gram_svd(Bm, Am, f.rank), f.rank, f.scaling or 1.0, dtype)
    return LoraFactors(np.zeros_like(f.A, dtype=dtype), np.zeros_like(f.B, dtype=dtype), float(f.scaling)), 0.0
