"""Local-only fine-tuning: the baseline with no collaboration at all."""

from __future__ import annotations

from logging import INFO

from flwr.supercore import log

from clair_flower.strategies.personalized import PersonalizedLoraStrategy
from clair_flower.strategies.uploads import Upload


class LocalOnly(PersonalizedLoraStrategy):
    """Each node keeps training its own adapter; nothing is aggregated.

    The server only stores every node's adapter between rounds, so a node restarted by the
    runtime (a fresh ClientApp process each message) resumes where it stopped. The global
    arrays stay the initial adapter (at ``global_rank`` if given). Parameters are
    :class:`~clair_flower.strategies.personalized.PersonalizedLoraStrategy`'s (``global_rank``,
    ``rank_probe``, ``lora_alpha``, ...) and :class:`~clair_flower.strategies.base.LoraStrategy`'s.
    """

    def update_adapters(self, server_round: int, uploads: list[Upload]) -> dict[str, object]:
        for up in uploads:
            self.adapters[up.node_id] = up.state
        return {}

    def summary(self) -> None:
        log(INFO, "\t├──> LocalOnly: no aggregation, one adapter kept per node")
        super().summary()
