"""Synthetic instances of the CLAIR model (``docs/DESIGN.md`` section 3), given as LoRA factors.

Benign clients follow ``dW_k = C + U V_k^T + E_k``: a common low-rank component ``C`` (it
cancels in pairwise differences), a shared column space ``U`` (p x r*) with client-specific
coefficients ``V_k``, and an estimation error ``E_k`` that is low-rank (LoRA factors cannot carry
a full-rank error) and generic, hence almost entirely outside ``span(U)``. Contaminated clients
follow one of a few attacks. Everything is produced as ``LoraFactors`` with the PEFT scaling
divided out of ``B`` and a random invertible mixing of the rank coordinates, so the tests see
factors, not a convenient parametrisation. Tests and benchmarks use this one generator so their
ground truth means the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clair_flower.lora import LoraFactors

ATTACKS = ("random", "colluders", "sign_flip", "scale", "ipm")


@dataclass(frozen=True)
class SyntheticInstance:
    """Updates plus ground truth: the shared subspace per module and the contaminated set."""

    updates: dict[int, dict[str, LoraFactors]]
    U: dict[str, np.ndarray]
    contaminated: frozenset[int]
    clean: dict[int, dict[str, np.ndarray]]
    """Noise-free benign update ``C + U V_k^T`` per benign client (dense, small sizes only)."""


def _orthonormal(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return q


def _mix(rng: np.random.Generator, B: np.ndarray, A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Re-parametrise ``B @ A`` as ``(B R) @ (R^-1 A)`` with a well-conditioned random ``R``."""
    r = B.shape[1]
    R = np.eye(r) + 0.3 * rng.standard_normal((r, r)) / np.sqrt(r)
    return B @ R, np.linalg.solve(R, A)


def _client_factors(
    rng: np.random.Generator, B: np.ndarray, A: np.ndarray, rank: int, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """Pad/split the factors of ``B @ A`` to exactly ``rank`` columns, mix, divide out scaling."""
    while B.shape[1] < rank:  # split a column: same product, higher (deficient) rank
        j = int(rng.integers(B.shape[1]))
        B = np.concatenate([B, B[:, j : j + 1]], axis=1)
        A = np.concatenate([A, 0.5 * A[j : j + 1]], axis=0)
        A[j] *= 0.5
    if B.shape[1] > rank:
        raise ValueError(f"client rank {rank} too small for the model (needs {B.shape[1]})")
    B, A = _mix(rng, B, A)
    scaling = alpha / rank
    return B / scaling, A


def make_instance(
    n_clients: int = 20,
    p: int = 32,
    q: int = 32,
    shared_rank: int = 3,
    common_rank: int = 1,
    noise: float = 0.0,
    noise_rank: int = 2,
    frac_contaminated: float = 0.1,
    attack: str = "random",
    modules: tuple[str, ...] = ("m0",),
    client_ranks: list[int] | None = None,
    attack_strength: float = 3.0,
    alpha: float = 16.0,
    seed: int = 0,
    shared_mean: float = 0.0,
    collusion_noise: float = 0.0,
) -> SyntheticInstance:
    """Draw one instance of the synthetic model.

    Parameters
    ----------
    noise
        ``||E_k||_F / ||U V_k^T||_F`` for every benign client (0 = noiseless).
    frac_contaminated
        Fraction of clients (rounded) replaced by the attack; the first ones after a seeded
        permutation, so the set is not a prefix of the ids.
    attack
        ``random`` (independent random rank-r updates of the benign norm), ``colluders`` (all
        contaminated clients upload one random update, identical up to ``collusion_noise``), ``sign_flip`` and ``scale``
        (of the client's own coefficients ``V_k`` on ``U``: the update stays in the benign model's
        span, the off-subspace test's blind spot), ``ipm`` (``-attack_strength/10`` times
        the benign mean).
    client_ranks
        Per-client LoRA rank (heterogeneous ranks); default ``common+shared+noise`` ranks.
    shared_mean
        ``V_k = shared_mean * V_bar + V'_k``: a task direction common to benign clients inside
        ``span(U)``. With the default 0 the coefficients are zero-mean, so a sign flip of them
        is statistically invisible; in-subspace tests need a non-zero mean.
    collusion_noise
        ``colluders`` only: each colluder adds its own random rank-``noise_rank`` update of this
        norm relative to the shared one (0: verbatim copies, whose pairwise differences are zero).
    """
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; choose from {ATTACKS}")
    rng = np.random.default_rng(seed)
    base_rank = common_rank + shared_rank + (noise_rank if noise > 0 else 0)
    ranks = list(client_ranks) if client_ranks is not None else [base_rank] * n_clients
    n_bad = int(round(frac_contaminated * n_clients))
    bad = frozenset(int(i) for i in rng.permutation(n_clients)[:n_bad])
    updates: dict[int, dict[str, LoraFactors]] = {k: {} for k in range(n_clients)}
    clean: dict[int, dict[str, np.ndarray]] = {k: {} for k in range(n_clients)}
    Us: dict[str, np.ndarray] = {}
    for name in modules:
        U = _orthonormal(rng, p, shared_rank)
        CB = rng.standard_normal((p, common_rank))
        CA = rng.standard_normal((common_rank, q)) / np.sqrt(q)
        Us[name] = U
        Vbar = rng.standard_normal((q, shared_rank)) / np.sqrt(q) if shared_mean else 0.0
        benign: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for k in range(n_clients):
            V = shared_mean * Vbar + rng.standard_normal((q, shared_rank)) / np.sqrt(q)
            Bk, Ak = np.concatenate([CB, U], 1), np.concatenate([CA, V.T], 0)
            clean[k][name] = Bk @ Ak
            if noise > 0:
                G = rng.standard_normal((p, noise_rank))
                H = rng.standard_normal((noise_rank, q))
                E = G @ H
                target = noise * np.linalg.norm(U @ V.T)
                G *= target / np.linalg.norm(E)
                Bk, Ak = np.concatenate([Bk, G], 1), np.concatenate([Ak, H], 0)
            benign[k] = (Bk, Ak)
        mean_norm = float(np.mean([np.linalg.norm(b @ a) for b, a in benign.values()]))
        coll = (rng.standard_normal((p, base_rank)), rng.standard_normal((base_rank, q)))
        coll = (coll[0] * mean_norm / np.linalg.norm(coll[0] @ coll[1]), coll[1])
        for k in range(n_clients):
            Bk, Ak = benign[k]
            if k in bad:
                if attack == "random":
                    Bk = rng.standard_normal((p, base_rank))
                    Ak = rng.standard_normal((base_rank, q))
                    Bk *= mean_norm / np.linalg.norm(Bk @ Ak)
                elif attack == "colluders":
                    Bk, Ak = coll[0].copy(), coll[1].copy()
                    if collusion_noise > 0:  # near-copies: the group's own differences are small
                        Bk, Ak = _near_copy(rng, Bk, Ak, collusion_noise * mean_norm)
                elif attack in ("sign_flip", "scale"):
                    Ak = Ak.copy()  # in-subspace: only the coefficients on U change
                    rows = slice(common_rank, common_rank + shared_rank)
                    Ak[rows] *= -1.0 if attack == "sign_flip" else attack_strength
                elif attack == "ipm":
                    good = [benign[j] for j in range(n_clients) if j not in bad]
                    Bk = np.concatenate([b for b, _ in good], 1) * (-attack_strength / 10 / len(good))
                    Ak = np.concatenate([a for _, a in good], 0)
                    Bk, Ak = _lowrank(Bk, Ak, base_rank)
                del clean[k][name]
            if attack == "colluders" and k in bad and collusion_noise == 0:
                B, A = Bk, Ak  # identical factors: colluders upload one update verbatim
                scaling = alpha / ranks[k]
                B = B / scaling
            else:
                B, A = _client_factors(rng, Bk, Ak, ranks[k], alpha)
            updates[k][name] = LoraFactors(B=B, A=A, scaling=alpha / ranks[k])
    return SyntheticInstance(updates, Us, bad, clean)


def _near_copy(rng: np.random.Generator, B: np.ndarray, A: np.ndarray, size: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """The shared update at one rank less plus an own rank-1 term of norm ``size`` (same rank)."""
    B, A = B[:, :-1], A[:-1]
    g, h = rng.standard_normal((B.shape[0], 1)), rng.standard_normal((1, A.shape[1]))
    g *= size / np.linalg.norm(g @ h)
    return np.concatenate([B, g], 1), np.concatenate([A, h], 0)


def _lowrank(B: np.ndarray, A: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-``r`` factors of ``B @ A`` (used to keep IPM at a LoRA rank)."""
    u, s, vt = np.linalg.svd(B @ A, full_matrices=False)
    return u[:, :r] * s[:r], vt[:r]


def make_large_factors(
    n_clients: int, shape: tuple[int, int], rank: int, shared_rank: int = 8,
    frac_contaminated: float = 0.1, noise: float = 0.1, alpha: float = 32.0, seed: int = 0,
    contaminated: frozenset[int] | None = None,
) -> tuple[dict[int, LoraFactors], np.ndarray, frozenset[int]]:
    """One module of float32 factors at LLM shape, generated factor-wise (never dense).

    Benign ``B_k = [U, noise * G_k]`` mixed by a random rotation, ``A_k`` Gaussian; contaminated
    clients get fully random factors of the same norm. ``contaminated`` fixes the set (a client
    is contaminated in every module of a round); by default it is drawn from ``seed``.
    Returns (updates, U, contaminated).
    """
    p, q = shape
    rng = np.random.default_rng(seed)
    U = np.linalg.qr(rng.standard_normal((p, shared_rank)).astype(np.float32))[0]
    n_bad = int(round(frac_contaminated * n_clients))
    drawn = frozenset(int(i) for i in rng.permutation(n_clients)[:n_bad])
    bad = drawn if contaminated is None else frozenset(contaminated)
    scaling = alpha / rank
    out: dict[int, LoraFactors] = {}
    extra = rank - shared_rank
    for k in range(n_clients):
        A = (rng.standard_normal((rank, q), dtype=np.float32) / np.sqrt(q)).astype(np.float32)
        if k in bad:
            B = rng.standard_normal((p, rank), dtype=np.float32) / np.sqrt(p * rank / shared_rank)
        else:
            G = rng.standard_normal((p, extra), dtype=np.float32) * (noise / np.sqrt(p))
            B = np.concatenate([U, G], axis=1)
            R = np.linalg.qr(rng.standard_normal((rank, rank)))[0].astype(np.float32)
            B = B @ R
            A = R.T @ A
        B = (B / scaling).astype(np.float32)  # numpy 2: float64 scalars would promote to float64
        out[k] = LoraFactors(B=np.ascontiguousarray(B), A=np.ascontiguousarray(A, dtype=np.float32), scaling=scaling)
    return out, U, bad
