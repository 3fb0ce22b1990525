"""FFA-LoRA: federated LoRA with ``A`` frozen at its random initialisation.

Sun et al., ICLR 2024 ("Improving LoRA in privacy-preserving federated learning"). Only ``B``
is trained, uploaded and averaged; with ``A`` identical everywhere, ``mean_k(B_k) A`` is the
exact mean of the clients' updates, and the uplink carries ``B`` alone. It is RoLoRA whose
phase never leaves ``B``, so all the machinery (screening, weighting, messages) is shared.
"""

from __future__ import annotations

from logging import INFO
from typing import Any

from flwr.supercore import log

from clair_flower.strategies.base import LoraStrategy
from clair_flower.strategies.protocol import FACTOR_B
from clair_flower.strategies.rolora import RoLoRA


class FFALoRA(RoLoRA):
    """RoLoRA with a fixed phase: every round trains and aggregates ``B`` only.

    Parameters are RoLoRA's, less ``first_factor``.
    """

    def __init__(self, **kwargs: Any) -> None:
        if "first_factor" in kwargs:
            raise TypeError("FFALoRA always trains B; it takes no first_factor")
        super().__init__(first_factor=FACTOR_B, **kwargs)

    def current_factor(self) -> str:
        """Always ``B``: ``A`` stays at its (shared, seeded) random initialisation."""
        return FACTOR_B

    def summary(self) -> None:
        log(INFO, "\t├──> FFA-LoRA: A frozen at initialisation, only B trained, uploaded and averaged")
        LoraStrategy.summary(self)
