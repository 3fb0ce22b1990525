"""The merged delta: refit plus delta is each client's exact target, and its norm is the loss
``run_clair`` reports for the refit."""

from __future__ import annotations

import numpy as np
import pytest

from clair_flower.clair import ClairConfig, run_clair
from clair_flower.clair.downlink import compress, merged_deltas
from clair_flower.clair.synthetic import make_instance


def _dense_target(inst_updates, result, k, m, policy="consensus"):
    members = sorted(result.collaborative_set, key=list(result.clients).index)
    mean = sum(inst_updates[l][m].dense() for l in members) / len(members)
    if result.clients[k].flagged:
        return {"consensus": mean, "local": inst_updates[k][m].dense(), "zero": 0 * mean}[policy]
    kind = result.diagnostics["trusted_get"]
    if kind == "own":
        return inst_updates[k][m].dense()
    if kind == "mean":
        return mean
    U = result.modules[m].U.astype(np.float64)
    P = U @ U.T
    return P @ inst_updates[k][m].dense() + mean - P @ mean


@pytest.mark.parametrize("seed, noise, no_structure", [(0, 0.0, "mean"), (1, 0.05, "mean"), (2, 0.3, "own"),
                                                       (3, 0.3, "mean")])
def test_refit_plus_delta_is_the_target_and_delta_norm_is_the_reported_loss(seed, noise, no_structure) -> None:
    inst = make_instance(n_clients=10, p=24, q=20, noise=noise, frac_contaminated=0.2, modules=("a", "b"),
                         client_ranks=[6, 8] * 5, seed=seed)
    updates = inst.updates
    result = run_clair(updates, ClairConfig(no_structure=no_structure))
    deltas, losses = merged_deltas(updates, result)
    for k, client in result.clients.items():
        for m in ("a", "b"):
            target = _dense_target(updates, result, k, m)
            got = client.refined[m].dense().astype(np.float64) + deltas[k][m].dense()
            scale = max(np.linalg.norm(target), 1e-12)
            assert np.linalg.norm(got - target) / scale < 1e-5, (k, m)
            if not client.flagged and result.diagnostics["trusted_get"] == "refined":
                assert losses[k][m] == pytest.approx(client.truncation_error[m], abs=1e-4)
    worst = max(max(v.values()) for v in losses.values())
    assert worst > 1e-3 if noise > 0 else worst < 1e-6  # the refit alone loses something only with noise
    if noise == 0:  # noiseless: the refit is exact and the delta has rank 0
        assert all(d.rank == 0 for per in deltas.values() for d in per.values())


def test_compress_keeps_the_numerical_rank_only() -> None:
    rng = np.random.default_rng(0)
    left = rng.normal(size=(30, 3)) @ rng.normal(size=(3, 8))  # rank 3 written with 8 columns
    right = rng.normal(size=(8, 25))
    B, A, norm = compress(left, right)
    assert B.shape == (30, 3) and A.shape == (3, 25)
    np.testing.assert_allclose(B @ A, left @ right, atol=1e-9)
    assert norm == pytest.approx(np.linalg.norm(left @ right))
