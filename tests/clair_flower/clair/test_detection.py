"""Pair flags, votes, consistency, multi-module combination and the in-subspace stage."""

import numpy as np

from clair_flower.clair import detection
from clair_flower.clair.decomposition import all_pairs, sampled_pairs


def _evidence_for(pairs, bad, value=1.0, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    e = np.array([value if (k in bad or l in bad) else 0.0 for k, l in pairs])
    return e + noise * rng.random(len(pairs))


def test_majority_vote_finds_the_explaining_set_and_scores_order():
    pairs = all_pairs(10)
    bad = {2, 7}
    ev = _evidence_for(pairs, bad, noise=0.05)
    v = detection.majority_vote(pairs, 10, ev, np.ones(len(pairs), bool), 0.1)
    assert set(np.flatnonzero(v.flagged)) == bad
    assert np.all(v.vote[list(bad)] == 1.0)
    assert np.allclose(v.vote[[0, 1, 3]], 2 / 9)  # benign: only its pairs with the two bad ones
    assert v.score[list(bad)].min() > v.score[[i for i in range(10) if i not in bad]].max()
    assert detection.consistency(pairs, v.pair_flags, v.flagged, np.ones(len(pairs), bool)) == 1.0


def test_plain_vote_fails_but_clean_vote_holds_on_unlucky_sampled_neighbourhood():
    n = 60
    pairs = sampled_pairs(n, seed=0)
    nb = [l if k == 0 else k for k, l in pairs if 0 in (k, l)]
    bad = set(nb[: len(nb) // 2 + 1])  # client 0 is benign but mostly surrounded by attackers
    ev = _evidence_for(pairs, bad)
    v = detection.majority_vote(pairs, n, ev, np.ones(len(pairs), bool), 0.1)
    assert v.vote[0] > 0.5  # plain majority would flag it
    assert not v.flagged[0] and set(np.flatnonzero(v.flagged)) == bad


def test_uninformative_pairs_do_not_vote():
    pairs = all_pairs(6)
    norms = np.array([0.0 if (k, l) == (4, 5) else 1.0 for k, l in pairs])
    inf = detection.informative_pairs(norms)
    assert inf.sum() == len(pairs) - 1
    ev = _evidence_for(pairs, {4, 5})
    ev[pairs.index((4, 5))] = 0.0  # colluders: identical updates, zero difference, zero S
    v = detection.majority_vote(pairs, 6, ev, inf, 0.1)
    assert v.vote[4] == 1.0 and set(np.flatnonzero(v.flagged)) == {4, 5}


def test_consistency_detects_unexplained_pattern():
    pairs = all_pairs(5)
    pf = np.zeros(len(pairs), bool)
    pf[pairs.index((0, 1))] = True  # one isolated flagged pair: no client explains it
    c = detection.consistency(pairs, pf, np.zeros(5, bool), np.ones(len(pairs), bool))
    assert np.isclose(c, 9 / 10)


def test_block_scale_and_combination():
    assert detection.block_scale(np.array([0.0, 1.0, 2.0, 3.0])) == 2.0
    e = detection.combine_modules([np.array([0.0, 0.3]), np.array([0.0, 0.4])])
    np.testing.assert_allclose(e, [0.0, np.sqrt((0.09 + 0.16) / 2)])


def test_robust_z_and_in_subspace_flags():
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((2, 8))
    coeffs = [mean + 0.1 * rng.standard_normal((2, 8)) for _ in range(12)]
    coeffs[3] = -coeffs[3]  # sign flip
    coeffs[7] = 3 * coeffs[7]  # scaling
    z, flags = detection.in_subspace_flags([coeffs])
    assert set(np.flatnonzero(flags)) == {3, 7}
    assert z[3] > 3.5 and abs(np.median(z)) < 1e-12


def test_consistency_leaves_out_pairs_of_two_flagged_clients():
    """A coordinated group's own pairs are small (unflagged): the model says nothing about them."""
    pairs = all_pairs(10)
    group = {2, 5, 7}
    pf = np.array([(k in group) != (l in group) for k, l in pairs])  # group-group pairs unflagged
    flagged = np.isin(np.arange(10), list(group))
    inf = np.ones(len(pairs), bool)
    assert detection.consistency(pairs, pf, flagged, inf) == 1.0
    assert detection.majority_vote(pairs, 10, pf.astype(float), inf, 0.5).flagged.tolist() == flagged.tolist()
    pf[pairs.index((0, 1))] = True  # a flagged pair between two unflagged clients still counts
    assert np.isclose(detection.consistency(pairs, pf, flagged, inf), 1 - 1 / (len(pairs) - 3))
