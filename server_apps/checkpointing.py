"""Checkpoint and resume for the ServerApp: Flower's side of :mod:`clair_flower.server_apps.checkpoint_format`.

After every round the server state is saved under ``<output-dir>/checkpoints/``: the arrays
the next round starts from, and the strategy's own state (per-node adapters, flag history,
RoLoRA's phase counter). Per-node state is stored by ``partition-id``, because Flower assigns
new node ids in every run; a resumed run asks each node its partition with one QUERY message
(:func:`query_partitions`, answered by the ClientApp's ``@app.query()``) before its first round
and maps the state back onto the new node ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from clair_flower.server_apps.checkpoint_format import (CHECKPOINT_DIR, Checkpoint, CheckpointError, HasServerState,
                                     check_compatible, clear_checkpoints, latest_checkpoint,
                                     save_checkpoint)
from clair_flower.server_apps.run_config import RunConfig
from clair_flower.strategies.protocol import ASK, CONFIG_KEY, PARTITION_ID
from clair_flower.strategies.records import from_arrayrecord, to_arrayrecord

PARTITION_KEY = PARTITION_ID
# Run-config keys a resumed run may change: how long it runs, where, and resume itself.
MAY_DIFFER_ON_RESUME = ("resume", "num-server-rounds", "output-dir", "round-timeout")


def query_partitions(grid: Grid, node_ids: Iterable[int], timeout: float) -> dict[int, int]:
    """Ask every node its ``partition-id`` with one QUERY message each.

    Returns
    -------
    dict of int to int
        node id -> partition id, for every node in ``node_ids``.

    Raises
    ------
    CheckpointError
        If a node answers with an error, without a partition id, not at all, or two nodes
        claim the same partition; every such node is named.
    """
    node_ids = sorted(int(n) for n in node_ids)
    messages = [Message(RecordDict({CONFIG_KEY: ConfigRecord({ASK: PARTITION_KEY})}),
                        dst_node_id=nid, message_type=MessageType.QUERY, group_id="0")
                for nid in node_ids]
    partition_of: dict[int, int] = {}
    problems: list[str] = []
    for reply in grid.send_and_receive(messages, timeout=timeout):
        nid = int(reply.metadata.src_node_id)
        if reply.has_error():
            problems.append(f"node {nid}: {reply.error.reason}")
            continue
        values = [r[PARTITION_KEY] for r in reply.content.metric_records.values() if PARTITION_KEY in r]
        if len(values) != 1 or isinstance(values[0], list):
            problems.append(f"node {nid}: the reply holds no scalar '{PARTITION_KEY}'")
            continue
        partition_of[nid] = int(values[0])  # type: ignore[arg-type]
    silent = [n for n in node_ids if n not in partition_of and not any(p.startswith(f"node {n}:") for p in problems)]
    if silent:
        problems.append(f"no reply within {timeout:g} s from node(s) {silent}")
    by_partition: dict[int, list[int]] = {}
    for nid, pid in partition_of.items():
        by_partition.setdefault(pid, []).append(nid)
    problems += [f"nodes {sorted(ns)} all claim partition {pid}" for pid, ns in by_partition.items() if len(ns) > 1]
    if problems:
        raise CheckpointError("cannot resume: asking the nodes for their partition-id failed ("
                              + "; ".join(problems) + ")")
    return partition_of


class RoundCheckpoints:
    """The checkpoints of one run: save after each round, load and restore on resume.

    Parameters
    ----------
    out_dir : Path
        The run's output directory; checkpoints go to ``out_dir / "checkpoints"``.
    cfg : RunConfig
        The run's config, saved with every checkpoint and compared on resume.
    num_nodes : int
        Nodes the run started with (saved as information; a resumed run waits for as many).
    keep : int
        Checkpoints kept on disk (the newest ones).
    """

    def __init__(self, out_dir: Path, cfg: RunConfig, num_nodes: int = 0, keep: int = 2) -> None:
        self.directory = Path(out_dir) / CHECKPOINT_DIR
        self.cfg = cfg
        self.num_nodes = num_nodes
        self.keep = keep

    # -- resume ----------------------------------------------------------------------------
    def latest(self) -> Checkpoint | None:
        """The newest checkpoint, checked against this run's strategy and config.

        Raises
        ------
        CheckpointError
            If it is corrupt, from another strategy or run config, or further than
            ``num-server-rounds`` (which counts all rounds, not the ones still to run).
        """
        ckpt = latest_checkpoint(self.directory)
        if ckpt is None:
            return None
        check_compatible(ckpt, self.cfg.strategy, self.cfg.to_mapping(), MAY_DIFFER_ON_RESUME)
        if ckpt.round > self.cfg.num_server_rounds:
            raise CheckpointError(f"the checkpoint is at round {ckpt.round}, past num-server-rounds="
                                  f"{self.cfg.num_server_rounds}; num-server-rounds is the total "
                                  f"number of rounds: set it above {ckpt.round} to continue")
        return ckpt

    def clear(self) -> None:
        """Remove the checkpoints of an earlier run in this directory (a fresh start)."""
        removed = clear_checkpoints(self.directory)
        if removed:
            log(WARNING, "clair-flower: fresh run: removed %d old checkpoint file(s) from %s",
                removed, self.directory)

    def restore(self, strategy: Strategy, ckpt: Checkpoint, partition_of: Mapping[int, int]) -> ArrayRecord:
        """Put the checkpoint's state into ``strategy`` under the new node ids.

        Parameters
        ----------
        strategy : Strategy
            A freshly built strategy of the checkpoint's kind.
        ckpt : Checkpoint
            From :meth:`latest`.
        partition_of : mapping of int to int
            New node id -> partition id, from :func:`query_partitions`.

        Returns
        -------
        ArrayRecord
            The arrays the next round starts from.
        """
        node_of = {pid: nid for nid, pid in partition_of.items()}
        missing = sorted(ckpt.state.clients() - set(node_of))
        if missing:
            raise CheckpointError(
                f"cannot resume: partition(s) {missing} hold per-client state in the checkpoint "
                f"but no connected node reports them (connected: {sorted(node_of)}); start their "
                f"SuperNodes with --node-config 'partition-id=<i> num-partitions=<n>'")
        if not isinstance(strategy, HasServerState):
            raise CheckpointError(f"{type(strategy).__name__} cannot restore a checkpoint")
        strategy.restore_state(ckpt.state.rekeyed(node_of, "node"))
        return to_arrayrecord(ckpt.global_arrays)

    # -- save ------------------------------------------------------------------------------
    def save(self, server_round: int, arrays: ArrayRecord, strategy: Strategy,
             partition_of: Mapping[int, int]) -> None:
        """Checkpoint the state after ``server_round``; a state that cannot be saved is logged.

        ``partition_of`` maps the node ids of this run to partition ids (what the recorder
        learnt from the replies); per-node state is stored by partition id.
        """
        try:
            if not isinstance(strategy, HasServerState):
                raise CheckpointError(f"{type(strategy).__name__} has no export_state")
            state = strategy.export_state().rekeyed(partition_of, "partition-id (never reported)")
            ckpt = Checkpoint(round=server_round, strategy=self.cfg.strategy,
                              config=self.cfg.to_mapping(), global_arrays=from_arrayrecord(arrays),
                              state=state, info={"num-nodes": self.num_nodes})
            path = save_checkpoint(self.directory, ckpt, keep=self.keep)
        except CheckpointError as err:
            log(WARNING, "clair-flower: round %d not checkpointed: %s", server_round, err)
            return
        log(INFO, "clair-flower: checkpoint of round %d in %s", server_round, path)
