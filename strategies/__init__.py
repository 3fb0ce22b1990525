"""clair-flower's Flower strategies, installed as :mod:`clair_flower.strategies`.

``from clair_flower.strategies import ClairStrategy`` (and the names in ``__all__``) works from the
package; each name is imported from its module on first use, so importing one module of this package
(the ClientApp imports only :mod:`clair_flower.strategies.protocol`) does not import every strategy.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ClairStrategy": "clair",
    "ClairRoLoRA": "clair_rolora",
    "RoLoRA": "rolora",
    "FFALoRA": "ffa_lora",
    "LocalOnly": "local",
    "LoraStrategy": "base",
    "PersonalizedLoraStrategy": "personalized",
    "ScreenedStrategy": "screened",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
