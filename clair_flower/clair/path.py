"""The lambda path: which ``c`` of ``lam = c / sqrt(|P|)`` a module is solved at.

On the normalised stack ``X``, ``c`` runs over a geometric grid between the two ends of the
program's transition (:func:`transition`): below ``c_all`` the optimum is ``S = X`` (every pair
flagged), above ``c_none`` it is ``L = X`` (no pair flagged), for any ``N``. The grid is solved
from small to large ``c``, warm-started: ``L`` grows from zero, so the partial SVT stays cheap, and
the path stops once ``L`` has spread over the clients' span (larger ``c`` only spreads it more)
or once ``L``'s rank has grown past the best admissible point's (it cannot win any more). Path
points are solved to :data:`PATH_TOL`, the chosen one to the configured tolerance. A point is *admissible* when its flagged-pair pattern is explained by a
client set (consistency >= ``1 - consistency_tol``, see
:func:`~clair_flower.clair.detection.consistency`), the flagged clients are a strict minority,
and ``L`` is low-rank: its effective rank is at most ``structure_ratio`` times the largest rank
the clients' updates could span, ``min(p, sum_k r_k)``. An ``L`` spread over that whole
span absorbed every difference, which says "no low-rank structure", not "nobody is contaminated"
(the top of the path, ``L = M``, is such a point unless ``M`` itself is low-rank). Among admissible points the one with the lowest effective rank of ``L`` (singular values above
``rank_rtol * sigma_1``) wins, then the fewest flagged clients, then the middle of the remaining
run of ``c``. With no admissible point, the most consistent point with a flagged minority is
used (``selection = "fallback"``). A fixed ``ClairConfig.c`` is solved alone.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from clair_flower.clair import detection
from clair_flower.clair.calibration import calibrated_vote
from clair_flower.clair.config import ClairConfig
from clair_flower.clair.decomposition import BlockProblem, block_norms, lam_from_c
from clair_flower.clair.solvers import SolveResult, solve
from clair_flower.clair.solvers.batched import Request, solve_many
from clair_flower.clair.solvers.fast import spectral_norm
from clair_flower.clair.threads import map_lazy

PATH_TOL = 1e-4
"""Tolerance of the lambda-path solves; flags and effective ranks are stable far above it. The
chosen point is then polished to ``ClairConfig.tol`` from the path point (warm: a few
iterations), beside the other modules when its ``c`` is shared with them."""

PLATEAU = 4
"""Admissible points in a row with the same ``(effective rank, flagged count)`` after which the
path stops: the pick is the middle of that run, and larger ``c`` could only tie with it."""

PATH_BATCH = 2
"""Path points solved side by side, each warm-started from the last point of the batch before.
The batches are fixed, so the path does not depend on how many threads run them; on 2 cores
this halves the first module's path, during which no other module can start (they wait for
its ``c``)."""


@dataclass(frozen=True)
class Transition:
    """Where the program's optimum changes regime, on the ``c`` scale of ``lam = c / sqrt(|P|)``.

    ``c_all``: at or below it ``S = X`` is optimal (``lam ||N||_2 <= 1`` for the stack ``N``
    with every block scaled to unit norm). ``c_none``: at or above it ``L = X`` is optimal
    (``lam >= max_kl ||V_kl||_F`` for ``X = U Sigma V^T``: ``U V^T`` is then a dual certificate).
    """

    c_all: float
    c_none: float

    def grid(self, num: int) -> np.ndarray:
        """``num`` geometric points strictly inside ``(c_all, c_none)``: both ends' optima are
        known without a solve (every pair flagged; ``L = X``) and neither can be admissible
        unless ``X`` itself is low-rank, which the top interior point then shows."""
        lo = max(self.c_all, 1e-6)
        hi = max(self.c_none, lo * 1.0001)
        return np.geomspace(lo, hi, max(num, 2) + 2)[1:-1]


def transition(problem: BlockProblem, rtol: float = 1e-10) -> Transition:
    """Both ends of the transition: ``c_none`` from the stack's ``d x d`` Gram (``d`` its rows;
    the product in the stack's dtype, the eigensolver in float64), ``c_all`` from ``||N||_2``
    by power iteration (no second Gram)."""
    X = problem.X
    n_pairs = len(problem.pairs)
    e, U = np.linalg.eigh((X @ X.T).astype(np.float64))
    keep = e > rtol * max(float(e[-1]), 1e-300)
    U, s = U[:, keep], np.sqrt(e[keep])
    V = (U.T.astype(X.dtype) @ X) / s[:, None].astype(X.dtype)  # rows of V^T
    v_norms = block_norms(V, problem.widths)
    scale = np.repeat(np.divide(1.0, problem.block_norms, out=np.zeros_like(problem.block_norms),
                                where=problem.block_norms > 0), problem.widths).astype(X.dtype)
    n_norm = max(spectral_norm(X * scale), 1e-150)
    sq = math.sqrt(n_pairs)
    return Transition(c_all=sq / n_norm, c_none=sq * float(v_norms.max(initial=0.0)))


def max_rank(problem: BlockProblem) -> int:
    """The largest rank the clients' updates could span, ``min(p, sum_k r_k)`` (``info
    ["span_rank"]``, set when the problem is built), else the stack's smaller dimension."""
    return int(problem.info.get("span_rank", min(problem.X.shape)))


def energy_rank(sv: np.ndarray, energy: float = 0.9) -> int:
    """How many leading singular values hold ``energy`` of ``sum sv^2`` (0 for ``L = 0``)."""
    e = np.cumsum(np.asarray(sv, dtype=np.float64) ** 2)
    return int(np.searchsorted(e, energy * e[-1]) + 1) if e.size and e[-1] > 0 else 0


@dataclass
class PathPoint:
    """One solved point of the path and how it was judged."""

    c: float
    lam: float
    effective_rank: int
    energy_rank: int
    """Singular values of ``L`` holding 90% of its energy."""
    structured: bool
    """``effective_rank <= structure_ratio * max_rank``: ``L`` is low-rank in the clients' span."""
    n_flagged: int
    consistency: float
    status: str
    iterations: int
    admissible: bool
    noise: float = 0.0
    """The benign pairs' evidence level at this point (:mod:`clair_flower.clair.calibration`)."""
    threshold: float = 0.0
    """The pair threshold it gave."""

    @property
    def key(self) -> tuple[int, int]:
        """Lower is better among admissible points: rank of ``L``, then flagged count."""
        return (self.effective_rank, self.n_flagged)


@dataclass
class PathChoice:
    """The point a module is solved at, and the path that led there.

    ``selection`` is ``"admissible"``, ``"shared"`` (another module's ``c``, admissible here),
    ``"fallback"`` (no admissible point) or ``"fixed"`` (a fixed ``ClairConfig.c``). ``deferred``: the
    pick is still at the path's tolerance; the caller polishes it.
    """

    c: float
    lam: float
    mu: float | None
    selection: str
    path: list[PathPoint]
    iterations_total: int
    seconds: float = 0.0
    deferred: bool = False
    admissible: bool = True
    """The chosen point is admissible (always, but for ``"fallback"`` and an inadmissible
    ``"fixed"`` point): the module shows the model's structure at it."""

    def diagnostics(self) -> dict:
        """JSON values for :class:`~clair_flower.clair.result.ModuleReport`."""
        return {"c": self.c, "lam": self.lam, "mu": self.mu, "selection": self.selection,
                "admissible": self.admissible, "path": [asdict(p) for p in self.path], "iterations_total": self.iterations_total}


def effective_rank(sv: np.ndarray, rtol: float) -> int:
    """Singular values above ``rtol * sigma_1``."""
    return int(np.sum(sv > rtol * sv[0])) if sv.size and sv[0] > 0 else 0


def assess(res: SolveResult, problem: BlockProblem, cfg: ClairConfig, n: int, c: float,
           informative: np.ndarray) -> PathPoint:
    """Judge one solved point: effective rank of ``L``, flagged clients, consistency."""
    ev = detection.pair_evidence(res.S_norms, problem.block_norms)
    v, th = calibrated_vote(problem.pairs, n, ev, informative, cfg.flag_threshold, cfg.noise_factor,
                            cfg.vote_threshold)
    cons = detection.consistency(problem.pairs, v.pair_flags, v.flagged, informative)
    nflag = int(v.flagged.sum())
    rank = effective_rank(res.L_sv, cfg.rank_rtol)
    structured = rank <= cfg.structure_ratio * max_rank(problem)
    return PathPoint(c=c, lam=lam_from_c(c, len(problem.pairs)), effective_rank=rank,
                     energy_rank=energy_rank(res.L_sv), structured=structured, n_flagged=nflag, consistency=cons,
                     status=res.status, iterations=res.iterations,
                     admissible=(cons >= 1 - cfg.consistency_tol and 2 * nflag < n and structured
                                 and th.noise <= cfg.max_noise),
                     noise=th.noise, threshold=th.threshold)


def penalty_weight(problem: BlockProblem, cfg: ClairConfig) -> float | None:
    """The penalized form's ``mu``; ``None`` for the constrained form."""
    if cfg.form != "penalized":
        return None
    return cfg.penalty * float(np.linalg.norm(problem.X.astype(np.float64), 2))


def solve_path(problem: BlockProblem, cfg: ClairConfig, n: int, c_shared: float | None = None,
               workers: int = 1, defer_admissible: bool = False, warm: SolveResult | None = None
               ) -> tuple[SolveResult, PathChoice]:
    """Solve along the lambda path and pick the admissible point (module docstring).

    With ``c_shared`` (the ``c`` another module chose), that point is solved first and kept if
    admissible (warm-started from ``warm`` if given), which spares the path on every module but
    one. The path's points are solved in batches of :data:`PATH_BATCH` on up to ``workers``
    threads. With ``defer_admissible``, an admissible pick is returned at the path's tolerance
    with ``deferred=True``: the caller polishes it to full accuracy beside the other modules.
    """
    def run(req: Request) -> SolveResult:
        return solve(problem, req.lam, cfg.form, cfg.solver, mu=req.mu, tol=req.tol, max_iter=cfg.max_iter,
                     warm=req.warm)

    steps = path_steps(problem, cfg, n, c_shared, defer_admissible, warm)
    reqs = next(steps)
    while True:
        try:  # lazily on one worker: the path may stop before a batch's second point is solved
            reqs = steps.send(map_lazy(run, reqs, workers))
        except StopIteration as stop:
            return stop.value


def solve_paths(problems: Sequence[BlockProblem], cfg: ClairConfig, n: int, c_shared: float | None = None,
                defer_admissible: bool = False, warms: Sequence[SolveResult | None] | None = None
                ) -> list[tuple[SolveResult, PathChoice]]:
    """:func:`solve_path` for several modules in lockstep: at each step every module's next
    solves are handed to :func:`~clair_flower.clair.solvers.batched.solve_many` together, so the
    problems of one layout share each ADMM iteration's calls (issue #21: a small round's cost
    is per-call overhead). Each module's path, its choice and every solve are those of
    :func:`solve_path` on its own; only a batch's second point may be solved where the serial
    path stopped after the first (its result is not read)."""
    warms = list(warms) if warms is not None else [None] * len(problems)
    steps = [path_steps(p, cfg, n, c_shared, defer_admissible, w) for p, w in zip(problems, warms)]
    out: list = [None] * len(problems)
    pending = {i: next(s) for i, s in enumerate(steps)}
    while pending:
        flat = [(i, r) for i, reqs in pending.items() for r in reqs]
        results = solve_many([problems[i] for i, _ in flat], [r for _, r in flat], cfg.form, cfg.solver,
                             cfg.max_iter)
        mine: dict[int, list[SolveResult]] = {i: [] for i in pending}
        for (i, _), res in zip(flat, results):
            mine[i].append(res)
        nxt = {}
        for i in pending:
            try:
                nxt[i] = steps[i].send(iter(mine[i]))
            except StopIteration as stop:
                out[i] = stop.value
        pending = nxt
    return out


def path_steps(problem: BlockProblem, cfg: ClairConfig, n: int, c_shared: float | None,
               defer_admissible: bool, warm: SolveResult | None
               ) -> Generator[list[Request], Iterator[SolveResult], tuple[SolveResult, PathChoice]]:
    """The path of :func:`solve_path` as a coroutine: it yields the solves it needs next (a list
    of :class:`~clair_flower.clair.solvers.batched.Request`), is sent an iterator over their
    results (read in order, as far as it needs), and returns ``(result, PathChoice)``; the
    driver decides how the solves run (:func:`solve_path`: threads; :func:`solve_paths`:
    batched across modules)."""
    pairs = problem.pairs
    mu = penalty_weight(problem, cfg)
    informative = detection.informative_pairs(problem.block_norms)
    spent = 0
    if c_shared is not None and cfg.c == "auto":
        res = next((yield [Request(lam_from_c(c_shared, len(pairs)), cfg.tol, warm, mu)]))
        point = assess(res, problem, cfg, n, c_shared, informative)
        if point.admissible:
            return res, PathChoice(c_shared, point.lam, mu, "shared", [point], res.iterations)
        spent = res.iterations
    # the transition only where a path is run: a module kept at the shared c never needs it
    # (0.47 of ~4.4 CPU s per 7B-shaped module)
    cs = [float(cfg.c)] if cfg.c != "auto" else [float(c) for c in transition(problem).grid(cfg.path_points)]
    path: list[PathPoint] = []
    results: list[SolveResult | None] = []
    last: SolveResult | None = None
    path_tol = cfg.tol if len(cs) == 1 or cfg.solver == "reference" else max(cfg.tol, PATH_TOL)
    batch = PATH_BATCH if cfg.solver == "fast" else 1
    for b0 in range(0, len(cs), batch):
        # every point of a batch warm-starts from the last point of the batch before
        reqs = [Request(lam_from_c(c, len(pairs)), path_tol, last, mu) for c in cs[b0 : b0 + batch]]
        done = False
        for c, res in zip(cs[b0 : b0 + batch], (yield reqs)):
            last = res if cfg.solver == "fast" else None
            path.append(assess(res, problem, cfg, n, c, informative))
            results.append(res)
            _drop_dominated(path, results)
            if _past_the_window(path):
                done = True
                break
        if done:
            break
    pick, how = _pick(path, n, fixed=len(cs) == 1)
    total = spent + int(sum(p.iterations for p in path))
    if defer_admissible and how == "admissible":
        return results[pick], PathChoice(path[pick].c, path[pick].lam, mu, how, path, total, deferred=True)
    res = results[pick]
    if path_tol > cfg.tol:  # polish the chosen point to full accuracy (warm start)
        res = next((yield [Request(path[pick].lam, cfg.tol, res, mu)]))
        path[pick].iterations += res.iterations
        total += res.iterations
    return res, PathChoice(path[pick].c, path[pick].lam, mu, how, path, total, admissible=path[pick].admissible)


def _past_the_window(path: list[PathPoint]) -> bool:
    """No larger ``c`` can change the pick: ``L`` has spread over the clients' span, its rank has
    grown past the best admissible point's (``L`` only grows with ``c``), or the last
    :data:`PLATEAU` points are admissible ties."""
    last = path[-1]
    if not last.structured:
        return True
    best = min((p.effective_rank for p in path if p.admissible), default=None)
    if best is not None and last.effective_rank > best:
        return True
    run = path[-PLATEAU:]
    return len(run) == PLATEAU and all(p.admissible and p.key == last.key for p in run)


def _pick(path: list[PathPoint], n: int, fixed: bool) -> tuple[int, str]:
    """Index of the chosen point and how it was chosen."""
    adm = [i for i, p in enumerate(path) if p.admissible]
    if adm:
        best = min(path[i].key for i in adm)
        ties = [i for i in adm if path[i].key == best]
        return ties[len(ties) // 2], "fixed" if fixed else "admissible"
    # No admissible point: prefer a point that flags a minority (it separates someone), then one
    # that flags a majority (S holds the differences: an informative score), last the trivial
    # "everything in L" points (S = 0 says nothing); then consistency, then low rank.
    def tier(p: PathPoint) -> int:
        return 2 if 0 < 2 * p.n_flagged < n else (1 if p.n_flagged else 0)

    pick = max(range(len(path)), key=lambda i: (tier(path[i]), path[i].consistency,
                                                 -path[i].effective_rank, -path[i].n_flagged))
    return pick, "fixed" if fixed else "fallback"


def _drop_dominated(path: list[PathPoint], results: list) -> None:
    """Free the arrays of path points that can no longer be picked (memory at LLM sizes).

    Once an admissible point exists, inadmissible points and admissible points with a worse
    ``(effective rank, flagged count)`` key cannot win; only their metrics are kept.
    """
    adm = [i for i, p in enumerate(path) if p.admissible]
    if not adm:  # only the current fallback choice can still be picked among these
        keep = max(range(len(path)), key=lambda i: (path[i].consistency, -path[i].effective_rank))
        for i in range(len(path) - 1):
            if i != keep:
                results[i] = None
        return
    best = min(path[i].key for i in adm)
    for i, p in enumerate(path):
        if results[i] is not None and (not p.admissible or p.key != best):
            results[i] = None
