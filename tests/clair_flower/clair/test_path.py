"""The lambda path: its grid spans the whole transition, and a full-rank L is never admissible."""

import numpy as np
import pytest

from clair_flower.clair import ClairConfig, run_clair
from clair_flower.clair import detection
from clair_flower.clair.decomposition import ClientFactors, lam_from_c, make_pairs, reduced_problem
from clair_flower.clair.path import assess, energy_rank, max_rank, transition
from clair_flower.clair.solvers import solve
from clair_flower.clair.synthetic import make_instance


def _problem(n: int, noise: float, seed: int = 1):
    inst = make_instance(n_clients=n, p=48, q=40, noise=noise, frac_contaminated=0.3, seed=seed)
    ids = sorted(inst.updates)
    f = [inst.updates[c]["m0"] for c in ids]
    cf = ClientFactors.scaled([x.B for x in f], [x.A for x in f], [x.scaling for x in f], np.float64)
    pairs = make_pairs(n, "all" if n <= 30 else "sampled", None, 0)
    return reduced_problem(cf, pairs), n


@pytest.mark.parametrize("n", [10, 30, 100])
@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_grid_ends_bracket_all_flagged_and_none_flagged(n, noise):
    """Just below ``c_all`` every block is in S; just above ``c_none`` none is, for N = 10 to 100."""
    problem, n = _problem(n, noise)
    tr = transition(problem)
    assert 0 < tr.c_all < tr.c_none
    tiny = 1e-6 * problem.block_norms.max()
    low = solve(problem, lam_from_c(0.98 * tr.c_all, len(problem.pairs)), tol=1e-9, max_iter=5000)
    assert np.all(low.S_norms > tiny)
    high = solve(problem, lam_from_c(1.02 * tr.c_none, len(problem.pairs)), tol=1e-9, max_iter=5000)
    assert np.all(high.S_norms < tiny)
    grid = tr.grid(12)
    assert len(grid) == 12 and tr.c_all < grid[0] < grid[1] and grid[-2] < grid[-1] < tr.c_none
    assert grid[0] / tr.c_all == pytest.approx(tr.c_none / grid[-1])  # geometric, ends excluded


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_L_spread_over_the_clients_span_is_never_admissible(noise):
    """Above ``c_none`` every pair sits in ``L = M``: nothing is flagged, and an ``L`` spread over
    the clients' span (contaminated clients' random updates in it) is "no structure"."""
    problem, n = _problem(10, noise)
    tr = transition(problem)
    res = solve(problem, lam_from_c(1.05 * tr.c_none, len(problem.pairs)), tol=1e-9, max_iter=5000)
    point = assess(res, problem, ClairConfig(), n, 1.05 * tr.c_none, detection.informative_pairs(problem.block_norms))
    assert point.n_flagged == 0 and point.effective_rank > 0.25 * max_rank(problem)
    assert not point.structured and not point.admissible


def test_low_rank_L_without_contamination_is_admissible_at_the_top():
    """With no contamination and a shared subspace, ``L = M`` is low-rank: structure, no flags."""
    inst = make_instance(n_clients=10, p=48, q=40, frac_contaminated=0.0, seed=2)
    res = run_clair(inst.updates)
    assert res.decision == "vote" and res.flagged == frozenset()
    assert res.modules["m0"].diagnostics["admissible"]


def test_energy_rank():
    assert energy_rank(np.array([3.0, 1.0, 0.1])) == 2  # 9 / 10.01 < 0.9
    assert energy_rank(np.array([3.0, 0.5])) == 1  # 9 / 9.25 >= 0.9
    assert energy_rank(np.zeros(3)) == 0


def test_chosen_c_does_not_depend_on_the_order_of_modules():
    inst = make_instance(n_clients=10, p=24, q=20, frac_contaminated=0.3, noise=0.01, seed=4,
                         modules=("q_proj", "k_proj", "v_proj"))
    forward = run_clair(inst.updates)
    reordered = {c: dict(reversed(list(mods.items()))) for c, mods in reversed(list(inst.updates.items()))}
    backward = run_clair(reordered)
    assert forward.diagnostics["c"] == backward.diagnostics["c"]
    assert forward.flagged == backward.flagged == inst.contaminated
