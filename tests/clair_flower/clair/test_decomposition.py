"""Pair sets, the exact reduction and the lambda rule."""

import numpy as np
import pytest

from clair_flower.clair.decomposition import (
    ClientFactors, all_pairs, dense_problem, lam_from_c, lam_grid, make_pairs, reduced_problem, sampled_pairs,
)
from clair_flower.clair.synthetic import make_instance


def _cf(inst, name="m0"):
    ids = sorted(inst.updates)
    return ClientFactors([inst.updates[k][name].scaling * inst.updates[k][name].B for k in ids],
                         [inst.updates[k][name].A for k in ids])


def test_all_pairs_count_and_order():
    p = all_pairs(7)
    assert len(p) == 21 and all(k < l for k, l in p) and len(set(p)) == 21


def test_sampled_pairs_degree_connectivity_and_seed():
    n = 200
    p = sampled_pairs(n, seed=3)
    deg = np.zeros(n, int)
    for k, l in p:
        deg[k] += 1
        deg[l] += 1
    d = 2 * int(np.ceil(np.log2(n)))
    assert deg.min() >= 2 and deg.max() <= d
    assert len(p) <= n * d // 2 and len(p) < len(all_pairs(n)) / 10
    assert p == sampled_pairs(n, seed=3) and p != sampled_pairs(n, seed=4)
    # connected: union-find
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for k, l in p:
        parent[find(k)] = find(l)
    assert len({find(i) for i in range(n)}) == 1
    assert make_pairs(5, "sampled") == all_pairs(5)
    with pytest.raises(ValueError):
        make_pairs(5, "some")


@pytest.mark.parametrize("method", ["svd", "gram", "cholesky"])
def test_reduction_is_an_isometry_of_the_stack(method):
    inst = make_instance(n_clients=7, p=12, q=20, frac_contaminated=0.3, noise=0.05, seed=2,
                         client_ranks=[6, 6, 7, 7, 6, 8, 6])
    cf = _cf(inst)
    pairs = all_pairs(7)
    dp = dense_problem(cf, pairs)
    rp = reduced_problem(cf, pairs, method=method, keep_right=True)
    assert rp.X.shape[0] <= 12 and rp.X.shape[1] < dp.X.shape[1]
    np.testing.assert_allclose(rp.alpha, dp.alpha, rtol=1e-10)
    np.testing.assert_allclose(rp.block_norms, dp.block_norms, rtol=1e-9)
    sd = np.linalg.svd(dp.X, compute_uv=False)[: rp.X.shape[0]]
    np.testing.assert_allclose(np.linalg.svd(rp.X, compute_uv=False), sd, rtol=1e-8, atol=1e-10)
    # lifting the reduced stack gives back the dense differences exactly
    np.testing.assert_allclose(rp.lift_blocks(rp.X), dp.X / dp.alpha, atol=1e-9 * np.abs(dp.X).max() / dp.alpha)


def test_normalisation_and_lambda_rule():
    inst = make_instance(n_clients=6, p=8, q=8, seed=0)
    cf = _cf(inst)
    pairs = all_pairs(6)
    dp = dense_problem(cf, pairs)
    assert np.isclose(np.linalg.norm(dp.X), np.sqrt(len(pairs)))
    assert np.isclose(lam_from_c(3.5, 100), 0.35)
    g = lam_grid(pairs, 6)
    assert g[0] == 1.0 and np.all(np.diff(g) > 0) and g[-1] >= 4.0


def test_all_identical_updates_raise():
    inst = make_instance(n_clients=4, p=8, q=8, seed=0)
    f = inst.updates[0]["m0"]
    cf = ClientFactors([f.scaling * f.B] * 4, [f.A] * 4)
    with pytest.raises(ValueError):
        reduced_problem(cf, all_pairs(4))


def test_scaled_client_factors_are_views_of_one_stack():
    rng = np.random.default_rng(0)
    B = [rng.standard_normal((6, r)) for r in (2, 3, 1)]
    A = [rng.standard_normal((r, 5)) for r in (2, 3, 1)]
    cf = ClientFactors.scaled(B, A, [0.5, 2.0, 4.0], np.float32)
    assert cf.stacked_B.dtype == np.float32 and all(np.shares_memory(b, cf.stacked_B) for b in cf.B)
    np.testing.assert_allclose(cf.B_all(), np.concatenate([0.5 * B[0], 2.0 * B[1], 4.0 * B[2]], axis=1), rtol=1e-6)
    np.testing.assert_allclose(cf.dense(1), 2.0 * B[1] @ A[1], rtol=1e-5)
