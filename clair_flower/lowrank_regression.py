"""Federated low-rank linear regression: the linear-model setting of RoLoRA's theory.

Chen et al. (arXiv 2502.01755, section 5) argue on a linear model that learning only ``B``
with ``A`` frozen at a random initialisation (FFA-LoRA) cannot reach the optimum, while
alternating ``B`` and ``A`` rounds (RoLoRA) does. This module is that setting in plain numpy,
so a test can check the claim with a criterion computed in closed form (no Flower, no torch).

Model. Client ``i`` holds ``X_i`` (``n_i x d_in``) and residual targets
``R_i = Y_i - X_i W0^T = X_i (B* A*)^T + noise`` (``n_i x d_out``): the pre-trained ``W0`` is
known, so only the rank-``r`` update ``Delta* = B* A*`` is to be learned. Clients are
heterogeneous through their input covariances ``Sigma_i`` (a random rotation and a log-uniform
spectrum per client); the target is shared. The adapter is ``Delta = B A`` with
``B`` (``d_out x r``) initialised to zero and ``A`` (``r x d_in``) random, as PEFT does.

Client ``i``'s loss is ``L_i = ||R_i - X_i Delta^T||_F^2 / (2 n_i)`` and the global loss is
``L = sum_i w_i L_i`` with ``w_i = n_i / n``. Everything the test compares against is closed form:

* the best rank-``r`` loss (reduced-rank regression, :func:`optimal_loss`);
* FFA-LoRA's floor, the best loss with ``A`` fixed at its init (least squares in ``B``,
  :func:`frozen_a_floor`): no number of FFA rounds can go below it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np

Method = Literal["fedavg", "ffa", "rolora"]
METHODS: tuple[Method, ...] = ("fedavg", "ffa", "rolora")


@dataclass(frozen=True)
class Problem:
    """The clients' data, the planted update and the aggregation weights.

    Attributes
    ----------
    xs, rs : list of ndarray
        Inputs ``X_i`` (``n_i x d_in``) and residual targets ``R_i`` (``n_i x d_out``).
    delta_star : ndarray
        The planted rank-``r`` update ``B* A*`` (``d_out x d_in``).
    weights : ndarray
        ``n_i / n``: FedAvg's weights, and the global loss's.
    rank : int
        ``r``, the LoRA rank (and the planted update's rank).
    """

    xs: list[np.ndarray]
    rs: list[np.ndarray]
    delta_star: np.ndarray
    weights: np.ndarray
    rank: int

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in)`` of the update."""
        return self.delta_star.shape  # type: ignore[return-value]

    @cached_property
    def _moments(self) -> tuple[np.ndarray, np.ndarray, float]:
        s = sum(w * x.T @ x / len(x) for w, x in zip(self.weights, self.xs))
        c = sum(w * r.T @ x / len(x) for w, x, r in zip(self.weights, self.xs, self.rs))
        const = sum(w * float(np.sum(r * r)) / (2 * len(r)) for w, r in zip(self.weights, self.rs))
        return np.asarray(s), np.asarray(c), float(const)

    def moments(self) -> tuple[np.ndarray, np.ndarray, float]:
        """``S = sum w_i X_i^T X_i / n_i``, ``C = sum w_i R_i^T X_i / n_i`` and
        ``c = sum w_i ||R_i||^2 / (2 n_i)``: the global loss is
        ``c - tr(Delta C^T) + tr(Delta S Delta^T) / 2``, a quadratic in ``Delta``.
        Computed once (cached): every closed form and every round's loss needs them."""
        return self._moments

    @cached_property
    def _client_moments(self) -> tuple[np.ndarray, np.ndarray]:
        pairs = [client_moments(x, r) for x, r in zip(self.xs, self.rs)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def client_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Every client's ``(X_i^T X_i / n_i, R_i^T X_i / n_i)``, stacked on a client axis (cached)."""
        return self._client_moments


def random_covariance_root(d: int, heterogeneity: float, rng: np.random.Generator) -> np.ndarray:
    """``Sigma^{1/2}`` with a random rotation and eigenvalues log-uniform in
    ``[1/h, h]``: each client emphasises different input directions (feature skew)."""
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    spectrum = np.exp(rng.uniform(-np.log(heterogeneity), np.log(heterogeneity), size=d))
    return (q * np.sqrt(spectrum)) @ q.T


def make_problem(num_clients: int = 10, d_in: int = 20, d_out: int = 16, rank: int = 2,
                 n_per_client: int = 40, heterogeneity: float = 4.0, noise: float = 0.0,
                 seed: int = 0) -> Problem:
    """A seeded federated low-rank regression (module docstring).

    ``Delta*`` is scaled to unit spectral norm so step sizes do not depend on the seed; its
    rank-``r`` singular values are all 1 (a well-conditioned target, as in the paper's theory).
    """
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((d_out, rank)))
    v, _ = np.linalg.qr(rng.standard_normal((d_in, rank)))
    delta_star = u @ v.T
    xs, rs = [], []
    for _ in range(num_clients):
        x = rng.standard_normal((n_per_client, d_in)) @ random_covariance_root(d_in, heterogeneity, rng)
        xs.append(x)
        rs.append(x @ delta_star.T + noise * rng.standard_normal((n_per_client, d_out)))
    weights = np.full(num_clients, 1.0 / num_clients)
    return Problem(xs, rs, delta_star, weights, rank)


def init_factors(problem: Problem, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's init: ``B = 0``, ``A`` Gaussian with variance ``1/d_in`` (rows of norm about 1).
    The same ``(B, A)`` for every method, so the methods differ only in what they train."""
    d_out, d_in = problem.shape
    rng = np.random.default_rng(seed)
    return np.zeros((d_out, problem.rank)), rng.standard_normal((problem.rank, d_in)) / np.sqrt(d_in)


# -- closed forms ---------------------------------------------------------------------------

def global_loss(problem: Problem, delta: np.ndarray) -> float:
    """``sum_i w_i ||R_i - X_i Delta^T||^2 / (2 n_i)``, from the cached moments (exact up to
    rounding of order ``1e-16`` times the loss at ``Delta = 0``)."""
    s, c, const = problem.moments()
    return float(const - np.sum(delta * c) + np.sum((delta @ s) * delta) / 2)


def optimal_update(problem: Problem) -> np.ndarray:
    """The best rank-``r`` ``Delta`` (reduced-rank regression): with ``W_ols = C S^-1`` the
    loss is ``||(Delta - W_ols) S^{1/2}||^2 / 2 + const``, so truncate the SVD of
    ``W_ols S^{1/2}`` and map back with ``S^{-1/2}``."""
    s, c, _ = problem.moments()
    evals, evecs = np.linalg.eigh(s)
    s_half = (evecs * np.sqrt(evals)) @ evecs.T
    s_inv_half = (evecs / np.sqrt(evals)) @ evecs.T
    m = c @ np.linalg.solve(s, s_half)  # W_ols S^{1/2} = C S^{-1/2}
    u, sv, vt = np.linalg.svd(m, full_matrices=False)
    r = problem.rank
    return (u[:, :r] * sv[:r]) @ vt[:r] @ s_inv_half


def optimal_loss(problem: Problem) -> float:
    """The lowest global loss any rank-``r`` adapter can reach (0 without noise)."""
    return global_loss(problem, optimal_update(problem))


def frozen_a_floor(problem: Problem, a: np.ndarray) -> tuple[float, np.ndarray]:
    """FFA-LoRA's floor: ``min_B L(B a)`` and its ``B``, by least squares in ``B``.

    The loss is a convex quadratic in ``B`` with normal equations
    ``B (a S a^T) = C a^T``; FFA-LoRA only ever moves ``B``, so its loss is never below this.
    """
    s, c, _ = problem.moments()
    b = np.linalg.solve(a @ s @ a.T, a @ c.T).T
    return global_loss(problem, b @ a), b


def relative_excess(problem: Problem, loss: float) -> float:
    """``(L - L_opt) / (L(0) - L_opt)``: 1 at the init (``B = 0``), 0 at the rank-``r`` optimum."""
    best = optimal_loss(problem)
    start = global_loss(problem, np.zeros(problem.shape))
    return (loss - best) / (start - best)


# -- federated rounds -----------------------------------------------------------------------

def client_moments(x: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(X^T X / n, R^T X / n)``: all a client's gradient needs, computed once (the
    gradient in ``Delta`` is ``Delta S_i - C_i``), so a step costs no pass over the data."""
    n = len(x)
    return x.T @ x / n, r.T @ x / n


def local_gd(s: np.ndarray, c: np.ndarray, b: np.ndarray, a: np.ndarray, train: str,
             steps: int, lr: float) -> tuple[np.ndarray, np.ndarray]:
    """``steps`` full-batch gradient steps on one client's loss, moving ``B``, ``A`` or both.

    ``(s, c)`` are the client's moments (:func:`client_moments`). With
    ``G = (B A) s - c`` the gradient in ``Delta``, the factors' gradients are ``G A^T`` and
    ``B^T G`` (taken at the same point when both move, as joint LoRA training does). Every
    argument may carry a leading client axis: all clients then step at once (same maths).
    """
    if train not in ("A", "B", "both"):
        raise ValueError(f"train must be 'A', 'B' or 'both', got {train!r}")
    b, a = b.copy(), a.copy()
    for _ in range(steps):
        g = (b @ a) @ s - c
        gb, ga = g @ np.swapaxes(a, -1, -2), np.swapaxes(b, -1, -2) @ g
        if train in ("B", "both"):
            b -= lr * gb
        if train in ("A", "both"):
            a -= lr * ga
    return b, a


def weighted_mean(mats: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """``sum_k w_k M_k`` (weights sum to 1)."""
    return np.einsum("k,k...->...", weights, np.stack(mats))


def product_gap(bs: list[np.ndarray], as_: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """FedAvg-LoRA's aggregation error ``mean(B) mean(A) - mean(B A)``.

    It equals ``-sum_k w_k (B_k - mean B)(A_k - mean A)``, the weighted cross-covariance of
    the two factors over clients: zero when one factor is the same on every client (the
    case of RoLoRA and FFA-LoRA), non-zero once clients move both differently.
    """
    return weighted_mean(bs, weights) @ weighted_mean(as_, weights) - \
        weighted_mean([b @ a for b, a in zip(bs, as_)], weights)


def trained_factor(method: Method, round_index: int) -> str:
    """What clients train in round ``round_index`` (0-based): both, always ``B``, or
    ``B`` then ``A`` alternating (RoLoRA trains ``B`` first: with ``B = 0`` the gradient of
    ``A`` is zero, so an ``A`` round would do nothing)."""
    if method == "fedavg":
        return "both"
    if method == "ffa":
        return "B"
    if method == "rolora":
        return "B" if round_index % 2 == 0 else "A"
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def uplink_floats(method: Method, round_index: int, shape: tuple[int, int], rank: int) -> int:
    """Floats one client uploads in a round: the factor(s) it trained."""
    d_out, d_in = shape
    sizes = {"B": d_out * rank, "A": rank * d_in}
    factor = trained_factor(method, round_index)
    return sizes["B"] + sizes["A"] if factor == "both" else sizes[factor]


@dataclass
class History:
    """A federated run: the global loss after each round and the final factors."""

    method: Method
    losses: list[float] = field(default_factory=list)
    uplink: list[int] = field(default_factory=list)
    b: np.ndarray | None = None
    a: np.ndarray | None = None

    @property
    def final_loss(self) -> float:
        return self.losses[-1]


def federated_round(problem: Problem, b: np.ndarray, a: np.ndarray, train: str, local_steps: int,
                    lr: float) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Every client trains from the broadcast ``(B, A)``; the server averages each trained
    factor separately and keeps the frozen one (clients upload only what they trained).

    Returns the new global factors and the clients' factors (for :func:`product_gap`).
    """
    s, c = problem.client_moments()
    k = len(problem.xs)
    bk, ak = local_gd(s, c, np.broadcast_to(b, (k, *b.shape)), np.broadcast_to(a, (k, *a.shape)),
                      train, local_steps, lr)
    bs, as_ = list(bk), list(ak)
    new_b = weighted_mean(bs, problem.weights) if train in ("B", "both") else b
    new_a = weighted_mean(as_, problem.weights) if train in ("A", "both") else a
    return new_b, new_a, bs, as_


def run(problem: Problem, method: Method, rounds: int, local_steps: int = 5, lr: float = 0.2,
        init_seed: int = 0) -> History:
    """``rounds`` federated rounds of ``method`` from PEFT's init (:func:`init_factors`)."""
    b, a = init_factors(problem, init_seed)
    history = History(method)
    for t in range(rounds):
        train = trained_factor(method, t)
        b, a, _, _ = federated_round(problem, b, a, train, local_steps, lr)
        history.losses.append(global_loss(problem, b @ a))
        history.uplink.append(uplink_floats(method, t, problem.shape, problem.rank))
    history.b, history.a = b, a
    return history
