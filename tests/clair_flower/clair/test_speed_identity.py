"""Speed-ups of CLAIR's server step leave every flag and refined adapter as the slow path has them.

Issue #21: each speed-up is checked against the code path it replaced on fixed inputs (float32
uploads of copy-task-like shapes, with and without a shared subspace), comparing the dense
refined updates ``s B A`` (factor signs are free) to 1e-6 relative, the flags and the decision.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from clair_flower.clair import ClairConfig, run_clair
from clair_flower.clair.solvers import fast
from clair_flower.clair.synthetic import make_large_factors
from clair_flower.lora import LoraFactors

SHAPES = {"attn": (48, 16), "proj": (16, 16), "fc": (64, 16)}


def _uploads(structured: bool, n: int = 7, rank: int = 4) -> dict[int, dict[str, LoraFactors]]:
    """Fixed float32 uploads: a shared rank-2 subspace and one contaminated client, or none."""
    updates: dict[int, dict[str, LoraFactors]] = {k: {} for k in range(n)}
    bad = None
    for j, (name, shape) in enumerate(SHAPES.items()):
        ups, _, bad = make_large_factors(n, shape, rank, shared_rank=2, noise=0.1 if structured else 10.0,
                                         seed=40 + j, contaminated=bad if structured else frozenset())
        for k, f in ups.items():
            updates[k][name] = f
    return updates


def _dense(result) -> dict[tuple, np.ndarray]:
    return {(c, m): np.asarray(f.B, np.float64) @ np.asarray(f.A, np.float64) * f.scaling
            for c, rep in result.clients.items() for m, f in rep.refined.items()}


def _assert_same(a, b) -> None:
    assert a.flagged == b.flagged and a.decision == b.decision
    assert {m: r.diagnostics["c"] for m, r in a.modules.items()} == {m: r.diagnostics["c"] for m, r in b.modules.items()}
    da, db = _dense(a), _dense(b)
    assert da.keys() == db.keys()
    for key, x in da.items():
        scale = max(float(np.linalg.norm(x)), 1e-30)
        assert float(np.linalg.norm(x - db[key])) <= 1e-6 * scale, key


def _scipy_eigh_above(G: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """The SVT's eigendecomposition before issue #21: scipy's wrapper around the same LAPACK."""
    return scipy.linalg.eigh(G, subset_by_value=(floor, np.inf), driver="evr", check_finite=False)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 3, 40, 130])
def test_direct_syevr_is_bitwise_scipys_eigh(dtype, n):
    rng = np.random.default_rng(n)
    Y = rng.standard_normal((n, 3 * n + 1)).astype(dtype)
    G = Y @ Y.T
    ev = np.linalg.eigvalsh(G.astype(np.float64))
    for floor in (float(np.median(ev)), float(ev[-1]) * 2.0, -1.0):  # some, none, every eigenpair
        w_ref, v_ref = _scipy_eigh_above(G, floor)
        w, v = fast.eigh_above(G, floor)
        assert w.dtype == w_ref.dtype and np.array_equal(w, w_ref) and np.array_equal(v, v_ref)


@pytest.mark.parametrize("structured", [True, False])
def test_run_clair_with_direct_syevr_matches_scipys_eigh(monkeypatch, structured):
    updates = _uploads(structured)
    cfg = ClairConfig(workers=1)
    fast_result = run_clair(updates, cfg)
    monkeypatch.setattr(fast, "eigh_above", _scipy_eigh_above)
    _assert_same(fast_result, run_clair(updates, cfg))


def test_modules_on_one_thread_match_the_thread_pool():
    updates = _uploads(structured=False)
    threaded = run_clair(updates, ClairConfig(workers=2))
    _assert_same(threaded, run_clair(updates, ClairConfig(workers=1)))


def test_modules_kept_at_the_shared_c_never_compute_the_transition(monkeypatch):
    from clair_flower.clair import path

    updates = _uploads(structured=True)
    before = run_clair(updates, ClairConfig(workers=1))
    calls = []
    real = path.transition

    def counted(problem, *args, **kwargs):
        calls.append(problem.X.shape)
        return real(problem, *args, **kwargs)

    monkeypatch.setattr(path, "transition", counted)
    after = run_clair(updates, ClairConfig(workers=1))
    selections = [r.diagnostics["selection"] for r in after.modules.values()]
    assert selections.count("shared") == len(SHAPES) - 1  # the path ran on the first module only
    assert len(calls) == 1
    _assert_same(before, after)


def _bitwise(a, b) -> bool:
    """Same flags, decision, chosen ``c`` and bit-identical refined factors."""
    same_c = {m: r.diagnostics["c"] for m, r in a.modules.items()} == {m: r.diagnostics["c"] for m, r in b.modules.items()}
    return (a.flagged == b.flagged and a.decision == b.decision and same_c
            and all(np.array_equal(f.B, b.clients[c].refined[m].B) and np.array_equal(f.A, b.clients[c].refined[m].A)
                    for c, rep in a.clients.items() for m, f in rep.refined.items()))


@pytest.mark.parametrize("structured", [True, False])
@pytest.mark.parametrize("no_structure", ["mean", "refine"])
def test_lockstep_modules_match_the_threaded_path_bitwise(monkeypatch, structured, no_structure):
    from clair_flower.clair import fit

    updates = _uploads(structured)
    cfg = ClairConfig(workers=2, no_structure=no_structure)
    monkeypatch.setattr(fit, "LOCKSTEP", False)
    threaded = run_clair(updates, cfg)
    monkeypatch.setattr(fit, "LOCKSTEP", True)
    used = []
    real = fit._decompose_lockstep
    monkeypatch.setattr(fit, "_decompose_lockstep", lambda *a: used.append(1) or real(*a))
    lockstep = run_clair(updates, cfg)
    assert used  # the round was small enough for the lockstep
    assert _bitwise(threaded, lockstep)
    for m, r in threaded.modules.items():  # every module's path, point by point
        other = lockstep.modules[m].diagnostics
        assert r.diagnostics["path"] == other["path"] and r.diagnostics["selection"] == other["selection"]
        assert r.diagnostics["iterations_total"] == other["iterations_total"]
        assert np.array_equal(r.U, lockstep.modules[m].U)


def _problems(structured: bool):
    from clair_flower.clair.decomposition import make_pairs
    from clair_flower.clair.fit import build_problem, client_factors
    from clair_flower.clair.inputs import validate_updates

    cids, modules, fac = validate_updates(_uploads(structured))
    pairs = make_pairs(len(cids))
    return [build_problem(client_factors(fac, m, cids), pairs, ClairConfig())[0] for m in modules]


def _same_solve(a, b) -> bool:
    arrays = ("L_left", "L_right", "L_sv", "S", "S_norms")
    return (a.iterations == b.iterations and a.status == b.status and a.objective == b.objective
            and all(np.array_equal(getattr(a, k), getattr(b, k)) for k in arrays)
            and a.state["mu"] == b.state["mu"] and all(np.array_equal(a.state[k], b.state[k]) for k in "Tas"))


@pytest.mark.parametrize("max_iter", [3, 3000])
def test_batched_admm_is_the_single_solver_bitwise(max_iter):
    from clair_flower.clair.decomposition import lam_from_c
    from clair_flower.clair.solvers import solve
    from clair_flower.clair.solvers.batched import Request, solve_many

    problems = _problems(structured=True) + _problems(structured=False)  # two layouts
    lams = [lam_from_c(c, len(problems[0].pairs)) for c in (0.7, 1.5)]
    cold = [Request(lam, 1e-4) for _ in problems for lam in lams]
    ps = [p for p in problems for _ in lams]
    single = [solve(p, r.lam, tol=r.tol, max_iter=max_iter) for p, r in zip(ps, cold)]
    batched = solve_many(ps, cold, "constrained", "fast", max_iter)
    assert all(_same_solve(a, b) for a, b in zip(single, batched))
    warm = [Request(r.lam * 1.2, 1e-8, w) for r, w in zip(cold, single)]  # warm starts, full tolerance
    single = [solve(p, r.lam, tol=r.tol, max_iter=max_iter, warm=r.warm) for p, r in zip(ps, warm)]
    batched = solve_many(ps, warm, "constrained", "fast", max_iter)
    assert all(_same_solve(a, b) for a, b in zip(single, batched))
