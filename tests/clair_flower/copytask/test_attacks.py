"""Each attack changes what a contaminated client sends in exactly the way it claims."""

from __future__ import annotations

import numpy as np
import pytest

from clair_flower.copytask import attacks as atk
from clair_flower.copytask.attacks import (
    ATTACKS,
    AttackConfig,
    UnknownAttackError,
    alie_z,
    backdoor_target,
    backdoor_test_set,
    backdoor_trigger,
    contaminated_partitions,
    data_poison,
    dense_update,
    is_active,
    poison_update,
)

ALPHA = 16.0
MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj")
V = 37  # content tokens; arrays hold content indices 0 .. V-1 (clair_flower.copytask.task)


def adapter(seed: int, rank: int = 4, p: int = 24, q: int = 20, shared_a: np.ndarray | None = None):
    """A random PEFT-style LoRA state dict (float32), optionally with a fixed A for every module."""
    rng = np.random.default_rng(seed)
    sd = {}
    for m in MODULES:
        a = shared_a if shared_a is not None else rng.standard_normal((rank, q))
        sd[m + ".lora_A.weight"] = np.asarray(a, dtype=np.float32)
        sd[m + ".lora_B.weight"] = rng.standard_normal((p, rank)).astype(np.float32)
    return sd


def send(name, honest, received=None, rnd=3, **kw):
    strength = kw.pop("strength", None)
    cfg = AttackConfig(name=name, fraction=0.2, strength=strength, seed=kw.pop("seed", 7))
    return poison_update(cfg, honest, received if received is not None else adapter(99), rnd, **kw)


def assert_contract(out, honest):
    assert set(out) == set(honest)
    for k in honest:
        assert out[k].shape == honest[k].shape and out[k].dtype == honest[k].dtype


# ------------------------------------------------------------------ config and partitions


def test_unknown_name_lists_valid_names():
    with pytest.raises(UnknownAttackError) as exc:
        AttackConfig(name="label-flip")
    for name in ATTACKS:
        assert name in str(exc.value)
    assert isinstance(exc.value, ValueError)


@pytest.mark.parametrize("fraction", [0.5, 0.7, -0.1])
def test_fraction_outside_minority_rejected(fraction):
    with pytest.raises(ValueError, match="fraction"):
        AttackConfig(name="sign-flip", fraction=fraction)


def test_start_round_and_name_normalisation():
    with pytest.raises(ValueError, match="start_round"):
        AttackConfig(name="ipm", start_round=0)
    assert AttackConfig(name="Sign_Flip").name == "sign-flip"
    cfg = AttackConfig(name="scaling", start_round=3)
    assert [is_active(cfg, r) for r in (1, 2, 3, 4)] == [False, False, True, True]
    assert not is_active(AttackConfig(), 10)


def test_contaminated_partitions_deterministic_count_and_seeded():
    cfg = AttackConfig(name="alie", fraction=0.3, seed=1)
    first = contaminated_partitions(20, cfg)
    assert first == contaminated_partitions(20, cfg)
    assert len(first) == 6 and all(0 <= i < 20 for i in first)
    others = {contaminated_partitions(20, AttackConfig(name="alie", fraction=0.3, seed=s)) for s in range(2, 8)}
    assert any(o != first for o in others)
    assert len(contaminated_partitions(10, AttackConfig(name="ipm", fraction=0.25))) == 3  # half up
    assert len(contaminated_partitions(2, AttackConfig(name="ipm", fraction=0.3))) == 0  # minority cap
    assert contaminated_partitions(20, AttackConfig(name="none", fraction=0.3)) == frozenset()
    # nested: more contamination keeps the earlier attackers
    assert contaminated_partitions(20, AttackConfig(name="alie", fraction=0.1, seed=1)) <= first


def test_run_seed_changes_who_attacks_and_only_that():
    """Partitions come from the run ``seed`` and ``attack-seed`` together; run seed 0 draws as before."""
    base = AttackConfig(name="random", fraction=0.3, seed=0)
    assert contaminated_partitions(10, base) == {2, 4, 6}  # the README demo's partitions (seed 0)
    drawn = {contaminated_partitions(10, AttackConfig(name="random", fraction=0.3, seed=0, run_seed=s))
             for s in range(1, 6)}
    assert any(d != contaminated_partitions(10, base) for d in drawn)
    assert all(len(d) == 3 for d in drawn)
    cfg = AttackConfig(name="random", fraction=0.3, seed=0, run_seed=1)
    assert contaminated_partitions(10, cfg) == contaminated_partitions(10, cfg)  # deterministic
    assert (contaminated_partitions(10, AttackConfig(name="random", fraction=0.3, seed=5, run_seed=1))
            != contaminated_partitions(10, cfg))  # the attack seed still counts
    with pytest.raises(ValueError, match="run_seed"):
        AttackConfig(name="random", run_seed=-1)


# ------------------------------------------------------------------ model attacks


def test_inactive_round_and_data_attack_send_honest():
    honest = adapter(1)
    cfg = AttackConfig(name="sign-flip", start_round=5)
    out = poison_update(cfg, honest, adapter(2), 4)
    assert all(np.array_equal(out[k], honest[k]) and out[k] is not honest[k] for k in honest)
    out = poison_update(AttackConfig(name="reversed"), honest, adapter(2), 4)
    assert all(np.array_equal(out[k], honest[k]) for k in honest)


def test_sign_flip_negates_dw_exactly():
    honest = adapter(1)
    out = send("sign-flip", honest)
    assert_contract(out, honest)
    d0, d1 = dense_update(honest, ALPHA), dense_update(out, ALPHA)
    for m in MODULES:
        np.testing.assert_array_equal(d1[m], -d0[m])


@pytest.mark.parametrize("k", [None, 3.0])
def test_scaling_multiplies_dw_by_k(k):
    honest = adapter(1)
    out = send("scaling", honest, strength=k)
    assert_contract(out, honest)
    expected_k = atk.DEFAULT_STRENGTH["scaling"] if k is None else k
    d0, d1 = dense_update(honest, ALPHA), dense_update(out, ALPHA)
    for m in MODULES:
        # exact up to float32 rounding of k * B
        np.testing.assert_allclose(d1[m], expected_k * d0[m], rtol=1e-6, atol=1e-6 * np.abs(d1[m]).max())
        assert np.linalg.norm(d1[m]) / np.linalg.norm(d0[m]) == pytest.approx(abs(expected_k), rel=1e-6)


def test_gaussian_changes_norm_by_expected_amount():
    honest = adapter(1, rank=8, p=64, q=64)
    sigma = 2.0
    out = send("gaussian", honest, strength=sigma)
    assert_contract(out, honest)
    for key in honest:
        x, y = honest[key].astype(np.float64), out[key].astype(np.float64)
        # ||x + n||^2 = (1 + sigma^2) ||x||^2 in expectation; 512 coordinates -> a few % spread
        assert np.linalg.norm(y) / np.linalg.norm(x) == pytest.approx(np.sqrt(1 + sigma**2), rel=0.1)
        noise = y - x
        assert np.std(noise) == pytest.approx(sigma * np.sqrt(np.mean(x * x)), rel=0.1)
    again = send("gaussian", honest, strength=sigma)
    other = send("gaussian", adapter(2, rank=8, p=64, q=64), strength=sigma)
    assert all(np.array_equal(out[k], again[k]) for k in honest)  # reproducible
    k0 = MODULES[0] + ".lora_B.weight"
    noise_other = other[k0] - adapter(2, rank=8, p=64, q=64)[k0]
    assert not np.allclose(out[k0] - honest[k0], noise_other)  # attackers draw different noise


def benign_refs(n=8, shared_a=None):
    return [adapter(100 + i, shared_a=shared_a) for i in range(n)]


def test_alie_is_mean_minus_z_std_within_benign_range():
    refs = benign_refs(10)
    z = alie_z(20, 4)
    out = send("alie", adapter(1), benign_reference=refs, num_clients=20, num_malicious=4)
    assert_contract(out, refs[0])
    assert 0 < z < 1
    for key in refs[0]:
        stack = np.stack([r[key].astype(np.float64) for r in refs])
        np.testing.assert_allclose(out[key], stack.mean(0) - z * stack.std(0), rtol=1e-5, atol=1e-6)
        assert np.all(out[key] >= stack.min(0)) and np.all(out[key] <= stack.max(0))
    # explicit strength overrides the formula; larger z is further below the mean
    out2 = send("alie", adapter(1), benign_reference=refs, strength=1.5)
    key = MODULES[0] + ".lora_B.weight"
    stack = np.stack([r[key] for r in refs])
    np.testing.assert_allclose(out2[key], stack.mean(0) - 1.5 * stack.std(0), rtol=1e-5, atol=1e-6)


def test_alie_z_matches_paper_example():
    # Baruch et al. 2019: n = 50, m = 12 -> s = 14, z = Phi^-1(36/50) ~ 0.583
    assert alie_z(50, 12) == pytest.approx(0.5828, abs=1e-3)


def test_ipm_is_minus_eps_mean():
    shared_a = np.random.default_rng(5).standard_normal((4, 20))
    refs = benign_refs(6, shared_a=shared_a)
    eps = 0.7
    out = send("ipm", adapter(1, shared_a=shared_a), benign_reference=refs, strength=eps)
    assert_contract(out, refs[0])
    for m in MODULES:
        b = np.mean([r[m + ".lora_B.weight"].astype(np.float64) for r in refs], axis=0)
        np.testing.assert_allclose(out[m + ".lora_B.weight"], -eps * b, rtol=1e-6)
        np.testing.assert_allclose(out[m + ".lora_A.weight"], shared_a, rtol=1e-6)
    # with a shared A the uploaded dW is exactly -eps times the mean benign dW
    dws = [dense_update(r, ALPHA) for r in refs]
    sent = dense_update(out, ALPHA)
    for m in MODULES:
        np.testing.assert_allclose(sent[m], -eps * np.mean([d[m] for d in dws], axis=0), rtol=1e-5, atol=1e-5)


def test_reference_attacks_without_reference_fall_back_to_honest():
    honest = adapter(1)
    out = send("ipm", honest, strength=2.0)
    assert_contract(out, honest)
    key = MODULES[0] + ".lora_B.weight"
    # the bootstrap keeps the sign of every coordinate of -eps * honest (positive weights)
    assert np.all(np.sign(out[key]) == -np.sign(honest[key]))
    alie = send("alie", honest)
    assert_contract(alie, honest)
    assert not np.array_equal(alie[key], honest[key])


def test_colluders_send_bit_identical_adapters():
    h1, h2 = adapter(1), adapter(2)  # two contaminated partitions, different honest updates
    assert not np.array_equal(h1[MODULES[0] + ".lora_B.weight"], h2[MODULES[0] + ".lora_B.weight"])
    assert atk.colluder_norm(h1) == atk.colluder_norm(h2)
    u1, u2 = send("colluders", h1, adapter(3)), send("colluders", h2, adapter(4))
    assert_contract(u1, h1)
    for k in h1:
        assert u1[k].tobytes() == u2[k].tobytes()
    # the agreed norm is honoured, and the direction changes with the round
    total = np.sqrt(sum(np.linalg.norm(d) ** 2 for d in dense_update(u1, ALPHA).values()))
    scaling = ALPHA / 4
    assert total == pytest.approx(scaling * atk.colluder_norm(h1), rel=1e-5)
    u3 = send("colluders", h1, rnd=4)
    assert not np.array_equal(u1[MODULES[0] + ".lora_B.weight"], u3[MODULES[0] + ".lora_B.weight"])
    # an externally shared norm makes any honest updates collude exactly
    h3 = {k: 50 * v for k, v in h1.items()}
    v1, v3 = send("colluders", h1, shared_norm=3.0), send("colluders", h3, shared_norm=3.0)
    assert all(v1[k].tobytes() == v3[k].tobytes() for k in h1)


def test_free_rider_zero_and_stale():
    honest, received = adapter(1), adapter(2)
    zero = send("free-rider", honest, received)
    assert_contract(zero, honest)
    assert all(np.count_nonzero(d) == 0 for d in dense_update(zero, ALPHA).values())
    stale = send("free-rider", honest, received, strength=1.0)
    assert all(np.array_equal(stale[k], received[k]) for k in honest)
    with pytest.raises(ValueError, match="free-rider"):
        AttackConfig(name="free-rider", strength=0.5)


# ------------------------------------------------------------------ data attacks


def tokens(n=200, length=12, seed=0):
    x = np.random.default_rng(seed).integers(0, V, size=(n, length))
    return x, x.copy()


def test_model_attacks_have_no_data_poison():
    for name in ("none",) + atk.MODEL_ATTACKS:
        assert data_poison(AttackConfig(name=name), V) is None


def test_reversed_targets_and_pure():
    x, y = tokens()
    x0, y0 = x.copy(), y.copy()
    xp, yp = data_poison(AttackConfig(name="reversed"), V)(x, y, np.random.default_rng(0))
    np.testing.assert_array_equal(xp, x0)
    np.testing.assert_array_equal(yp, x0[:, ::-1])
    np.testing.assert_array_equal(x, x0)  # inputs untouched: the poison only sees what it is given
    np.testing.assert_array_equal(y, y0)


def test_permutation_is_one_shared_derangement():
    x, y = tokens()
    cfg = AttackConfig(name="permutation", seed=3)
    perm = atk.vocab_permutation(3, V)
    _, yp = data_poison(cfg, V)(x, y, np.random.default_rng(0))
    np.testing.assert_array_equal(yp, perm[x])
    assert sorted(perm) == list(range(V))  # a permutation of the content tokens
    assert np.all(perm != np.arange(V))  # every target is wrong
    # another attacker, other data and rng, same mapping
    x2, y2 = tokens(seed=9)
    _, yp2 = data_poison(cfg, V)(x2, y2, np.random.default_rng(5))
    np.testing.assert_array_equal(yp2, perm[x2])
    assert not np.array_equal(atk.vocab_permutation(4, V), perm)


def test_random_targets_uniform_over_content():
    x, y = tokens(n=2000)
    _, yp = data_poison(AttackConfig(name="random"), V)(x, y, np.random.default_rng(1))
    assert yp.min() >= 0 and yp.max() < V
    assert np.mean(yp == x) < 0.05  # ~1/37 by chance
    assert yp.min() == 0 and yp.max() == V - 1  # the whole content range, index 0 included
    counts = np.bincount(yp.ravel(), minlength=V)
    assert counts.min() > 0.7 * counts.mean()


@pytest.mark.parametrize("frac", [None, 0.2])
def test_backdoor_inserts_trigger_and_target_in_fraction(frac):
    x, y = tokens(n=200)
    x[:, 0] = np.where(x[:, 0] == V - 1, 0, x[:, 0])  # clean data without the trigger
    y = x.copy()
    cfg = AttackConfig(name="backdoor", strength=frac, seed=2)
    xp, yp = data_poison(cfg, V)(x, y, np.random.default_rng(0))
    trigger, target = backdoor_trigger(V), backdoor_target(12, 2, V)
    hit = xp[:, 0] == trigger
    assert hit.sum() == round((0.5 if frac is None else frac) * 200)
    np.testing.assert_array_equal(yp[hit], np.tile(target, (hit.sum(), 1)))
    np.testing.assert_array_equal(xp[hit, 1:], x[hit, 1:])
    np.testing.assert_array_equal(xp[~hit], x[~hit])  # the others stay clean
    np.testing.assert_array_equal(yp[~hit], y[~hit])
    # the triggered test set: every row triggered, target for every row
    xt, yt = backdoor_test_set(x[:5], cfg, V)
    assert np.all(xt[:, 0] == trigger) and np.array_equal(xt[:, 1:], x[:5, 1:])
    np.testing.assert_array_equal(yt, np.tile(target, (5, 1)))
    np.testing.assert_array_equal(backdoor_target(5, 2, V), target[:5])  # prefix-stable


def test_poison_rejects_out_of_vocab_tokens():
    poison = data_poison(AttackConfig(name="permutation"), V)
    with pytest.raises(ValueError, match="token ids"):
        poison(np.full((2, 3), V), np.full((2, 3), V), np.random.default_rng(0))


def test_token_id_offset_and_index_mixup():
    """``first_token`` shifts the content range; the map of content indices is the same, and
    content indices given where token ids are expected are rejected, not half-poisoned."""
    first = 3
    x, y = tokens()
    cfg = AttackConfig(name="permutation", seed=3)
    _, y_idx = data_poison(cfg, V)(x, y, np.random.default_rng(0))
    _, y_ids = data_poison(cfg, V, first)(x + first, y + first, np.random.default_rng(0))
    np.testing.assert_array_equal(y_ids - first, y_idx)
    perm = atk.vocab_permutation(3, V, first)
    np.testing.assert_array_equal(perm[:first], np.arange(first))  # specials untouched
    assert backdoor_trigger(V, first) == backdoor_trigger(V) + first == first + V - 1
    with pytest.raises(ValueError, match="token ids"):
        data_poison(cfg, V, first)(x, y, np.random.default_rng(0))  # indices 0..2 present


def test_changing_the_run_seed_changes_who_attacks_in_the_client_app():
    """Through the ClientApp's own decision: same ``attack-seed``, another ``seed``."""
    from flwr.app import Context, RecordDict

    from clair_flower.client_apps.copy_client import is_contaminated
    from clair_flower.server_apps.run_config import RunConfig

    def attackers(seed: int) -> set[int]:
        cfg = RunConfig.from_mapping({"attack": "random", "attack-fraction": 0.3, "seed": seed})
        return {p for p in range(10) if is_contaminated(cfg, Context(
            run_id=1, node_id=p + 1, node_config={"partition-id": p, "num-partitions": 10},
            state=RecordDict(), run_config={}))}

    assert attackers(0) == {2, 4, 6}  # unchanged for seed 0 (the README demo)
    assert len(attackers(1)) == 3 and attackers(1) != attackers(0)
