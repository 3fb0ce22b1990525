"""CLAIR's evidence is a function of the products clients send, not of how they factor them.

Issue #18: in the float32 path the strategy uses, a client sending ``(c B, A / c)`` with
``c`` in the hundreds dominated the Gram of all clients' ``B`` and hid itself and others.
Uploads are now re-factored into a balanced canonical form
(:func:`clair_flower.clair.inputs.balanced_factors`); these property tests re-factor one client
with random invertible ``R`` and check that flags and every per-client score move by less than
1e-6 relative (``Z_RTOL`` for the robust z, see there); by a power of two, not at all.
"""

import numpy as np
import pytest

from clair_flower.clair.config import ClairConfig
from clair_flower.clair.inputs import balanced_factors
from clair_flower.clair.run import run_clair
from clair_flower.clair.synthetic import make_instance
from clair_flower.lora import LoraFactors

RTOL = 1e-6
Z_RTOL = 3e-5
"""The robust z divides the score by its MAD (a few % of the score here), so float32 rounding
moves it more. Measured on this instance: one ulp of random noise on one client's float32
factors, no re-factoring at all, moved it by up to 1.3e-5 of its largest value (8 draws); the
re-factorings below by up to 8.8e-6."""
IN_SUBSPACE_Z_RTOL = 5e-5
"""CLAIR+'s in-subspace z (also a robust z, of coefficients on the float32-estimated ``U``): one
ulp of noise moved it by up to 2.1e-5, the re-factorings by up to 1.8e-5."""
N_DRAWS = 8


def _f32(f: LoraFactors) -> LoraFactors:
    return LoraFactors(B=f.B.astype(np.float32), A=f.A.astype(np.float32), scaling=f.scaling)


@pytest.fixture(scope="module")
def instance():
    """20 float32 clients, 4 contaminated, noisy: the strategy's dtype and a decided vote."""
    inst = make_instance(n_clients=20, p=48, q=40, noise=0.05, frac_contaminated=0.2, attack="random", seed=3)
    return inst, {k: {m: _f32(f) for m, f in d.items()} for k, d in inst.updates.items()}


@pytest.fixture(scope="module")
def base(instance):
    """The unmodified run (the reference every re-factoring is compared with)."""
    return run_clair(instance[1])


def _scores(res) -> np.ndarray:
    """Every per-client number the decision reads, one row per client (sorted ids); the robust
    z last."""
    return np.array([[c.score, c.vote, c.clean_vote, c.distance, c.score_z]
                     for _, c in sorted(res.clients.items())])


def _relative_change(a: np.ndarray, b: np.ndarray) -> float:
    """Largest change of any score column relative to that column's largest magnitude, the
    robust z's counted at ``RTOL / Z_RTOL`` of its size (so ``< RTOL`` tests it at ``Z_RTOL``)."""
    scale = np.maximum(np.max(np.abs(a), axis=0), 1e-30)
    change = np.abs(a - b) / scale
    change[:, -1] *= RTOL / Z_RTOL
    return float(np.max(change))


def _with(updates: dict, who: int, f: LoraFactors) -> dict:
    out = {k: dict(d) for k, d in updates.items()}
    out[who] = {"m0": f}
    return out


def _conditioned(rng: np.random.Generator, r: int, cond: float, interior: bool) -> np.ndarray:
    """Random ``R`` with condition number ``cond``: ``Q1 D`` (column scales of any size after an
    orthogonal mixing), or with ``interior`` ``Q1 D Q2`` (the scales mixed again)."""
    q1 = np.linalg.qr(rng.standard_normal((r, r)))[0]
    d = np.geomspace(1.0, cond, r)[rng.permutation(r)] / np.sqrt(cond)
    R = q1 * d
    if interior:
        R = R @ np.linalg.qr(rng.standard_normal((r, r)))[0]
    return R


def _refactored(f: LoraFactors, R: np.ndarray) -> LoraFactors:
    """``(B R, R^-1 A)`` formed in float64 and sent as float32, as a client would."""
    B, A = f.B.astype(np.float64), f.A.astype(np.float64)
    return _f32(LoraFactors(B=B @ R, A=np.linalg.solve(R, A), scaling=f.scaling))


def test_balanced_factors_keep_the_product_and_balance_the_factors():
    rng = np.random.default_rng(0)
    B, A = rng.standard_normal((30, 4)), rng.standard_normal((4, 25))
    for s in (0.5, -2.0):
        g = balanced_factors(LoraFactors(B=B * 1e3, A=A / 1e3, scaling=s))
        np.testing.assert_allclose(g.scaling * g.B @ g.A, s * B @ A, rtol=1e-10, atol=1e-12)
        # |s| B' and A' have equal column / row norms: no factor carries the update's scale
        np.testing.assert_allclose(abs(s) * np.linalg.norm(g.B, axis=0), np.linalg.norm(g.A, axis=1), rtol=1e-10)
    low = LoraFactors(B=np.c_[B[:, :2], B[:, :2]], A=np.r_[A[:2], A[:2]], scaling=1.0)  # rank 2 sent at rank 4
    g = balanced_factors(low)
    assert g.rank == 4 and np.allclose(g.B[:, 2:], 0.0) and np.allclose(g.B @ g.A, low.B @ low.A)
    f32 = balanced_factors(_f32(LoraFactors(B=B, A=A, scaling=1.0)))
    assert f32.B.dtype == np.float32 and f32.A.dtype == np.float32


def test_balanced_form_depends_on_the_product_only():
    rng = np.random.default_rng(1)
    f = LoraFactors(B=rng.standard_normal((30, 4)), A=rng.standard_normal((4, 25)), scaling=2.0)
    ref = balanced_factors(f)
    for _ in range(N_DRAWS):
        g = balanced_factors(LoraFactors(B=f.B @ (R := _conditioned(rng, 4, 1e6, True)),
                                         A=np.linalg.solve(R, f.A), scaling=2.0))
        np.testing.assert_allclose(g.B, ref.B, rtol=0, atol=1e-7 * np.abs(ref.B).max())
        np.testing.assert_allclose(g.A, ref.A, rtol=0, atol=1e-7 * np.abs(ref.A).max())


@pytest.mark.parametrize("c", [1e-3, 1e-2, 0.1, 10.0, 300.0, 1e3])
def test_pure_scaling_changes_neither_flags_nor_scores(instance, base, c):
    inst, upd = instance
    assert base.flagged == inst.contaminated
    for who in (min(inst.contaminated), min(set(upd) - inst.contaminated)):
        f = upd[who]["m0"]
        res = run_clair(_with(upd, who, _f32(LoraFactors(B=f.B.astype(np.float64) * c,
                                                          A=f.A.astype(np.float64) / c, scaling=f.scaling))))
        assert res.flagged == base.flagged
        assert _relative_change(_scores(base), _scores(res)) < RTOL


@pytest.mark.parametrize("e", [-10, -3, 7, 10])
def test_power_of_two_scaling_is_exactly_invisible(instance, base, e):
    """``2^e B`` and ``2^-e A`` are exact in float32: the canonical form, hence the run, is the same."""
    _, upd = instance
    f = upd[8]["m0"]
    res = run_clair(_with(upd, 8, LoraFactors(B=f.B * np.float32(2.0**e), A=f.A * np.float32(2.0**-e),
                                              scaling=f.scaling)))
    np.testing.assert_array_equal(_scores(res), _scores(base))


def test_random_conditioned_refactoring_changes_neither_flags_nor_scores(instance):
    """``R = Q D`` with condition up to 1e6: the float32 factors carry the same product to float32
    accuracy, so the run must equal the unmodified one."""
    inst, upd = instance
    base = run_clair(upd, ClairConfig(in_subspace_stage=True))
    rng = np.random.default_rng(2)
    for draw in range(N_DRAWS):
        who = int(rng.integers(20))
        f = upd[who]["m0"]
        R = _conditioned(rng, f.rank, float(10 ** rng.uniform(0, 6)), interior=False)
        res = run_clair(_with(upd, who, _refactored(f, R)), ClairConfig(in_subspace_stage=True))
        assert res.flagged == base.flagged, draw
        assert _relative_change(_scores(base), _scores(res)) < RTOL, draw
        z0 = np.array([c.in_subspace_z or 0.0 for _, c in sorted(base.clients.items())])
        z1 = np.array([c.in_subspace_z or 0.0 for _, c in sorted(res.clients.items())])
        assert np.max(np.abs(z0 - z1)) < IN_SUBSPACE_Z_RTOL * np.max(np.abs(z0)), draw


def test_interior_ill_conditioning_costs_only_the_product_float32_can_carry(instance):
    """``R = Q1 D Q2`` with condition 1e6: float32 ``(B R, R^-1 A)`` no longer carry ``B A`` (the
    product moves by ~ eps32 * cond(R)), which no method can undo. CLAIR's result is then exactly
    the one for the update those factors do carry (its balanced form from the dense product)."""
    _, upd = instance
    rng = np.random.default_rng(4)
    for draw in range(N_DRAWS // 2):
        who = int(rng.integers(20))
        f = upd[who]["m0"]
        sent = _refactored(f, _conditioned(rng, f.rank, 1e6, interior=True))
        carried = sent.B.astype(np.float64) @ sent.A.astype(np.float64)
        u, s, vt = np.linalg.svd(carried, full_matrices=False)
        k = f.rank
        dense_form = _f32(LoraFactors(B=u[:, :k] * np.sqrt(s[:k]), A=np.sqrt(s[:k])[:, None] * vt[:k],
                                      scaling=f.scaling))
        a, b = run_clair(_with(upd, who, sent)), run_clair(_with(upd, who, dense_form))
        assert a.flagged == b.flagged, draw
        assert _relative_change(_scores(a), _scores(b)) < RTOL, draw
