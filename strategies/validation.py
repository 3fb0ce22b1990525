"""Server-side checks of an uploaded LoRA state dict before it is aggregated.

A malformed upload must cost only its sender: each check raises :class:`UpdateRejected`
with a reason that names the offending key, and the caller drops that client for the round.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from clair_flower.lora import LORA_A_SUFFIX, LORA_B_SUFFIX

Template = Mapping[str, tuple[int, ...]]


class UpdateRejected(ValueError):
    """An upload that cannot be used this round; the message says why."""


def template_of(state: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a reference state dict (the adapter the server sent)."""
    return {k: tuple(np.shape(v)) for k, v in state.items()}


def _check_keys(state: Mapping[str, np.ndarray], template: Template) -> None:
    missing = sorted(set(template) - set(state))
    extra = sorted(set(state) - set(template))
    if missing:
        raise UpdateRejected(f"missing LoRA keys: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    if extra:
        raise UpdateRejected(f"unexpected keys: {extra[:3]}{' ...' if len(extra) > 3 else ''}")


def _check_shape(key: str, got: tuple[int, ...], want: tuple[int, ...], any_rank: bool) -> None:
    if got == want:
        return
    if any_rank and len(got) == 2 and len(want) == 2:
        # A is (r, in), B is (out, r): the feature axis must match, the rank may differ.
        if key.endswith(LORA_A_SUFFIX) and got[1] == want[1] and got[0] > 0:
            return
        if key.endswith(LORA_B_SUFFIX) and got[0] == want[0] and got[1] > 0:
            return
    raise UpdateRejected(f"{key}: shape {got}, expected {want}")


def _check_rank_pairs(state: Mapping[str, np.ndarray]) -> None:
    for key, a in state.items():
        if key.endswith(LORA_A_SUFFIX):
            b = state.get(key[: -len(LORA_A_SUFFIX)] + LORA_B_SUFFIX)
            if b is not None and np.shape(b)[1] != np.shape(a)[0]:
                raise UpdateRejected(f"{key}: rank {np.shape(a)[0]} but its lora_B has rank {np.shape(b)[1]}")


def check_state(
    state: Mapping[str, np.ndarray], template: Template, *, any_rank: bool = False
) -> dict[str, np.ndarray]:
    """Validate an upload against the expected keys and shapes; return it as float32.

    ``any_rank`` lets a client use its own LoRA rank (CLAIR handles heterogeneous ranks);
    the feature dimensions must still match the model.
    """
    _check_keys(state, template)
    out: dict[str, np.ndarray] = {}
    for key, want in template.items():
        arr = np.asarray(state[key])
        if not np.issubdtype(arr.dtype, np.floating):
            raise UpdateRejected(f"{key}: dtype {arr.dtype}, expected a floating dtype")
        _check_shape(key, tuple(arr.shape), tuple(want), any_rank)
        if not np.all(np.isfinite(arr)):
            raise UpdateRejected(f"{key}: contains NaN or Inf")
        out[key] = arr.astype(np.float32, copy=False)
    if any_rank:
        _check_rank_pairs(out)
    return out


def state_norm(state: Mapping[str, np.ndarray]) -> float:
    """Euclidean norm of all arrays together, in float64 so large uploads cannot overflow."""
    return float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in state.values())))


def absurd_norms(norms: Sequence[float], ratio: float) -> list[int]:
    """Indices whose norm exceeds ``ratio`` times the median of the others.

    Meant as a sanity bound (``ratio`` of 100 or more), not as a robust aggregator: it only
    removes uploads no honest client could have produced. Needs at least three uploads.
    """
    if len(norms) < 3 or ratio <= 0:
        return []
    arr = np.asarray(norms, dtype=np.float64)
    out = []
    for i, n in enumerate(arr):
        med = float(np.median(np.delete(arr, i)))
        if med > 0 and n > ratio * med:
            out.append(i)
    return out
