"""The lossless downlink: what a client's rank cannot hold of its refined update, as a delta.

CLAIR sends a benign client ``dW~_k = U U^T dW_k + (I - U U^T) m`` (``m`` the collaborative
mean), re-factored at the client's own rank ``r_k``. That refit keeps at most ``r_k`` singular
directions of a matrix whose rank is up to ``r_hat + sum_{l in C} r_l``, and on transformer
updates it drops much of the norm (docs/identification.md). The *merged delta* is the rest,
``D_k = dW~_k - s_k B'_k A'_k``, in factors of its exact (numerical) rank: a client adds
``B_D @ A_D`` to its frozen base weight and loads its adapter as usual, and its model then holds
``dW~_k`` exactly (:func:`clair_flower.copytask.peft_io.merge_delta`).

What each client's target is follows the round (``ClairResult.diagnostics["trusted_get"]`` and
the flagged policy): trusted clients of a round with structure get the refinement above; of a
round without, the collaborative mean (``"mean"``) or their own update (``"own"``, delta 0);
flagged clients the mean (``"consensus"``), their own update (``"local"``) or nothing
(``"zero"``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from clair_flower.clair.result import ClairResult, ClientId
from clair_flower.lora import LoraFactors

RTOL = 1e-6
"""Singular values of the delta below ``RTOL`` times its target's norm are numerical zero (the
refit itself is float32, so its own rounding is about 1e-7 of the target)."""


def _stack(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    left = np.concatenate([p[0] for p in parts], axis=1)
    right = np.concatenate([p[1] for p in parts], axis=0)
    return left, right


def compress(left: np.ndarray, right: np.ndarray, floor: float | None = None
             ) -> tuple[np.ndarray, np.ndarray, float]:
    """Factors ``(B, A)`` of ``left @ right`` at its numerical rank, and its Frobenius norm.

    Singular values at or below ``floor`` (default ``RTOL`` times the largest) are dropped. Two
    thin QRs and the SVD of the small core: exact up to float64 rounding, and never forms the
    ``out x in`` matrix.
    """
    Ql, Rl = np.linalg.qr(left)
    Qr, Rr = np.linalg.qr(right.T)
    u, s, vt = np.linalg.svd(Rl @ Rr.T, full_matrices=False)
    top = float(s[0]) if s.size else 0.0
    keep = s > (RTOL * top if floor is None else floor)
    root = np.sqrt(s[keep])
    return (Ql @ u[:, keep]) * root, root[:, None] * (vt[keep] @ Qr.T), float(np.sqrt(np.sum(s**2)))


def _target(f: Mapping[ClientId, LoraFactors], k: ClientId, U: np.ndarray, members: list[ClientId],
            kind: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Factors (left, right) whose products sum to client ``k``'s target ``dW~_k``."""
    mean = [(f[l].scaling / len(members) * f[l].B.astype(np.float64), f[l].A.astype(np.float64)) for l in members]
    own = (f[k].scaling * f[k].B.astype(np.float64), f[k].A.astype(np.float64))
    if kind == "own":
        return [own]
    if kind == "zero":
        return []
    if kind == "mean" or U.shape[1] == 0:
        return mean
    U = U.astype(np.float64)
    off = [(b - U @ (U.T @ b), a) for b, a in mean]
    return [(U, (U.T @ own[0]) @ own[1]), *off]


def _kind(result: ClairResult, k: ClientId, flagged_policy: str) -> str:
    if result.clients[k].flagged:
        return {"consensus": "mean", "local": "own", "zero": "zero"}[flagged_policy]
    return str(result.diagnostics.get("trusted_get", "refined"))


def merged_deltas(updates: Mapping[ClientId, Mapping[str, LoraFactors]], result: ClairResult,
                  flagged_policy: str = "consensus", rtol: float = RTOL
                  ) -> tuple[dict[ClientId, dict[str, LoraFactors]], dict[ClientId, dict[str, float]]]:
    """Each client's merged delta per module (scaling 1, rank as needed, ``B`` may have 0
    columns) and the share of its target's norm the refit alone loses (``||D_k|| / ||dW~_k||``).

    ``updates`` are the uploads ``run_clair`` read, ``result`` its answer on them.
    """
    members = sorted(result.collaborative_set, key=list(result.clients).index)
    deltas: dict[ClientId, dict[str, LoraFactors]] = {k: {} for k in result.clients}
    losses: dict[ClientId, dict[str, float]] = {k: {} for k in result.clients}
    for m, report in result.modules.items():
        f = {k: updates[k][m] for k in result.clients}
        for k, client in result.clients.items():
            refit = client.refined[m]
            target = _target(f, k, report.U, members, _kind(result, k, flagged_policy))
            minus = (-refit.scaling * np.asarray(refit.B, np.float64), np.asarray(refit.A, np.float64))
            t_norm = compress(*_stack(target))[2] if target else 0.0
            B, A, norm = compress(*_stack([*target, minus]), rtol * t_norm)
            dtype = f[k].B.dtype
            deltas[k][m] = LoraFactors(B=B.astype(dtype), A=A.astype(dtype), scaling=1.0)
            losses[k][m] = norm / t_norm if t_norm > 0 else 0.0
    return deltas, losses
