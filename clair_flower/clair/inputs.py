"""Input checks: what ``run_clair`` accepts as one round of uploads, in a canonical form.

Every accepted upload is re-factored into its *balanced* form (:func:`balanced_factors`):
CLAIR's evidence then depends only on the product ``scaling * B @ A`` a client sent, never on
how it split it. Without this, a client sending ``(c B, A / c)`` (the same update) with
``c = 300`` dominated the float32 Gram of all ``B`` factors and hid itself and others
(issue #18); ``docs/DESIGN.md`` section 4 gives the measured invariance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from clair_flower.clair.result import ClientId
from clair_flower.lora import LoraFactors


class ClairInputError(ValueError):
    """Updates CLAIR cannot interpret; the message names the client and module."""


def as_factors(x: object, cid: ClientId, name: str) -> LoraFactors:
    """Validate one upload; dense arrays become exact-rank factors (scaling 1)."""
    if isinstance(x, LoraFactors):
        f = x
        arrays = (f.A, f.B)
    else:
        arr = np.asarray(x)
        if arr.ndim != 2:
            raise ClairInputError(f"client {cid!r}, module {name!r}: dense update must be 2-D, got {arr.shape}")
        arrays = (arr,)
    for a in arrays:
        if not np.issubdtype(a.dtype, np.floating):
            raise ClairInputError(f"client {cid!r}, module {name!r}: non-float dtype {a.dtype}")
        if not np.all(np.isfinite(a)):
            raise ClairInputError(f"client {cid!r}, module {name!r}: update contains NaN or Inf")
    if isinstance(x, LoraFactors):
        if not math.isfinite(f.scaling):
            raise ClairInputError(f"client {cid!r}, module {name!r}: non-finite scaling")
        return balanced_factors(f)
    dtype = np.float32 if arr.dtype == np.float32 else np.float64
    u, s, vt = np.linalg.svd(arr.astype(np.float64), full_matrices=False)
    r = max(1, int(np.sum(s > 1e-12 * (s[0] if s.size else 0.0))))
    root = np.sqrt(s[:r])
    return LoraFactors(B=(u[:, :r] * root).astype(dtype), A=(root[:, None] * vt[:r]).astype(dtype), scaling=1.0)


def _canonical_signs(left: np.ndarray) -> np.ndarray:
    """+-1 per column so that each column's largest-magnitude entry is positive (SVD signs are
    arbitrary; fixing them makes the balanced form a function of the product alone)."""
    if left.size == 0:
        return np.ones(left.shape[1])
    idx = np.argmax(np.abs(left), axis=0)
    sgn = np.sign(left[idx, np.arange(left.shape[1])])
    return np.where(sgn == 0, 1.0, sgn)


def balanced_factors(f: LoraFactors) -> LoraFactors:
    """The same update ``s B A`` as ``s B' A'`` with ``s B' = U sqrt(S)``, ``A' = sqrt(S) V^T``.

    ``U S V^T`` is the SVD of ``s B A``, computed in float64 from thin QRs of ``B`` and ``A^T``
    and the SVD of the small ``r x r`` core (never the dense product), with canonical signs.
    The result depends on the product only, so the float32 Grams CLAIR forms from the stacked
    factors are the same whichever invertible ``R`` the client applied, ``(B R, R^-1 A)``: a
    client can no longer inflate its ``B`` to dominate the Gram of all clients' ``B``. Rank,
    scaling and dtype (float32 when both factors are float32, else float64) are kept; a zero
    scaling leaves the factors as sent (the update is zero, see :func:`is_zero`).
    """
    s = float(f.scaling)
    if s == 0.0:
        return f
    dtype = np.float32 if f.A.dtype == np.float32 and f.B.dtype == np.float32 else np.float64
    r = f.rank
    qb, rb = np.linalg.qr(f.B.astype(np.float64))
    qa, ra = np.linalg.qr(f.A.T.astype(np.float64))
    u, sv, vt = np.linalg.svd(rb @ ra.T, full_matrices=False)
    k = min(sv.size, r)
    left = qb @ u[:, :k]
    right = vt[:k] @ qa.T
    sign = _canonical_signs(left)
    root = np.sqrt(sv[:k] * abs(s))
    B = np.zeros((f.out_features, r))
    A = np.zeros((r, f.in_features))
    B[:, :k] = left * (sign * root / abs(s))  # B' A' = U S V^T = B A, and |s| B', A' both have
    A[:k] = (sign * root)[:, None] * right  # column / row norms sqrt(|s| S)
    return LoraFactors(B=B.astype(dtype), A=A.astype(dtype), scaling=s)


def validate_updates(updates: Mapping) -> tuple[list, list[str], dict[str, dict]]:
    """Client order, module names and validated factors (``[module][client]``).

    Raises
    ------
    ClairInputError
        Fewer than 3 clients, a module missing or extra at one client, a shape that differs
        between clients, or a bad array (see :func:`as_factors`).
    """
    if not isinstance(updates, Mapping) or len(updates) < 3:
        n = len(updates) if isinstance(updates, Mapping) else "no mapping"
        raise ClairInputError(f"CLAIR needs at least 3 clients, got {n}")
    cids = list(updates.keys())
    try:
        cids = sorted(cids)
    except TypeError:
        pass
    modules = sorted(str(m) for m in updates[cids[0]].keys()) if isinstance(updates[cids[0]], Mapping) else []
    if not modules:
        raise ClairInputError(f"client {cids[0]!r}: no modules (module: none)")
    out: dict[str, dict] = {m: {} for m in modules}
    for cid in cids:
        mods = updates[cid]
        if not isinstance(mods, Mapping):
            raise ClairInputError(f"client {cid!r}: updates must map module names to factors (module: all)")
        missing = set(modules) - set(mods.keys())
        extra = set(mods.keys()) - set(modules)
        if missing or extra:
            bad = sorted(missing or extra)[0]
            what = "missing" if missing else "not uploaded by other clients"
            raise ClairInputError(f"client {cid!r}, module {bad!r}: module {what}")
        for m in modules:
            out[m][cid] = as_factors(mods[m], cid, m)
    for m in modules:
        ref_cid = cids[0]
        shape = out[m][ref_cid].shape
        for cid in cids:
            if out[m][cid].shape != shape:
                raise ClairInputError(
                    f"client {cid!r}, module {m!r}: update shape {out[m][cid].shape} differs from "
                    f"{shape} of client {ref_cid!r}"
                )
    return cids, modules, out


def is_zero(f: LoraFactors) -> bool:
    """An update with no direction to test (a free-rider, an untrained adapter)."""
    return f.scaling == 0 or not np.any(f.A) or not np.any(f.B)
