"""Input checks: what ``run_clair`` accepts as one round of uploads."""

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
        return f
    dtype = np.float32 if arr.dtype == np.float32 else np.float64
    u, s, vt = np.linalg.svd(arr.astype(np.float64), full_matrices=False)
    r = max(1, int(np.sum(s > 1e-12 * (s[0] if s.size else 0.0))))
    root = np.sqrt(s[:r])
    return LoraFactors(B=(u[:, :r] * root).astype(dtype), A=(root[:, None] * vt[:r]).astype(dtype), scaling=1.0)


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
