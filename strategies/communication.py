"""Communication accounting for every strategy of this package, once.

FlowerTune's ``FlowerTuneLlm`` strategy wraps FedAvg with a ``CommunicationTracker`` that
adds up the bytes of every ArrayRecord a train round sends and receives, logs the running
total in MB (``1024**2`` bytes) and warns past the leaderboard's 200,000 MB. Swapping in one
of this package's strategies must not lose that, so :class:`CommunicationTracker` does the
same for train *and* evaluate messages, both ways, and every strategy here holds one
(:class:`~clair_flower.strategies.base.LoraStrategy`,
:class:`~clair_flower.strategies.screened.ScreenedStrategy`).

What is counted is what FlowerTune's tracker counts: ``len(Array.data)`` of every array in
every ArrayRecord of a message (the serialised bytes, npy header included; ConfigRecords and
MetricRecords are left out). Replies that the screen later rejects are counted too: their
bytes were received. An error reply carries nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import WARNING

from flwr.app import Message
from flwr.supercore import log

MB = 1024**2
"""Bytes in FlowerTune's "MB" (its tracker divides by ``1024**2``)."""

STATE_KEY = "communication"
"""Key of the tracker's totals in :attr:`StrategyState.meta` (so a resumed run keeps counting)."""

# Round metrics a strategy adds to what its aggregate_train / aggregate_evaluate return.
BYTES_DOWN = "comm-bytes-down"
"""Bytes sent to the nodes in this phase (train or evaluate) of the round."""
BYTES_UP = "comm-bytes-up"
"""Bytes received from the nodes in this phase of the round."""
BYTES_DOWN_CUMULATIVE = "comm-bytes-down-cumulative"
BYTES_UP_CUMULATIVE = "comm-bytes-up-cumulative"
MB_CUMULATIVE = "comm-mb-cumulative"
"""Both directions, every round so far, in MB: the number FlowerTune's tracker logs."""


def message_bytes(message: Message) -> int:
    """Serialised array bytes one message carries (0 for an error reply or empty content).

    Never raises: a reply whose arrays cannot be measured counts the ones that can, so bad
    input from a client cannot take the round down here.
    """
    try:
        if message.has_error() or not message.has_content():
            return 0
        records = list(message.content.array_records.values())
    except Exception:  # noqa: BLE001 - a malformed reply counts as empty
        return 0
    total = 0
    for record in records:
        for array in record.values():
            data = getattr(array, "data", b"")
            if isinstance(data, (bytes, bytearray, memoryview)):
                total += len(data)
    return total


@dataclass
class RoundTraffic:
    """Bytes one round moved, per direction (train and evaluate phases together)."""

    down: int = 0
    up: int = 0


class CommunicationTracker:
    """Bytes up and down per round and in total, with an optional budget.

    Parameters
    ----------
    budget_mb : float, optional
        Total of both directions (in MB of ``1024**2`` bytes, as FlowerTune) past which one
        WARNING is logged; ``None``: no budget. FlowerTune's LLM leaderboard uses 200,000.

    Attributes
    ----------
    rounds : dict of int to RoundTraffic
        Every round's bytes down and up.
    bytes_down, bytes_up : int
        Totals over all rounds (a restored checkpoint's included).
    warned : bool
        The budget WARNING has been logged (it is logged once per run).
    """

    def __init__(self, budget_mb: float | None = None) -> None:
        if budget_mb is not None and not budget_mb > 0:
            raise ValueError(f"comm_budget_mb must be positive or None, got {budget_mb!r}")
        self.budget_mb = budget_mb
        self.rounds: dict[int, RoundTraffic] = {}
        self.bytes_down = 0
        self.bytes_up = 0
        self.warned = False
        self._phase = RoundTraffic()

    @property
    def total_mb(self) -> float:
        """Both directions, all rounds, in MB."""
        return (self.bytes_down + self.bytes_up) / MB

    def start_phase(self) -> None:
        """A ``configure_train`` / ``configure_evaluate`` call begins: :meth:`metrics` restarts."""
        self._phase = RoundTraffic()

    def sent(self, server_round: int, messages: Iterable[Message]) -> int:
        """Count messages sent to the nodes (what ``configure_*`` hands to Flower)."""
        n = sum(message_bytes(m) for m in messages)
        self._phase.down += n
        self.rounds.setdefault(server_round, RoundTraffic()).down += n
        self.bytes_down += n
        self._check_budget()
        return n

    def received(self, server_round: int, replies: Iterable[Message]) -> int:
        """Count replies received from the nodes (every one an ``aggregate_*`` call gets)."""
        n = sum(message_bytes(m) for m in replies)
        self._phase.up += n
        self.rounds.setdefault(server_round, RoundTraffic()).up += n
        self.bytes_up += n
        self._check_budget()
        return n

    def metrics(self) -> dict[str, int | float]:
        """This phase's bytes and the cumulative totals, as round metrics."""
        return {BYTES_DOWN: self._phase.down, BYTES_UP: self._phase.up,
                BYTES_DOWN_CUMULATIVE: self.bytes_down, BYTES_UP_CUMULATIVE: self.bytes_up,
                MB_CUMULATIVE: self.total_mb}

    def _check_budget(self) -> None:
        if self.budget_mb is None or self.warned or self.total_mb <= self.budget_mb:
            return
        self.warned = True
        log(WARNING, "Communication so far (%.2f MB: %.2f down, %.2f up) is past the budget of %g MB",
            self.total_mb, self.bytes_down / MB, self.bytes_up / MB, self.budget_mb)

    def summary(self) -> str:
        """What the strategy's ``summary()`` prints about the tracker."""
        return (f"budget {self.budget_mb:,g} MB" if self.budget_mb is not None else "no budget") + \
            " (bytes of every ArrayRecord, both ways, train and evaluate)"

    # -- checkpoint ----------------------------------------------------------------------------
    def state(self) -> dict[str, object]:
        """Totals, per-round traffic and the warning flag, as JSON values."""
        return {"bytes-down": self.bytes_down, "bytes-up": self.bytes_up, "warned": self.warned,
                "rounds": [[r, t.down, t.up] for r, t in sorted(self.rounds.items())]}

    def restore(self, state: object) -> None:
        """Take back :meth:`state`; a checkpoint without it (older code) starts from zero.

        A malformed entry is ignored with a WARNING: accounting never stops a resume.
        """
        if state is None:
            return
        try:
            if not isinstance(state, Mapping):
                raise TypeError(f"expected a mapping, got {type(state).__name__}")
            down, up = int(state["bytes-down"]), int(state["bytes-up"])  # type: ignore[call-overload]
            rounds = {int(r): RoundTraffic(int(d), int(u)) for r, d, u in state.get("rounds", [])}
            warned = bool(state.get("warned", False))
        except Exception as err:  # noqa: BLE001
            log(WARNING, "Checkpoint's communication totals unreadable (%s): counting from zero", err)
            return
        self.bytes_down, self.bytes_up, self.rounds, self.warned = down, up, rounds, warned
