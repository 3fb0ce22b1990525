"""Server state of a strategy as plain arrays and JSON values, for checkpoints.

A strategy that can be checkpointed implements :class:`HasServerState`; the file format that
stores a :class:`StrategyState` lives with the ServerApp (``server_apps/checkpoint_format.py``).
Per-client state is keyed by a stable client identity in a checkpoint and by Flower node id
inside a running strategy; :meth:`StrategyState.rekeyed` translates.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

State = dict[str, np.ndarray]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, read or used; the message says which and why."""


@dataclass
class StrategyState:
    """The server state of one strategy, as plain arrays and JSON values.

    Attributes
    ----------
    shared : dict of str to state dict
        Named state dicts common to all clients (e.g. ``"consensus"``).
    per_client : dict of str to (dict of int to state dict)
        Named state dicts kept per client (e.g. ``"adapters"``), keyed by client identity.
    meta : dict of str to JSON value
        Scalars and small structures (e.g. RoLoRA's ``"completed-aggregations"``).
    per_client_meta : dict of str to (dict of int to JSON value)
        JSON values kept per client (e.g. CLAIR's ``"flag-history"``).
    """

    shared: dict[str, State] = field(default_factory=dict)
    per_client: dict[str, dict[int, State]] = field(default_factory=dict)
    meta: dict[str, object] = field(default_factory=dict)
    per_client_meta: dict[str, dict[int, object]] = field(default_factory=dict)

    def clients(self) -> set[int]:
        """Every client identity that holds some per-client state."""
        ids: set[int] = set()
        for by_client in (*self.per_client.values(), *self.per_client_meta.values()):
            ids.update(by_client)
        return ids

    def per_client_int_lists(self, name: str) -> dict[int, list[int]]:
        """``per_client_meta[name]`` as one list of integers per client (e.g. flag history).

        Raises
        ------
        CheckpointError
            If a client's value is not a list of integers.
        """
        return self._per_client_lists(name, (int,), "integers")

    def per_client_float_lists(self, name: str) -> dict[int, list[float]]:
        """``per_client_meta[name]`` as one list of floats per client (e.g. score history).

        Raises
        ------
        CheckpointError
            If a client's value is not a list of numbers.
        """
        return {c: [float(v) for v in vs] for c, vs in self._per_client_lists(name, (int, float), "numbers").items()}

    def _per_client_lists(self, name: str, kinds: tuple[type, ...], what: str) -> dict[int, list]:
        out: dict[int, list] = {}
        for cid, value in self.per_client_meta.get(name, {}).items():
            if not isinstance(value, list) or not all(isinstance(v, kinds) and not isinstance(v, bool) for v in value):
                raise CheckpointError(f"checkpoint '{name}' of client {cid} must be a list of {what}, got {value!r}")
            out[int(cid)] = list(value)
        return out

    def rekeyed(self, key_of: Mapping[int, int], what: str = "client") -> StrategyState:
        """The same state with every client key ``k`` replaced by ``key_of[k]``.

        Raises
        ------
        CheckpointError
            If a client holding state has no entry in ``key_of`` (named in the message), or
            two clients map to the same key.
        """
        missing = sorted(self.clients() - set(key_of))
        if missing:
            raise CheckpointError(f"no {what} known for {missing}: their per-client state "
                                  f"cannot be matched")
        used = [key_of[k] for k in self.clients()]
        if len(set(used)) != len(used):
            raise CheckpointError(f"two clients map to the same {what}: {sorted(used)}")
        return StrategyState(
            shared=dict(self.shared),
            per_client={n: {key_of[k]: s for k, s in by.items()} for n, by in self.per_client.items()},
            meta=dict(self.meta),
            per_client_meta={n: {key_of[k]: v for k, v in by.items()} for n, by in self.per_client_meta.items()},
        )


@runtime_checkable
class HasServerState(Protocol):
    """A strategy whose server state can be checkpointed and restored."""

    def export_state(self) -> StrategyState:
        """The state to save, per-client parts keyed by Flower node id."""

    def restore_state(self, state: StrategyState) -> None:
        """Replace the state with ``state`` (per-client parts keyed by node id)."""
