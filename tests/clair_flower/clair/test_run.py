"""Property tests of the public API on the synthetic model (docs/DESIGN.md section 3 claims)."""

import numpy as np
import pytest

from clair_flower.clair import ClairConfig, ClairInputError, run_clair
from clair_flower.lora import LoraFactors
from clair_flower.clair.synthetic import make_instance


def sin_theta(U_true: np.ndarray, U_hat: np.ndarray) -> float:
    """``||sin Theta||_2``: how far span(U_true) sticks out of span(U_hat)."""
    return float(np.linalg.norm(U_true - U_hat @ (U_hat.T @ U_true), 2))


@pytest.mark.parametrize("frac", [0.1, 0.3, 0.4])
def test_noiseless_exact_recovery(frac):
    inst = make_instance(n_clients=20, p=32, q=32, frac_contaminated=frac, seed=11)
    res = run_clair(inst.updates, ClairConfig())
    assert res.flagged == inst.contaminated and len(inst.contaminated) == round(20 * frac)
    assert res.collaborative_set == frozenset(range(20)) - inst.contaminated
    mod = res.modules["m0"]
    assert mod.rank == 3
    assert sin_theta(inst.U["m0"], mod.U) < 1e-6
    assert mod.diagnostics["status"] == "optimal" and mod.diagnostics["selection"] == "admissible"
    for k in inst.contaminated:
        assert res.clients[k].flagged and res.clients[k].vote > 0.5
        assert res.clients[k].score > max(res.clients[j].score for j in res.collaborative_set)


def test_subspace_error_grows_linearly_with_noise():
    levels = np.array([1e-3, 3e-3, 1e-2])
    errs = []
    for s in levels:
        inst = make_instance(n_clients=20, p=32, q=32, frac_contaminated=0.2, noise=s, seed=5)
        res = run_clair(inst.updates, ClairConfig(rank=3))
        assert res.flagged == inst.contaminated  # exact set at high SNR
        errs.append(sin_theta(inst.U["m0"], res.modules["m0"].U))
    slope = np.polyfit(np.log(levels), np.log(errs), 1)[0]
    assert 0.8 < slope < 1.2, (slope, errs)
    assert errs[-1] < 0.05


def test_refined_updates_beat_local_updates_under_noise():
    inst = make_instance(n_clients=20, p=32, q=32, frac_contaminated=0.2, noise=0.01, seed=5)
    res = run_clair(inst.updates, ClairConfig())
    for k in res.collaborative_set:
        clean = inst.clean[k]["m0"]
        local = np.linalg.norm(inst.updates[k]["m0"].dense() - clean)
        refined = np.linalg.norm(res.clients[k].refined["m0"].dense() - clean)
        assert refined < local, k
        assert res.clients[k].refined["m0"].rank == inst.updates[k]["m0"].rank
        assert 0.0 <= res.clients[k].truncation_error["m0"] < 0.05


def test_detection_invariant_to_factor_reparametrisation():
    inst = make_instance(n_clients=20, p=32, q=32, frac_contaminated=0.3, noise=0.005, seed=7)
    base = run_clair(inst.updates, ClairConfig())
    rng = np.random.default_rng(0)
    moved = {}
    for k, mods in inst.updates.items():
        f = mods["m0"]
        R = rng.standard_normal((f.rank, f.rank)) + 3 * np.eye(f.rank)
        moved[k] = {"m0": LoraFactors(B=f.B @ R, A=np.linalg.solve(R, f.A), scaling=f.scaling)}
    other = run_clair(moved, ClairConfig())
    assert other.flagged == base.flagged == inst.contaminated
    for k in inst.updates:
        assert other.clients[k].flagged == base.clients[k].flagged
        assert abs(other.clients[k].vote - base.clients[k].vote) < 1e-9
    assert sin_theta(base.modules["m0"].U, other.modules["m0"].U) < 1e-6


def test_colluders_with_identical_update_flagged():
    inst = make_instance(n_clients=20, p=32, q=32, frac_contaminated=0.3, attack="colluders", seed=3)
    bad = sorted(inst.contaminated)
    assert np.array_equal(inst.updates[bad[0]]["m0"].B, inst.updates[bad[1]]["m0"].B)
    res = run_clair(inst.updates, ClairConfig())
    assert res.flagged == inst.contaminated
    assert sin_theta(inst.U["m0"], res.modules["m0"].U) < 1e-6


def test_heterogeneous_ranks_and_two_modules():
    ranks = [4 + (k % 4) for k in range(20)]
    inst = make_instance(n_clients=20, p=32, q=24, frac_contaminated=0.2, seed=8, client_ranks=ranks,
                         modules=("q_proj", "v_proj"))
    res = run_clair(inst.updates, ClairConfig())
    assert res.flagged == inst.contaminated
    for m in ("q_proj", "v_proj"):
        assert sin_theta(inst.U[m], res.modules[m].U) < 1e-6
        assert res.consensus[m].rank == max(ranks)
        for k in range(20):
            assert res.clients[k].refined[m].rank == ranks[k]
            assert res.clients[k].refined[m].scaling == inst.updates[k][m].scaling


def test_dense_inputs_give_the_same_answer():
    inst = make_instance(n_clients=12, p=24, q=20, frac_contaminated=0.25, seed=9)
    dense = {k: {"m0": f["m0"].dense()} for k, f in inst.updates.items()}
    a, b = run_clair(inst.updates, ClairConfig()), run_clair(dense, ClairConfig())
    assert a.flagged == b.flagged == inst.contaminated
    assert sin_theta(a.modules["m0"].U, b.modules["m0"].U) < 1e-6
    k = min(a.collaborative_set)
    np.testing.assert_allclose(b.clients[k].refined["m0"].dense(), a.clients[k].refined["m0"].dense(), atol=1e-8)


def test_sampled_pairs_at_larger_n():
    inst = make_instance(n_clients=60, p=32, q=32, frac_contaminated=0.2, seed=12)
    res = run_clair(inst.updates, ClairConfig(pairs="sampled"))
    assert res.diagnostics["n_pairs"] < 60 * 59 // 2 // 3
    assert res.flagged == inst.contaminated
    assert sin_theta(inst.U["m0"], res.modules["m0"].U) < 1e-6


def test_reference_solver_end_to_end_agrees_with_fast():
    inst = make_instance(n_clients=6, p=8, q=8, shared_rank=2, frac_contaminated=0.2, seed=1)
    cfg = dict(c=2.0)
    a = run_clair(inst.updates, ClairConfig(solver="fast", **cfg))
    b = run_clair(inst.updates, ClairConfig(solver="reference", **cfg))
    assert a.flagged == b.flagged == inst.contaminated
    assert b.modules["m0"].diagnostics["status"] == "optimal"
    assert sin_theta(a.modules["m0"].U, b.modules["m0"].U) < 1e-3
    for k in inst.updates:
        assert abs(a.clients[k].vote - b.clients[k].vote) < 1e-12


@pytest.mark.parametrize("attack", ["scale", "sign_flip"])
def test_in_subspace_stage_catches_in_subspace_attacks_only_when_enabled(attack):
    inst = make_instance(n_clients=20, p=32, q=32, frac_contaminated=0.1, attack=attack, attack_strength=4.0,
                         shared_mean=2.0, seed=13)
    plain = run_clair(inst.updates, ClairConfig())
    # At this strength the in-subspace attackers' differences are large enough that the path's
    # low end puts their blocks in S, so the plain vote may catch them too; it never flags a
    # benign client. The stage catches them by their coefficients alone (plain flags removed).
    assert plain.flagged <= inst.contaminated
    staged = run_clair(inst.updates, ClairConfig(in_subspace_stage=True))
    assert staged.flagged == inst.contaminated
    assert all(staged.clients[k].reason in ("in-subspace stage", "off-subspace majority vote")
               for k in inst.contaminated)
    z = {k: staged.clients[k].in_subspace_z for k in staged.clients if staged.clients[k].in_subspace_z is not None}
    benign = [z[k] for k in z if k not in inst.contaminated]
    assert max(benign) < 3.5


@pytest.mark.parametrize("policy", ["consensus", "local", "zero"])
def test_flagged_policy(policy):
    inst = make_instance(n_clients=10, p=16, q=16, frac_contaminated=0.2, seed=4)
    res = run_clair(inst.updates, ClairConfig(flagged_policy=policy))
    k = min(inst.contaminated)
    got = res.clients[k].refined["m0"].dense()
    if policy == "zero":
        assert not np.any(got)
    elif policy == "local":
        np.testing.assert_allclose(got, inst.updates[k]["m0"].dense(), atol=1e-8)
    else:
        mean = np.mean([inst.updates[j]["m0"].dense() for j in res.collaborative_set], axis=0)
        np.testing.assert_allclose(got, mean, atol=1e-8)  # rank of the mean fits the client rank


def _good(n=5, p=6, q=5):
    return make_instance(n_clients=n, p=p, q=q, frac_contaminated=0.0, seed=1).updates


def test_bad_input_nan():
    u = _good()
    f = u[2]["m0"]
    A = f.A.copy()
    A[0, 0] = np.nan
    u[2]["m0"] = LoraFactors(B=f.B, A=A, scaling=f.scaling)
    with pytest.raises(ClairInputError, match=r"client 2.*module 'm0'.*NaN"):
        run_clair(u)


def test_bad_input_inf_dense():
    u = _good()
    d = u[1]["m0"].dense()
    d[1, 1] = np.inf
    u[1]["m0"] = d
    with pytest.raises(ClairInputError, match=r"client 1.*module 'm0'"):
        run_clair(u)


def test_bad_input_shape_mismatch():
    u = _good()
    u[3]["m0"] = np.ones((6, 4))
    with pytest.raises(ClairInputError, match=r"client 3.*module 'm0'.*shape"):
        run_clair(u)


def test_bad_input_too_few_clients():
    u = _good()
    with pytest.raises(ClairInputError, match="at least 3 clients"):
        run_clair({k: u[k] for k in (0, 1)})


def test_bad_input_missing_module():
    u = make_instance(n_clients=5, p=6, q=5, seed=1, modules=("a", "b")).updates
    del u[4]["b"]
    with pytest.raises(ClairInputError, match=r"client 4.*module 'b'.*missing"):
        run_clair(u)


def test_all_zero_update_is_excluded_with_reason():
    inst = make_instance(n_clients=12, p=16, q=16, frac_contaminated=0.0, seed=2)
    u = dict(inst.updates)
    f = u[5]["m0"]
    u[5] = {"m0": LoraFactors(B=np.zeros_like(f.B), A=f.A, scaling=f.scaling)}
    res = run_clair(u)
    assert res.flagged == frozenset({5}) and res.clients[5].reason == "all-zero update"
    assert res.diagnostics["excluded_zero"] == ["5"]
    assert sin_theta(inst.U["m0"], res.modules["m0"].U) < 1e-6


def test_all_zero_leaving_too_few_clients_raises():
    u = _good(n=3)
    f = u[0]["m0"]
    u[0] = {"m0": LoraFactors(B=np.zeros_like(f.B), A=f.A, scaling=f.scaling)}
    with pytest.raises(ClairInputError, match="non-zero"):
        run_clair(u)


def test_string_client_ids_and_diagnostics_are_plain():
    inst = make_instance(n_clients=8, p=16, q=16, frac_contaminated=0.25, seed=6)
    u = {f"node-{k}": v for k, v in inst.updates.items()}
    res = run_clair(u)
    assert res.flagged == frozenset(f"node-{k}" for k in inst.contaminated)
    import json
    json.dumps(res.diagnostics)
    json.dumps(res.modules["m0"].diagnostics)


def test_inconclusive_vote_keeps_a_persistent_score_outlier():
    """One round's dip below the z threshold does not unflag a client that was far above it."""
    from clair_flower.clair.run import _persistent_outliers

    cfg = ClairConfig(z_threshold=3.5, z_memory=3)
    z = np.array([0.2, 3.0, -0.5, 0.9])
    prior = {"a": [0.1, 1.0], "b": [5.2, 6.0], "d": [2.0, 2.5]}
    flags = _persistent_outliers(["a", "b", "c", "d"], z, prior, cfg)
    assert flags.tolist() == [False, True, False, False]  # b: mean(5.2, 6.0, 3.0) > 3.5
    assert not _persistent_outliers(["b"], z[1:2], prior, ClairConfig(z_memory=1)).any()  # no memory
    with pytest.raises(ValueError, match="z_memory"):
        ClairConfig(z_memory=0).validate()


@pytest.mark.parametrize("workers", [1, 2])
def test_first_module_path_shared_by_the_others(workers):
    """The first module's path picks ``c``; every module is then solved at it to full accuracy,
    and the reports say which module chose it. Results do not depend on the thread count."""
    inst = make_instance(n_clients=12, p=24, q=20, frac_contaminated=0.25, noise=0.01, seed=3,
                         modules=("a", "b", "c"))
    res = run_clair(inst.updates, ClairConfig(workers=workers))
    first, *rest = (res.modules[m].diagnostics for m in ("a", "b", "c"))
    assert first["selection"] == "admissible" and len(first["path"]) > 1
    assert first["status"] == "optimal" and first["iterations_total"] > first["iterations"] > 0
    assert all(d["selection"] == "shared" and d["c"] == first["c"] and d["status"] == "optimal" for d in rest)
    assert res.flagged == inst.contaminated
    ref = run_clair(inst.updates, ClairConfig(workers=1))
    for m in ("a", "b", "c"):
        np.testing.assert_allclose(res.modules[m].U @ res.modules[m].U.T, ref.modules[m].U @ ref.modules[m].U.T,
                                   atol=1e-9)


def test_structured_round_is_decided_by_the_vote():
    inst = make_instance(n_clients=12, p=32, q=24, frac_contaminated=0.25, noise=0.01, seed=8)
    res = run_clair(inst.updates)
    assert res.decision == "vote" and res.diagnostics["structure"]
    assert res.flagged == inst.contaminated
    assert all(res.clients[k].reason == "off-subspace majority vote" for k in inst.contaminated)


def _unstructured(n: int = 10, seed: int = 0) -> dict:
    """Full-rank, independent updates: no shared subspace, nobody contaminated in particular."""
    rng = np.random.default_rng(seed)
    return {k: {"m0": LoraFactors(B=rng.standard_normal((24, 4)), A=rng.standard_normal((4, 20)), scaling=2.0)}
            for k in range(n)}


@pytest.mark.parametrize("policy", ["mean", "own"])
def test_no_structure_never_projects_on_a_meaningless_subspace(policy):
    updates = _unstructured()
    res = run_clair(updates, ClairConfig(no_structure=policy))
    assert res.decision in ("fallback", "none") and not res.diagnostics["structure"]
    assert res.modules["m0"].U.shape == (24, 0) and res.diagnostics["trusted_get"] == policy
    trusted = sorted(res.collaborative_set)
    mean = np.mean([updates[k]["m0"].dense() for k in trusted], axis=0)
    for k in trusted:
        got = res.clients[k].refined["m0"].dense()
        if policy == "own":
            np.testing.assert_allclose(got, updates[k]["m0"].dense())
            assert res.clients[k].truncation_error["m0"] == 0.0
        else:  # the trusted mean, re-factored to the client's rank (error reported)
            err = np.linalg.norm(got - mean) / np.linalg.norm(mean)
            assert err == pytest.approx(res.clients[k].truncation_error["m0"], abs=1e-6)


def test_refine_policy_keeps_the_old_behaviour_on_unstructured_rounds():
    res = run_clair(_unstructured(), ClairConfig(no_structure="refine"))
    assert res.modules["m0"].U.shape[1] >= 1 and res.diagnostics["trusted_get"] == "refined"


def test_unknown_no_structure_policy_is_named():
    with pytest.raises(ValueError, match="no_structure"):
        ClairConfig(no_structure="median").validate()
