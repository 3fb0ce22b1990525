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


_A_SUFFIX, _B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


def merge_delta(model: torch.nn.Module, delta: Mapping[str, np.ndarray]) -> None:
    """Add ``B @ A`` of each module of ``delta`` to that module's frozen base weight.

    ``delta`` has the adapter's key names and orientation (``lora_B.weight`` is ``out x r``,
    ``lora_A.weight`` is ``r x in``, any rank ``r``, no scaling). This is how a client takes
    the part of a refined update that its own rank cannot hold (a "merged delta"): the base
    layer absorbs it, the adapter keeps its rank and stays trainable. Everything is validated
    before any weight changes.

    Raises
    ------
    AdapterMismatchError
        Unpaired or unknown modules, shapes that do not fit the layer, non-finite values.
    """
    template = adapter_template(model)
    modules = sorted({k[: -len(_A_SUFFIX)] for k in delta if k.endswith(_A_SUFFIX)}
                     | {k[: -len(_B_SUFFIX)] for k in delta if k.endswith(_B_SUFFIX)})
    problems = [f"{k}: not a lora_A/lora_B key" for k in delta if not k.endswith((_A_SUFFIX, _B_SUFFIX))]
    pairs = {}
    for m in modules:
        a_key, b_key = m + _A_SUFFIX, m + _B_SUFFIX
        if a_key not in delta or b_key not in delta:
            problems.append(f"{m}: needs both lora_A and lora_B")
            continue
        if a_key not in template:
            problems.append(f"{m}: not an adapted module of this model")
            continue
        A, B = np.asarray(delta[a_key]), np.asarray(delta[b_key])
        out_f, in_f = template[b_key][0], template[a_key][1]
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != in_f or B.shape[0] != out_f or A.shape[0] != B.shape[1]:
            problems.append(f"{m}: expected B (out={out_f}, r) and A (r, in={in_f}), got {B.shape} and {A.shape}")
        elif not (np.all(np.isfinite(A)) and np.all(np.isfinite(B))):
            problems.append(f"{m}: contains NaN or Inf")
        else:
            pairs[m] = (B, A)
    if problems:
        raise AdapterMismatchError("merged delta does not match the model: " + "; ".join(problems))
    named = dict(model.named_modules())
    for m, (B, A) in pairs.items():
        layer = named[_module_name(m, named)]
        weight = layer.get_base_layer().weight
        dW = torch.as_tensor(B.astype(np.float64) @ A.astype(np.float64), dtype=weight.dtype)
        with torch.no_grad():
            weight += dW.T if getattr(layer, "fan_in_fan_out", False) else dW


def _module_name(key_prefix: str, named: Mapping[str, torch.nn.Module]) -> str:
    """The LoRA layer a state-dict prefix names (PEFT's keys drop the adapter name)."""
    if key_prefix in named:
        return key_prefix
    raise AdapterMismatchError(f"merged delta: no module {key_prefix!r} in the model")
