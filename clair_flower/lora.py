"""LoRA factors as plain numpy: parse PEFT state dicts, form dense updates, re-factor.

Everything here is framework-free so the CLAIR math and the Flower strategies share one
definition of what a LoRA module is. The orientation is always PEFT's: ``lora_A.weight`` is
``(r, in_features)``, ``lora_B.weight`` is ``(out_features, r)`` and the update is
``dW = scaling * B @ A`` of shape ``(out_features, in_features)``. GPT-2 ``Conv1D`` layers
store their base weight transposed (``fan_in_fan_out``), but their LoRA factors follow the
same convention, so ``dW`` is still ``(out, in)`` and equals the transpose of the change in
the ``Conv1D`` weight.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"


class LoraFormatError(ValueError):
    """A state dict that is not a well-formed set of LoRA factors."""


@dataclass(frozen=True, kw_only=True)
class LoraFactors:
    """One adapted module of one client: ``dW = scaling * B @ A``.

    Keyword-only, in the order of the product (``LoraFactors(B=B, A=A, scaling=s)``): ``A`` and
    ``B`` are easy to swap and a square module would not notice.
    """

    B: np.ndarray
    A: np.ndarray
    scaling: float

    def __post_init__(self) -> None:
        if self.A.ndim != 2 or self.B.ndim != 2:
            raise LoraFormatError(
                f"LoRA factors must be 2-D, got A {self.A.shape} and B {self.B.shape}"
            )
        if self.A.shape[0] != self.B.shape[1]:
            raise LoraFormatError(
                f"rank mismatch: A is {self.A.shape} (r, in) but B is {self.B.shape} (out, r)"
            )

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the dense update, ``(out_features, in_features)``."""
        return (self.out_features, self.in_features)

    def dense(self) -> np.ndarray:
        """The update ``scaling * B @ A``; use only where ``out x in`` fits in memory."""
        return self.scaling * (self.B @ self.A)

    @property
    def nbytes(self) -> int:
        return int(self.A.nbytes + self.B.nbytes)


def lora_scaling(lora_alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` under rsLoRA."""
    if rank <= 0:
        raise LoraFormatError(f"LoRA rank must be positive, got {rank}")
    return float(lora_alpha / math.sqrt(rank)) if use_rslora else float(lora_alpha / rank)


def lora_module_names(state_dict: Mapping[str, object]) -> list[str]:
    """Sorted names of the modules that carry both LoRA factors.

    A key without its partner (``lora_A`` but no ``lora_B``) is an error, since a half
    adapter cannot be interpreted.
    """
    a_mods = {k[: -len(LORA_A_SUFFIX)] for k in state_dict if k.endswith(LORA_A_SUFFIX)}
    b_mods = {k[: -len(LORA_B_SUFFIX)] for k in state_dict if k.endswith(LORA_B_SUFFIX)}
    if a_mods != b_mods:
        missing = sorted(a_mods ^ b_mods)
        raise LoraFormatError(f"modules with only one of lora_A/lora_B: {missing[:5]}")
    return sorted(a_mods)


def factors_from_state_dict(
    state_dict: Mapping[str, np.ndarray],
    lora_alpha: float,
    use_rslora: bool = False,
) -> dict[str, LoraFactors]:
    """Split a PEFT LoRA state dict into per-module factors.

    The rank of each module is read from its shapes, so clients may use different ranks;
    the scaling follows from ``lora_alpha`` and that rank, as PEFT computes it.
    """
    out: dict[str, LoraFactors] = {}
    for name in lora_module_names(state_dict):
        a = np.asarray(state_dict[name + LORA_A_SUFFIX])
        b = np.asarray(state_dict[name + LORA_B_SUFFIX])
        if a.ndim != 2 or b.ndim != 2:
            raise LoraFormatError(f"{name}: factors must be 2-D, got {a.shape} and {b.shape}")
        out[name] = LoraFactors(B=b, A=a, scaling=lora_scaling(lora_alpha, a.shape[0], use_rslora))
    if not out:
        raise LoraFormatError("no LoRA modules (keys ending in .lora_A.weight) found")
    return out


def factors_to_state_dict(factors: Mapping[str, LoraFactors]) -> dict[str, np.ndarray]:
    """Inverse of :func:`factors_from_state_dict` (the scaling is implied by the rank)."""
    sd: dict[str, np.ndarray] = {}
    for name, f in factors.items():
        sd[name + LORA_A_SUFFIX] = f.A
        sd[name + LORA_B_SUFFIX] = f.B
    return sd


def delta_state_dict(factors: Mapping[str, LoraFactors]) -> dict[str, np.ndarray]:
    """A delta as adapter-shaped arrays with the scaling folded into ``B`` (``B @ A`` is the
    delta), at least rank 1 (a zero column) so every module has arrays a client can read."""
    sd: dict[str, np.ndarray] = {}
    for name, f in factors.items():
        B, A = f.scaling * f.B, f.A
        if f.rank == 0:
            B, A = np.zeros((f.out_features, 1), f.B.dtype), np.zeros((1, f.in_features), f.A.dtype)
        sd[name + LORA_A_SUFFIX] = np.ascontiguousarray(A)
        sd[name + LORA_B_SUFFIX] = np.ascontiguousarray(B.astype(f.B.dtype))
    return sd


def refactor(
    dW: np.ndarray, rank: int, scaling: float, dtype: np.dtype | type = np.float32
) -> tuple[LoraFactors, float]:
    """Best rank-``rank`` LoRA factors of a dense update, and the relative truncation error.

    Truncated SVD with the singular values split evenly (``B = U sqrt(S)``,
    ``A = sqrt(S) V^T``) so neither factor dominates the next round of training, and the
    scaling divided out so that ``scaling * B @ A`` approximates ``dW``.
    """
    if rank <= 0:
        raise LoraFormatError(f"target rank must be positive, got {rank}")
    u, s, vt = np.linalg.svd(np.asarray(dW, dtype=np.float64), full_matrices=False)
    k = min(rank, s.size)
    root = np.sqrt(s[:k] / scaling)
    b = np.zeros((dW.shape[0], rank))
    a = np.zeros((rank, dW.shape[1]))
    b[:, :k] = u[:, :k] * root
    a[:k, :] = root[:, None] * vt[:k]
    total = float(np.sqrt(np.sum(s**2)))
    err = float(np.sqrt(np.sum(s[k:] ** 2)) / total) if total > 0 else 0.0
    return LoraFactors(B=b.astype(dtype), A=a.astype(dtype), scaling=float(scaling)), err


def refactor_lowrank(
    left: np.ndarray, core: np.ndarray, right: np.ndarray, rank: int, scaling: float,
    dtype: np.dtype | type = np.float32,
) -> tuple[LoraFactors, float]:
    """:func:`refactor` for ``dW = left @ core @ right`` without forming ``dW``.

    ``left`` (out x m) and ``right`` (n x in) need orthonormal columns / rows; then the SVD
    of the small ``core`` gives that of ``dW``, which is how large modules stay cheap.
    """
    u, s, vt = np.linalg.svd(np.asarray(core, dtype=np.float64), full_matrices=False)
    k = min(rank, s.size)
    root = np.sqrt(s[:k] / scaling)
    b = np.zeros((left.shape[0], rank))
    a = np.zeros((rank, right.shape[1]))
    b[:, :k] = (left @ u[:, :k]) * root
    a[:k, :] = root[:, None] * (vt[:k] @ right)
    total = float(np.sqrt(np.sum(s**2)))
    err = float(np.sqrt(np.sum(s[k:] ** 2)) / total) if total > 0 else 0.0
    return LoraFactors(B=b.astype(dtype), A=a.astype(dtype), scaling=float(scaling)), err
