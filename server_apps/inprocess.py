"""An in-process Grid: the real ServerApp logic and ClientApp, without Ray or a SuperLink.

Each message is handed to the ClientApp in the same process with a per-node Context, so a
whole federation runs in seconds. It backs the fast tests and the experiment grid; the
headline results are also run through ``flwr run`` on Ray to show both paths agree.
Exceptions in a ClientApp become error replies, as the Flower runtime does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity  # private API: flwr pinned to 1.41.*

from clair_flower.strategies.protocol import NUM_PARTITIONS, PARTITION_ID

SERVER_NODE_ID = 0
CLIENT_EXCEPTION = 500


def set_task_identity(run_id: int = 1) -> None:
    """Messages read the run and node from TaskIdentity, which only the runtime sets."""
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SERVER_NODE_ID


class InProcessGrid(Grid):
    """Deliver every message to ``client_app`` in-process; nodes are ``1 .. N``.

    ``drop`` decides, per (round, node), that a node misses a round (a dropout).
    ``node_ids`` replaces the default ids ``1 .. N`` (one per node config), e.g. to give a
    resumed run new ids, as Flower's runtime does.
    """

    def __init__(self, client_app: ClientApp, node_configs: list[dict[str, Any]],
                 run_config: Mapping[str, Any], *, run_id: int = 1,
                 drop: Callable[[int, int], bool] | None = None,
                 node_ids: list[int] | None = None) -> None:
        set_task_identity(run_id)
        ids = list(range(1, len(node_configs) + 1)) if node_ids is None else [int(n) for n in node_ids]
        if len(ids) != len(node_configs) or len(set(ids)) != len(ids) or SERVER_NODE_ID in ids:
            raise ValueError(f"node_ids must be {len(node_configs)} distinct ids other than "
                             f"{SERVER_NODE_ID}, got {node_ids}")
        self.client_app = client_app
        self.run_config = dict(run_config)
        self.contexts = {nid: Context(run_id=run_id, node_id=nid, node_config=dict(nc),
                                      state=RecordDict(), run_config=dict(run_config))
                         for nid, nc in zip(ids, node_configs)}
        self.drop = drop
        self._run = None

    def set_run(self, run: Any) -> None:  # noqa: ANN401 - flwr's Run
        self._run = run

    @property
    def run(self) -> Any:  # noqa: ANN401
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("InProcessGrid delivers synchronously: use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("InProcessGrid delivers synchronously: use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        # Node order fixed, so aggregation sums in the same order every run (bit-reproducible).
        for msg in sorted(messages, key=lambda m: m.metadata.dst_node_id):
            nid = msg.metadata.dst_node_id
            if self.drop is not None and self.drop(int(msg.metadata.group_id or 0), nid):
                continue
            try:
                replies.append(self.client_app(msg, self.contexts[nid]))
            except Exception as err:  # noqa: BLE001 - the runtime turns any failure into an error reply
                replies.append(Message(Error(code=CLIENT_EXCEPTION, reason=f"{type(err).__name__}: {err}"),
                                       reply_to=msg))
        return replies


def simulation_node_configs(num_nodes: int) -> list[dict[str, Any]]:
    """What Flower's simulation injects into each node's config."""
    return [{PARTITION_ID: i, NUM_PARTITIONS: num_nodes} for i in range(num_nodes)]
