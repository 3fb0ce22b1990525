"""The noise-calibrated pair threshold (clair_flower/clair/calibration.py)."""

from __future__ import annotations

import numpy as np
import pytest

from clair_flower.clair import ClairConfig, run_clair
from clair_flower.clair.calibration import benign_noise, calibrated_vote, pair_threshold
from clair_flower.clair.decomposition import all_pairs
from clair_flower.clair.synthetic import make_instance


def _evidence(n: int, bad: set[int], benign_level: float, bad_level: float, seed: int = 0) -> np.ndarray:
    """Pair evidence: ``bad_level`` on every pair with a contaminated end, ``benign_level`` else,
    each times a random factor in [0.8, 1.2]."""
    rng = np.random.default_rng(seed)
    pairs = all_pairs(n)
    level = np.array([bad_level if (k in bad or l in bad) else benign_level for k, l in pairs])
    return level * rng.uniform(0.8, 1.2, len(pairs))


@pytest.mark.parametrize("bad", [set(), {0}, {1, 5, 7}, {0, 2, 4, 6}])
def test_noise_is_the_benign_level_whatever_the_minority_sends(bad):
    n = 10
    ev = _evidence(n, bad, 0.3, 5.0)
    noise = benign_noise(all_pairs(n), n, ev, np.ones(ev.size, bool))
    assert 0.24 <= noise <= 0.36


def test_calibrated_vote_separates_noisy_benign_pairs_the_fixed_threshold_flags():
    n, bad = 10, {2, 4, 6}
    pairs, ev = all_pairs(n), _evidence(n, bad, 0.3, 0.7)
    inf = np.ones(len(pairs), bool)
    fixed, _ = calibrated_vote(pairs, n, ev, inf, 0.25, 0.0, 0.5)
    assert fixed.flagged.all()  # every pair is above 0.25: the vote is inconclusive
    votes, th = calibrated_vote(pairs, n, ev, inf, 0.25, 1.5, 0.5)
    assert set(np.flatnonzero(votes.flagged)) == bad
    assert th.threshold == pytest.approx(1.5 * th.noise) and th.threshold > 0.25


def test_calibration_never_certifies_nobody_where_the_fixed_threshold_would_not():
    n = 10
    pairs, ev = all_pairs(n), _evidence(n, set(), 0.3, 0.3)
    inf = np.ones(len(pairs), bool)
    votes, th = calibrated_vote(pairs, n, ev, inf, 0.25, 1.5, 0.5)
    assert th.threshold == 0.25  # the calibrated vote flagged nobody: judged at the fixed one
    assert votes.flagged.all()
    assert pair_threshold(pairs, n, ev * 0.01, inf, 0.25, 1.5).threshold == 0.25  # noiseless: fixed


def test_noisy_synthetic_rounds_are_decided_by_the_vote_more_often():
    """Noisy benign clients (noise 0.8 of the shared part): the fixed threshold leaves every round
    to the score fallback; the calibrated vote decides some of them, with the same flags."""
    decided = {0.0: 0, 1.5: 0}
    for seed in (0, 3):
        inst = make_instance(n_clients=10, p=32, q=32, frac_contaminated=0.3, noise=0.8, noise_rank=4,
                             attack_strength=1.0, seed=seed)
        for nf in decided:
            res = run_clair(inst.updates, ClairConfig(workers=1, noise_factor=nf))
            assert res.flagged == inst.contaminated
            decided[nf] += res.decision == "vote"
    assert decided[0.0] == 0 and decided[1.5] == 2


def test_bad_calibration_settings_are_named():
    with pytest.raises(ValueError, match="noise_factor"):
        ClairConfig(noise_factor=-1.0).validate()
    with pytest.raises(ValueError, match="max_noise"):
        ClairConfig(max_noise=0.0).validate()


def test_client_medians_equal_a_median_per_client_bitwise() -> None:
    from clair_flower.clair.calibration import client_medians

    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(3, 30))
        P = rng.integers(0, n, size=(int(rng.integers(1, 80)), 2))
        P = P[P[:, 0] != P[:, 1]]
        v = rng.random(len(P))
        if trial % 3 == 0:
            v = np.round(v, 1)  # ties
        got = client_medians(P, v, n)
        for k in range(n):
            mine = (P[:, 0] == k) | (P[:, 1] == k)
            assert got[k] == (float(np.median(v[mine])) if mine.any() else np.inf)
