"""Fast (reduced, first-order) vs reference (dense, cvxpy/SCS) solver on instances cvxpy can solve."""

import numpy as np
import pytest

from clair_flower.clair import detection
from clair_flower.clair.decomposition import ClientFactors, all_pairs, dense_problem, lam_from_c, reduced_problem
from clair_flower.clair.solvers import solve
from clair_flower.clair.synthetic import make_instance

CASES = [  # (n_clients, p, q, contamination, noise, seed, c)
    (6, 8, 8, 0.2, 0.0, 1, 2.0),
    (7, 10, 8, 0.3, 0.05, 2, 2.0),
    pytest.param((8, 8, 12, 0.25, 0.02, 3, 2.5), marks=pytest.mark.slow),
]


def _cf(inst):
    ids = sorted(inst.updates)
    return ClientFactors([inst.updates[k]["m0"].scaling * inst.updates[k]["m0"].B for k in ids],
                         [inst.updates[k]["m0"].A for k in ids])


def _flags(res, problem, n):
    ev = detection.pair_evidence(res.S_norms, problem.block_norms)
    inf = detection.informative_pairs(problem.block_norms)
    return detection.majority_vote(problem.pairs, n, ev, inf, 0.1).flagged


@pytest.mark.parametrize("form", ["constrained", "penalized"])
@pytest.mark.parametrize("case", CASES)
def test_fast_matches_reference(case, form):
    n, p, q, frac, noise, seed, c = case
    inst = make_instance(n_clients=n, p=p, q=q, shared_rank=2, frac_contaminated=frac, noise=noise, seed=seed)
    cf = _cf(inst)
    pairs = all_pairs(n)
    dp, rp = dense_problem(cf, pairs), reduced_problem(cf, pairs, keep_right=True)
    lam = lam_from_c(c, len(pairs))
    mu = 0.01 * float(np.linalg.norm(dp.X, 2))
    ref = solve(dp, lam, form, "reference", mu=mu)
    fast = solve(rp, lam, form, "fast", mu=mu, tol=1e-9, max_iter=5000)
    assert ref.status == "optimal", ref.status
    assert fast.status == "optimal"
    L = rp.lift_blocks(fast.L) * dp.alpha
    S = rp.lift_blocks(fast.S) * dp.alpha
    assert np.linalg.norm(L - ref.L) <= 1e-3 * np.linalg.norm(ref.L)
    assert np.linalg.norm(S - ref.S) <= 1e-3 * max(np.linalg.norm(ref.S), 1e-3 * np.linalg.norm(dp.X))
    np.testing.assert_allclose(fast.objective, ref.objective, rtol=1e-4)
    np.testing.assert_array_equal(_flags(fast, rp, n), _flags(ref, dp, n))
    assert _flags(fast, rp, n).any()  # the instance has a contaminated client to find


def test_fast_solver_on_dense_problem_matches_reduced():
    """The reduction changes nothing: the same solver on M and on Q^T M R gives the same optimum."""
    inst = make_instance(n_clients=10, p=16, q=16, frac_contaminated=0.3, noise=0.01, seed=4)
    cf = _cf(inst)
    pairs = all_pairs(10)
    dp, rp = dense_problem(cf, pairs), reduced_problem(cf, pairs)
    lam = lam_from_c(3.0, len(pairs))
    a, b = solve(dp, lam, tol=1e-10, max_iter=5000), solve(rp, lam, tol=1e-10, max_iter=5000)
    np.testing.assert_allclose(a.objective, b.objective, rtol=1e-7)
    np.testing.assert_allclose(a.S_norms, b.S_norms, atol=1e-6)
    np.testing.assert_allclose(a.L_sv[:8], b.L_sv[:8], atol=1e-6)


def test_chunked_sweep_and_partial_svt_reach_the_same_optimum(monkeypatch):
    """Large-stack code paths (partial SVT fed by the sweep, many cache-sized chunks) against the
    small-stack ones (exact Gram SVT, one chunk) on one problem: the same optimum."""
    import clair_flower.clair.solvers.fast as fast
    from clair_flower.clair.decomposition import make_pairs

    inst = make_instance(n_clients=60, p=200, q=96, frac_contaminated=0.2, noise=0.02, seed=6)
    cf = _cf(inst)
    rp = reduced_problem(cf, make_pairs(60, "sampled", 4, 0))
    assert rp.X.shape[0] > fast.DENSE_SVD_MAX  # the partial SVT is the one in use
    lam = lam_from_c(3.0, len(rp.pairs))
    monkeypatch.setattr(fast, "CHUNK_BYTES", 20 * rp.X.shape[0] * rp.X.itemsize)  # ~2 blocks a chunk
    assert len(fast._column_chunks(rp.widths, rp.X.shape[0], rp.X.itemsize)) > 10
    large = solve(rp, lam, tol=1e-10, max_iter=5000)
    monkeypatch.setattr(fast, "CHUNK_BYTES", 1 << 40)
    monkeypatch.setattr(fast, "DENSE_SVD_MAX", 10_000)
    small = solve(rp, lam, tol=1e-10, max_iter=5000)
    assert large.status == small.status == "optimal"
    np.testing.assert_allclose(large.objective, small.objective, rtol=1e-8)
    np.testing.assert_allclose(large.S_norms, small.S_norms, atol=1e-6 * small.S_norms.max())
    assert np.linalg.norm(large.L - small.L) <= 1e-6 * np.linalg.norm(small.L)


def test_column_chunks_hold_whole_blocks(monkeypatch):
    import clair_flower.clair.solvers.fast as fast

    monkeypatch.setattr(fast, "CHUNK_BYTES", 80)
    widths = np.array([3, 5, 40, 2, 2, 7])
    chunks = fast._column_chunks(widths, rows=1, itemsize=8)  # about 10 columns a chunk
    assert [(c0, c1, b0, b1) for c0, c1, b0, b1, _ in chunks] == [(0, 8, 0, 2), (8, 48, 2, 3), (48, 52, 3, 5),
                                                               (52, 59, 5, 6)]
    np.testing.assert_array_equal(chunks[2][4], [0, 2])  # block starts within the chunk


def test_warm_start_from_the_iterate_reaches_the_cold_optimum():
    """A warm start hands over ``T`` and its per-block dual and ``S`` coefficients; from another
    ``lam``'s result it must reach the same optimum as a cold start (and the state is copied,
    not shared: the earlier result stays intact)."""
    inst = make_instance(n_clients=12, p=40, q=30, frac_contaminated=0.25, noise=0.02, seed=2)
    rp = reduced_problem(_cf(inst), all_pairs(12))
    first = solve(rp, lam_from_c(4.0, len(rp.pairs)), tol=1e-10, max_iter=5000)
    T0 = first.state["T"].copy()
    lam = lam_from_c(3.0, len(rp.pairs))
    warm = solve(rp, lam, tol=1e-10, max_iter=5000, warm=first)
    cold = solve(rp, lam, tol=1e-10, max_iter=5000)
    np.testing.assert_array_equal(first.state["T"], T0)
    np.testing.assert_allclose(warm.objective, cold.objective, rtol=1e-8)
    np.testing.assert_allclose(warm.S_norms, cold.S_norms, atol=1e-6 * cold.S_norms.max())
    assert np.linalg.norm(warm.L - cold.L) <= 1e-6 * np.linalg.norm(cold.L)


def test_blas_threads_runs_torch_on_one_thread_and_restores_it():
    import torch

    from clair_flower.clair.threads import blas_threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with blas_threads(2):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
