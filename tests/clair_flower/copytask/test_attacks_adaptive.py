"""The adaptive attacks (``subthreshold``, ``in-subspace``) put their deviation where they claim,
at the size they claim, and what CLAIR makes of them on planted problems (issue #18 item 4)."""

from __future__ import annotations

import numpy as np
import pytest

from clair_flower.clair.config import ClairConfig
from clair_flower.clair.run import run_clair
from clair_flower.clair.synthetic import make_instance
from clair_flower.copytask import attacks as atk
from clair_flower.copytask.attacks import AttackConfig, poison_update
from clair_flower.lora import LoraFactors

P, Q, R = 24, 20, 4
MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj")


def _planted(seed: int, U: np.ndarray, common: np.ndarray, a: np.ndarray) -> dict[str, np.ndarray]:
    """An adapter with the shared ``A`` (FFA-LoRA style) and ``B = common + U X``: ``B @ A``
    has a common part and benign differences ``U (X_i - X_j) A`` inside ``span(U)``."""
    rng = np.random.default_rng(seed)
    return {k: v for m in MODULES for k, v in (
        (m + ".lora_A.weight", a.astype(np.float32)),
        (m + ".lora_B.weight", (common + U @ rng.standard_normal((U.shape[1], R))).astype(np.float32)))}


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(0)
    U = np.linalg.qr(rng.standard_normal((P, 2)))[0]
    common, a = rng.standard_normal((P, R)), rng.standard_normal((R, Q))
    refs = [_planted(10 + i, U, common, a) for i in range(5)]
    return U, refs, _planted(1, U, common, a)


def _products(sd: dict) -> dict[str, np.ndarray]:
    return {m: sd[m + ".lora_B.weight"].astype(np.float64) @ sd[m + ".lora_A.weight"].astype(np.float64)
            for m in MODULES}


def test_catalogue_and_client_wiring():
    for name in ("subthreshold", "in-subspace"):
        assert name in atk.MODEL_ATTACKS and name in atk.NEEDS_REFERENCE
        assert atk.DEFAULT_STRENGTH[name] > 0
        with pytest.raises(ValueError, match="strength"):
            AttackConfig(name=name, strength=-1.0)
    assert atk.CLAIR_FLAG_THRESHOLD == ClairConfig().flag_threshold  # copied, so checked here


@pytest.mark.parametrize("name", ["subthreshold", "in-subspace"])
def test_deviation_changes_b_only_and_lies_where_aimed(world, name):
    U, refs, honest = world
    k = 1.3
    out = poison_update(AttackConfig(name=name, fraction=0.3, strength=k), honest, honest, 2,
                        benign_reference=refs)
    assert set(out) == set(honest) and all(out[x].dtype == honest[x].dtype for x in honest)
    sent, own, prods = _products(out), _products(honest), [_products(r) for r in refs]
    for m in MODULES:
        np.testing.assert_array_equal(out[m + ".lora_A.weight"], honest[m + ".lora_A.weight"])
        dev = sent[m] - own[m]
        inside = U @ (U.T @ dev)
        mean = np.mean([p[m] for p in prods], axis=0)
        if name == "in-subspace":  # inside span(U), against the mean there, k x the benign spread
            assert np.linalg.norm(dev - inside) < 1e-4 * np.linalg.norm(dev)
            assert np.sum(dev * (U @ (U.T @ mean))) < 0
            spread = np.median([np.linalg.norm(U.T @ (p[m] - mean)) for p in prods])
            assert np.linalg.norm(dev) == pytest.approx(k * spread, rel=1e-4)
        else:  # off span(U), against the mean there, k x 0.25 x the median benign pair distance
            assert np.linalg.norm(inside) < 1e-4 * np.linalg.norm(dev)
            assert np.sum(dev * (mean - U @ (U.T @ mean))) < 0
            pair = [np.linalg.norm(prods[i][m] - prods[j][m]) for i in range(5) for j in range(i + 1, 5)]
            assert np.linalg.norm(dev) == pytest.approx(k * 0.25 * np.median(pair), rel=1e-4)


def _attacked(name: str, k: float, seed: int) -> tuple[dict, list[int]]:
    """10 planted clients (synthetic model, shared task direction), 3 attack with references
    from 3 benign clients (the simulation's omniscient attacker)."""
    inst = make_instance(n_clients=10, p=48, q=40, noise=0.05, frac_contaminated=0.0, seed=seed, shared_mean=1.0)

    def sd(f: LoraFactors) -> dict[str, np.ndarray]:
        return {"m.lora_A.weight": f.A.astype(np.float32), "m.lora_B.weight": f.B.astype(np.float32)}

    bad, refs = [1, 4, 7], [sd(inst.updates[c]["m0"]) for c in (0, 2, 3)]
    upd = {c: dict(d) for c, d in inst.updates.items()}
    for c in bad:
        own = sd(upd[c]["m0"])
        out = poison_update(AttackConfig(name=name, fraction=0.3, strength=k), own, own, 1, benign_reference=refs)
        upd[c] = {"m0": LoraFactors(B=out["m.lora_B.weight"], A=out["m.lora_A.weight"],
                                    scaling=upd[c]["m0"].scaling)}
    return upd, bad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_what_clair_makes_of_a_shared_off_subspace_shift(seed):
    """Measured (docs/DESIGN.md, "Adaptive attackers"): aimed at 0.9 x the threshold, the benign
    noise pushes the attackers' evidence over it and the vote flags them; at 4 x, three attackers
    sharing one deviation direction are a low-rank structure of their own, absorbed by ``L``:
    plain CLAIR misses them and CLAIR+ catches them."""
    upd, bad = _attacked("subthreshold", 0.9, seed)
    assert run_clair(upd).flagged == frozenset(bad)
    upd, bad = _attacked("subthreshold", 4.0, seed)
    assert not run_clair(upd).flagged
    assert run_clair(upd, ClairConfig(in_subspace_stage=True)).flagged == frozenset(bad)
