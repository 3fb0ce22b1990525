"""Move a PEFT adapter in and out of a model as float32 numpy arrays, with validation.

Keys are PEFT's own (``get_peft_model_state_dict``), the FlowerTune convention, so any
Flower strategy that reads ``ArrayRecord(get_peft_model_state_dict(model))`` interoperates.
:func:`set_adapter_arrays` validates everything *before* touching the model, so a bad
upload or downlink never leaves a half-updated adapter.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict


class AdapterMismatchError(ValueError):
    """Arrays that do not fit the model's adapter (keys, shapes, dtype or values)."""


def get_adapter_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The adapter's state dict as float32 numpy copies, PEFT key names."""
    sd = get_peft_model_state_dict(model)
    return {k: v.detach().cpu().to(torch.float32).numpy().copy() for k, v in sd.items()}


def adapter_template(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Key -> expected shape of the model's adapter."""
    return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}


def validate_adapter_arrays(
    template: Mapping[str, tuple[int, ...]], arrays: Mapping[str, np.ndarray], strict: bool = True
) -> None:
    """Raise :class:`AdapterMismatchError` naming every offending key.

    ``strict=False`` tolerates missing keys (a partial update, e.g. only ``B`` in RoLoRA);
    extra keys, bad shapes, non-float dtypes and non-finite values are always errors.
    """
    problems: list[str] = []
    missing = sorted(set(template) - set(arrays))
    extra = sorted(set(arrays) - set(template))
    if missing and strict:
        problems.append(f"missing keys: {missing}")
    if extra:
        problems.append(f"unexpected keys: {extra}")
    for key in sorted(set(template) & set(arrays)):
        arr = np.asarray(arrays[key])
        if tuple(arr.shape) != tuple(template[key]):
            problems.append(f"{key}: expected shape {tuple(template[key])}, got {tuple(arr.shape)}")
        elif not np.issubdtype(arr.dtype, np.floating):
            problems.append(f"{key}: expected a float array, got dtype {arr.dtype}")
        elif not np.all(np.isfinite(arr)):
            problems.append(f"{key}: contains NaN or Inf")
    if problems:
        raise AdapterMismatchError("adapter arrays do not match the model: " + "; ".join(problems))


def set_adapter_arrays(
    model: torch.nn.Module, arrays: Mapping[str, np.ndarray], strict: bool = True
) -> None:
    """Validate ``arrays`` against the model's adapter, then load them into it."""
    template = adapter_template(model)
    validate_adapter_arrays(template, arrays, strict=strict)
    current = get_peft_model_state_dict(model)
    sd = {k: torch.as_tensor(np.asarray(arrays[k]), dtype=current[k].dtype) for k in arrays}
    if not strict:
        sd = {**{k: v.detach().clone() for k, v in current.items()}, **sd}
    result = set_peft_model_state_dict(model, sd)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise AdapterMismatchError(f"PEFT did not accept keys: {unexpected}")
