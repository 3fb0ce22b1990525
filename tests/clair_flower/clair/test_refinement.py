"""Steps 5 and 6 in factor form against the dense formula."""

import numpy as np
import pytest

from clair_flower.clair.refinement import lowrank_svd, refine_module
from clair_flower.clair.synthetic import make_instance


def _setup(n=8, ranks=None, noise=0.05, seed=3):
    inst = make_instance(n_clients=n, p=20, q=18, noise=noise, frac_contaminated=0.25, seed=seed, client_ranks=ranks)
    ids = sorted(inst.updates)
    f = [inst.updates[k]["m0"] for k in ids]
    B = [x.scaling * x.B for x in f]
    A = [x.A for x in f]
    return inst, f, B, A


def test_lowrank_svd_is_exact():
    rng = np.random.default_rng(0)
    B, A = rng.standard_normal((30, 5)), rng.standard_normal((5, 25))
    s = lowrank_svd(B, A)
    np.testing.assert_allclose(s.left @ np.diag(s.s) @ s.right, B @ A, atol=1e-12)
    np.testing.assert_allclose(s.left.T @ s.left, np.eye(5), atol=1e-12)


@pytest.mark.parametrize("z_rank", [None, 1000])
def test_refinement_matches_dense_formula_and_reports_exact_truncation_error(z_rank):
    inst, f, B, A = _setup(ranks=[6, 8, 7, 6, 9, 6, 8, 7])
    U = inst.U["m0"]
    collab = sorted(set(range(8)) - inst.contaminated)
    ref, err, cons = refine_module(B, A, [x.scaling for x in f], U, collab, z_rank=z_rank)
    P = U @ U.T
    mean = np.mean([B[l] @ A[l] for l in collab], axis=0)
    for k in collab:
        target = P @ (B[k] @ A[k]) + (np.eye(20) - P) @ mean
        u, s, vt = np.linalg.svd(target)
        r = f[k].rank
        best = (u[:, :r] * s[:r]) @ vt[:r]
        got = ref[k].dense()
        assert ref[k].rank == r and ref[k].scaling == f[k].scaling
        true_err = np.linalg.norm(target - got) / np.linalg.norm(target)
        best_err = np.linalg.norm(target - best) / np.linalg.norm(target)
        assert abs(err[k] - true_err) < 1e-8 and err[k] > 1e-4  # noise makes the truncation real
        if z_rank is None:  # Z truncated to r_max + r_hat terms: near-optimal, error still exact
            assert true_err <= 1.01 * best_err
        else:  # nothing of Z dropped: the best rank-r factors of the refined update
            np.testing.assert_allclose(got, best, atol=1e-8 * np.linalg.norm(target))
    u, s, vt = np.linalg.svd(mean)
    np.testing.assert_allclose(cons.dense(), (u[:, :9] * s[:9]) @ vt[:9], atol=1e-8)


def test_contaminated_updates_never_enter_the_mean():
    inst, f, B, A = _setup(noise=0.0)
    bad = min(inst.contaminated)
    collab = sorted(set(range(8)) - inst.contaminated)
    ref1, _, _ = refine_module(B, A, [x.scaling for x in f], inst.U["m0"], collab)
    B2 = list(B)
    B2[bad] = 1e6 * B[bad]
    ref2, _, _ = refine_module(B2, A, [x.scaling for x in f], inst.U["m0"], collab)
    for k in collab:
        np.testing.assert_allclose(ref1[k].dense(), ref2[k].dense(), atol=1e-9)


def test_unknown_policy_rejected():
    inst, f, B, A = _setup(noise=0.0)
    with pytest.raises(ValueError):
        refine_module(B, A, [x.scaling for x in f], inst.U["m0"], [0, 1], policy="ignore")


def _dense_inner(B, A):
    dense = [b @ a for b, a in zip(B, A)]
    return np.array([[np.sum(x * y) for y in dense] for x in dense])


@pytest.mark.parametrize("p, q, n, full_range, mixed", [(20, 18, 8, True, False), (160, 120, 30, False, False),
                                                        (160, 120, 30, False, True)])
def test_ranged_path_reports_exact_errors_and_is_near_optimal(monkeypatch, p, q, n, full_range, mixed):
    """The large-module path (range of the mean by subspace iteration, errors from ``inner``),
    with equal client ranks and with three ranks mixed (benign clients batched per rank)."""
    import clair_flower.clair.refinement as refinement

    monkeypatch.setattr(refinement, "RANGE_MIN_COLUMNS", 0)
    ranks = [(6, 8, 10)[k % 3] for k in range(n)] if mixed else None
    inst = make_instance(n_clients=n, p=p, q=q, noise=0.1, frac_contaminated=0.2, seed=5, client_ranks=ranks)
    ids = sorted(inst.updates)
    f = [inst.updates[k]["m0"] for k in ids]
    B, A = [x.scaling * x.B for x in f], [x.A for x in f]
    U = inst.U["m0"]
    collab = sorted(set(range(n)) - inst.contaminated)
    bad = sorted(inst.contaminated)[0]
    ref, err, cons = refine_module(B, A, [x.scaling for x in f], U, collab, inner=_dense_inner(B, A))
    exact, _, _ = refine_module(B, A, [x.scaling for x in f], U, collab, z_rank=1000)  # all of Z kept
    P = U @ U.T
    mean = np.mean([B[l] @ A[l] for l in collab], axis=0)
    for k in collab:
        target = P @ (B[k] @ A[k]) + (np.eye(p) - P) @ mean
        s = np.linalg.svd(target, compute_uv=False)
        r = f[k].rank
        best_err = np.sqrt(np.sum(s[r:] ** 2) / np.sum(s**2))
        true_err = np.linalg.norm(target - ref[k].dense()) / np.linalg.norm(target)
        assert ref[k].rank == r and ref[k].scaling == f[k].scaling
        assert ref[k].A.shape == (r, q) and ref[k].B.shape == (p, r) and ref[k].shape == (p, q)
        assert ref[k].nbytes == ref[k].A.nbytes + ref[k].B.nbytes
        assert abs(err[k] - true_err) < 1e-8
        if full_range:  # the found range spans all of R^p: same result as the exact path
            np.testing.assert_allclose(ref[k].dense(), exact[k].dense(), atol=1e-8 * np.linalg.norm(target))
        else:
            assert true_err <= 1.05 * best_err
    u, s, vt = np.linalg.svd(mean)
    r = cons.rank
    best = (u[:, :r] * s[:r]) @ vt[:r]
    if full_range:
        np.testing.assert_allclose(cons.dense(), best, atol=1e-8 * s[0])
    else:  # the consensus is as close to the mean as the best rank-r approximation, within 1%
        assert np.linalg.norm(mean - cons.dense()) <= 1.01 * np.linalg.norm(mean - best)
    # a flagged client gets the consensus at its own rank, with the error against the whole mean
    assert abs(err[bad] - np.linalg.norm(mean - ref[bad].dense()) / np.linalg.norm(mean)) < 1e-8
