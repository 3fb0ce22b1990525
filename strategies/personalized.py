"""Base class for strategies that keep one LoRA adapter per node on the server.

FedAvg broadcasts one RecordDict to every node. Personalised strategies (local-only,
CLAIR) instead build one Message per node, each with its own RecordDict holding that node's
adapter. Replies are keyed by ``src_node_id`` since they arrive in any order. Sampling,
messages, the reply screen and the metric means are
:class:`~clair_flower.strategies.base.LoraStrategy`'s.

Per-client ranks without client changes
---------------------------------------
A FlowerTune ClientApp calls ``set_peft_model_state_dict`` on whatever it receives, which fails
on an adapter of another rank. So every node is sent an adapter at *its own* rank, from its
first round on:

* **Rank probe.** Before a node's first train round (a node with no stored adapter and no
  known rank), the strategy sends it one TRAIN message with an *empty* ArrayRecord and the
  round's config (``rank_probe=True``, the default). PEFT loads nothing from an empty state
  dict, so the client trains from its own initialisation and replies with its adapter; the
  reply's shapes give its rank, per module (PEFT's ``rank_pattern`` included). The probe's
  training is discarded: it costs one local round per new node, once. A node that cannot
  answer it (an error reply, a client that requires every key, wrong shapes) is sent the
  global adapter at the global rank, as without the probe.
* **Its own rank afterwards.** A node with a stored adapter gets that adapter. A node of known
  rank without one (after the probe, or after a round whose aggregation kept no adapter)
  gets the consensus re-factored to its rank and scaling (:func:`refactor_to_rank`).
* **Scaling.** ``dW = s B A`` with ``s = lora_alpha / r`` (``/ sqrt(r)`` under rsLoRA). A
  client's ``lora_alpha`` and rsLoRA are read from what its replies report (``"lora-alpha"``,
  ``"use-rslora"`` in the MetricRecord or a ConfigRecord, :mod:`clair_flower.strategies.protocol`);
  the constructor's ``lora_alpha`` / ``use_rslora`` apply to clients that report nothing
  and to the global adapter.
* **Global adapter.** What a round returns to Flower (the Result's arrays, what a FlowerTune
  ``evaluate_fn`` loads into the server's model) is the consensus at ``global_rank``: by
  default the rank of the initial arrays given to ``start``.
"""

from __future__ import annotations

import math
import zlib
from abc import abstractmethod
from collections.abc import Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from clair_flower.clair.refinement import lowrank_svd
from clair_flower.lora import (LORA_A_SUFFIX, LoraFactors, factors_from_state_dict,
                               factors_to_state_dict, lora_scaling, refactor_lowrank)
from clair_flower.strategies.base import LoraStrategy, State, weighted_mean_state
from clair_flower.strategies.protocol import LORA_ALPHA, SERVER_ROUND, USE_RSLORA
from clair_flower.strategies.records import from_arrayrecord, to_arrayrecord
from clair_flower.strategies.screen import Template, UpdateRejected, declared_shapes, template_of
from clair_flower.strategies.state import CheckpointError, StrategyState
from clair_flower.strategies.uploads import ScreenReport, Upload

__all__ = ["PersonalizedLoraStrategy", "State", "module_ranks", "refactor_to_rank", "weighted_mean_state"]

Ranks = dict[str, int]
"""Module name -> LoRA rank."""


def module_ranks(shapes: Mapping[str, tuple[int, ...]]) -> Ranks:
    """Each LoRA module's rank, from the shapes of a PEFT state dict (``lora_A`` is ``(r, in)``)."""
    return {k[: -len(LORA_A_SUFFIX)]: int(v[0]) for k, v in shapes.items() if k.endswith(LORA_A_SUFFIX)}


def refactor_to_rank(factors: LoraFactors, rank: int, scaling: float, *, seed: int = 0) -> LoraFactors:
    """The same update ``dW = s B A`` as LoRA factors of another rank and scaling.

    The best rank-``rank`` approximation of ``dW`` (exact when ``rank`` is at least the rank
    of ``dW``), singular values split evenly between the factors. Directions ``dW`` does not
    use get ``B`` columns of zero and ``A`` rows drawn as PEFT initialises ``lora_A``
    (uniform in ``±1/sqrt(in_features)``), so the adapter still trains in all ``rank``
    directions; with ``B = 0`` (a fresh PEFT adapter) the result is a fresh adapter of that rank.
    """
    dtype = factors.A.dtype
    svd = lowrank_svd(factors.B.astype(np.float64), factors.A.astype(np.float64))
    s = svd.s * factors.scaling
    out, _ = refactor_lowrank(svd.left, np.diag(s), svd.right, rank, scaling, dtype=np.float64)
    top = float(s.max(initial=0.0))
    used = min(rank, int(np.sum(s > 1e-6 * top))) if top > 0 else 0  # below: float32 round-off
    A, B = out.A.copy(), out.B.copy()
    if used < rank:
        bound = 1.0 / math.sqrt(A.shape[1])
        A[used:] = np.random.default_rng(seed).uniform(-bound, bound, size=(rank - used, A.shape[1]))
        B[:, used:] = 0.0
    return LoraFactors(B=B.astype(dtype), A=A.astype(dtype), scaling=float(scaling))


def _reported(replies_records: list[Mapping[str, object]]) -> tuple[float | None, bool | None, list[str]]:
    """``lora-alpha`` and ``use-rslora`` from a reply's records (first record that has one);
    problems are returned as text, never raised."""
    alpha: float | None = None
    rslora: bool | None = None
    problems: list[str] = []
    for record in replies_records:
        if alpha is None and LORA_ALPHA in record:
            value = record[LORA_ALPHA]
            if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)) \
                    and math.isfinite(float(value)) and float(value) > 0:
                alpha = float(value)
            else:
                problems.append(f"'{LORA_ALPHA}' must be a positive number, got {value!r}")
        if rslora is None and USE_RSLORA in record:
            value = record[USE_RSLORA]
            if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, float, np.integer, np.floating))
                                                       and float(value) in (0.0, 1.0)):
                rslora = bool(value)
            else:
                problems.append(f"'{USE_RSLORA}' must be true/false or 1/0, got {value!r}")
    return alpha, rslora, problems


class PersonalizedLoraStrategy(LoraStrategy):
    """Send every node its own adapter, at its own rank; subclasses decide how uploads update them.

    Parameters
    ----------
    lora_alpha : float, optional
        PEFT ``lora_alpha`` of the global adapter, and of every client that reports none.
        ``None``: every adapter's alpha is taken to be the same (only ratios of scalings
        are then used, which do not depend on it).
    use_rslora : bool
        rsLoRA scaling (``alpha / sqrt(r)``) for the global adapter and clients that report
        nothing.
    global_rank : int, optional
        Rank of the adapter returned to Flower (every module). ``None``: the rank of each
        module in the initial arrays given to ``start``, which is the rank of the server-side
        model a FlowerTune ``evaluate_fn`` loads it into.
    rank_probe : bool
        Learn a new node's rank before its first round from its reply to an empty adapter
        (see the module docstring). ``False``: a new node gets the global adapter, which
        only fits clients of the global rank.
    **kwargs
        :class:`~clair_flower.strategies.base.LoraStrategy`'s (sampling, record keys, screen,
        ``comm_budget_mb``); the default screen accepts any rank.
    """

    def __init__(self, *, lora_alpha: float | None = None, use_rslora: bool = False,
                 global_rank: int | None = None, rank_probe: bool = True, **kwargs: Any) -> None:
        if global_rank is not None and (isinstance(global_rank, bool) or not isinstance(global_rank, int)
                                        or global_rank < 1):
            raise ValueError(f"global_rank must be a positive int or None, got {global_rank!r}")
        if lora_alpha is not None and not (math.isfinite(lora_alpha) and lora_alpha > 0):
            raise ValueError(f"lora_alpha must be positive, got {lora_alpha!r}")
        kwargs.setdefault("any_rank", True)
        super().__init__(**kwargs)
        self.lora_alpha = None if lora_alpha is None else float(lora_alpha)
        self.use_rslora = bool(use_rslora)
        self.global_rank = global_rank
        self.rank_probe = rank_probe
        self.adapters: dict[int, State] = {}
        self.consensus: State | None = None
        self.node_ranks: dict[int, Ranks] = {}
        """Node id -> its rank per module (from the probe or its latest accepted upload)."""
        self.node_alpha: dict[int, float] = {}
        """Node id -> the ``lora-alpha`` it reported (others use :attr:`lora_alpha`)."""
        self.node_rslora: dict[int, bool] = {}
        """Node id -> the ``use-rslora`` it reported (others use :attr:`use_rslora`)."""

    # -- what subclasses provide -------------------------------------------------------
    @abstractmethod
    def update_adapters(self, server_round: int, uploads: list[Upload]) -> dict[str, object]:
        """Fold this round's accepted uploads into ``self.adapters``/``self.consensus``.

        Returns the round's strategy metrics (plain python values).
        """

    # -- scalings --------------------------------------------------------------------------
    def alpha_of(self, node_id: int) -> float | None:
        """The node's ``lora_alpha``: reported, else the constructor's (``None``: unknown)."""
        return self.node_alpha.get(node_id, self.lora_alpha)

    def rslora_of(self, node_id: int) -> bool:
        """The node's rsLoRA flag: reported, else the constructor's."""
        return self.node_rslora.get(node_id, self.use_rslora)

    def scaling_of(self, node_id: int | None, rank: int, *, like: int | None = None) -> float:
        """PEFT scaling of ``node_id``'s adapter at ``rank`` (``None``: the global adapter).

        An unknown alpha is that of ``like`` (the other side of a conversion), so that with
        no alpha known anywhere the ratio of two scalings is right whatever the common alpha.
        """
        alpha = self.lora_alpha if node_id is None else self.alpha_of(node_id)
        if alpha is None:
            alpha = self.alpha_of(like) if like is not None else None
        rslora = self.use_rslora if node_id is None else self.rslora_of(node_id)
        return lora_scaling(1.0 if alpha is None else alpha, rank, rslora)

    def as_factors(self, upload: Upload) -> dict[str, LoraFactors]:
        """One upload's LoRA factors per module, with its client's scaling."""
        alpha = self.alpha_of(upload.node_id)
        return factors_from_state_dict(upload.state, 1.0 if alpha is None else alpha,
                                       self.rslora_of(upload.node_id))

    def to_global(self, factors: Mapping[str, LoraFactors]) -> State:
        """Factors of any rank and scaling as the global adapter: :attr:`global_ranks`, global scaling."""
        ranks = self.global_ranks
        out = {}
        for name, f in factors.items():
            r = ranks.get(name, f.rank)
            s = self.scaling_of(None, r)
            # Already in global form (every client at the global rank and alpha): kept bit for bit.
            out[name] = f if r == f.rank and math.isclose(s, f.scaling) else refactor_to_rank(f, r, s, seed=_seed(name))
        return factors_to_state_dict(out)

    @property
    def global_ranks(self) -> Ranks:
        """Rank per module of the global adapter (``global_rank``, else the initial arrays')."""
        assert self.consensus is not None, "configure_train sets the consensus first"
        ranks = module_ranks(template_of(self.consensus))
        return {m: self.global_rank for m in ranks} if self.global_rank is not None else ranks

    # -- checkpoint ----------------------------------------------------------------------
    def export_state(self) -> StrategyState:
        """Per-node adapters, the consensus and what nodes reported, for a checkpoint.

        Returns
        -------
        StrategyState
            ``per_client["adapters"]`` keyed by node id, ``shared["consensus"]`` once set, the
            reported ``lora-alpha`` / ``use-rslora`` of nodes with an adapter in
            ``per_client_meta``, the communication totals in ``meta``.
        """
        state = super().export_state()
        if self.consensus is not None:
            state.shared["consensus"] = dict(self.consensus)
        state.per_client["adapters"] = {n: dict(s) for n, s in self.adapters.items()}
        # Only nodes with an adapter: the others may never have named their partition.
        state.per_client_meta[LORA_ALPHA] = {n: a for n, a in self.node_alpha.items() if n in self.adapters}
        state.per_client_meta[USE_RSLORA] = {n: int(b) for n, b in self.node_rslora.items() if n in self.adapters}
        return state

    def restore_state(self, state: StrategyState) -> None:
        """Take back the adapters, consensus and reported settings of :meth:`export_state` (node ids remapped)."""
        super().restore_state(state)
        self.adapters = {int(n): dict(s) for n, s in state.per_client.get("adapters", {}).items()}
        consensus = state.shared.get("consensus")
        self.consensus = dict(consensus) if consensus is not None else None
        self.node_ranks = {n: module_ranks(template_of(a)) for n, a in self.adapters.items()}
        alphas, flags = state.per_client_meta.get(LORA_ALPHA, {}), state.per_client_meta.get(USE_RSLORA, {})
        problems = [p for key, by_node in ((LORA_ALPHA, alphas), (USE_RSLORA, flags))
                    for v in by_node.values() for p in _reported([{key: v}])[2]]
        if problems:
            raise CheckpointError(f"checkpoint per-client LoRA settings: {problems[0]}")
        self.node_alpha = {int(n): float(v) for n, v in alphas.items()}  # type: ignore[arg-type]
        self.node_rslora = {int(n): bool(v) for n, v in flags.items()}

    # -- LoraStrategy's hooks ------------------------------------------------------------
    def adapter_for(self, node_id: int) -> State:
        """The adapter a node starts from: its own; else the consensus at its rank and scaling
        if its rank is known; else the consensus (global rank)."""
        if node_id in self.adapters:
            return self.adapters[node_id]
        assert self.consensus is not None, "configure_train sets the consensus first"
        ranks = self.node_ranks.get(node_id)
        if ranks is None:
            return self.consensus
        factors = factors_from_state_dict(self.consensus, 1.0, self.use_rslora)  # scaling set below
        out = {}
        for name, f in factors.items():
            g = f.rank
            f = LoraFactors(B=f.B, A=f.A, scaling=self.scaling_of(None, g, like=node_id))
            r = ranks.get(name, g)
            s = self.scaling_of(node_id, r, like=None)
            if r == g and math.isclose(s, f.scaling):
                out[name] = f
            else:
                out[name] = refactor_to_rank(f, r, s, seed=_seed(name))
        return factors_to_state_dict(out)

    def begin_train(self, server_round: int, arrays: ArrayRecord) -> None:
        if self.consensus is None:
            self.consensus = from_arrayrecord(arrays)
            if self.global_rank is not None and any(
                    r != self.global_rank for r in module_ranks(template_of(self.consensus)).values()):
                self.consensus = self.to_global(self._initial_factors())

    begin_evaluate = begin_train

    def _initial_factors(self) -> dict[str, LoraFactors]:
        """The initial arrays as factors with the global alpha (at their own rank)."""
        assert self.consensus is not None
        alpha = 1.0 if self.lora_alpha is None else self.lora_alpha
        return factors_from_state_dict(self.consensus, alpha, self.use_rslora)

    def before_train(self, server_round: int, node_ids: list[int], config: ConfigRecord, grid: Grid) -> None:
        """The rank probe: an empty adapter to every sampled node whose rank is unknown."""
        new = [n for n in node_ids if n not in self.adapters and n not in self.node_ranks]
        if not self.rank_probe or not new:
            return
        cfg = {**dict(config), SERVER_ROUND: server_round, **self.train_config(server_round)}
        probes = [Message(RecordDict({self.arrayrecord_key: ArrayRecord(), self.configrecord_key: ConfigRecord(cfg)}),
                          dst_node_id=n, message_type=MessageType.TRAIN, group_id=str(server_round)) for n in new]
        try:
            replies = self.exchange(server_round, grid, probes)
        except Exception as err:  # noqa: BLE001 - the probe is optional: never the round's end
            log(WARNING, "Rank probe, round %d, failed (%s: %s): new nodes get the global adapter",
                server_round, type(err).__name__, err)
            return
        self.observe_replies(server_round, replies)
        template = self.train_template(server_round)
        failed: dict[int, str] = {n: "no reply" for n in new}
        for msg in replies:
            nid = int(msg.metadata.src_node_id)
            if nid not in failed:
                continue
            try:
                if msg.has_error():
                    raise UpdateRejected(f"error reply: {msg.error.reason}")
                record = msg.content.array_records[self.arrayrecord_key]
                self.node_ranks[nid] = module_ranks(declared_shapes(record, template, any_rank=True))
                del failed[nid]
            except Exception as err:  # noqa: BLE001 - a bad probe reply costs its sender only
                failed[nid] = str(err) if isinstance(err, UpdateRejected) else f"{type(err).__name__}: {err}"
        # One INFO line: a client that cannot load an empty adapter (this project's own, which
        # checks every key) simply keeps the global rank, as without the probe.
        known = {n: sorted(set(self.node_ranks[n].values())) for n in new if n in self.node_ranks}
        tail = ""
        if failed:
            first = failed[min(failed)]
            tail = (f"; nodes {sorted(failed)} gave none and get the global adapter "
                    f"(node {min(failed)}: {first[:160]})")
        log(INFO, "Rank probe, round %d: LoRA ranks %s%s", server_round, known or "none", tail)

    def observe_replies(self, server_round: int, replies: list[Message]) -> None:
        """Take each reply's reported ``lora-alpha`` / ``use-rslora`` (bad values: WARNING, ignored)."""
        for msg in replies:
            nid = int(msg.metadata.src_node_id)
            try:
                if msg.has_error() or not msg.has_content():
                    continue
                content = msg.content
                records: list[Mapping[str, object]] = []
                if self.metricrecord_key in content.metric_records:
                    records.append(content.metric_records[self.metricrecord_key])
                records += [r for k, r in content.metric_records.items() if k != self.metricrecord_key]
                records += list(content.config_records.values())
                alpha, rslora, problems = _reported(records)
            except Exception as err:  # noqa: BLE001 - a malformed reply is the screen's business
                alpha, rslora, problems = None, None, [f"{type(err).__name__}: {err}"]
            for problem in problems:
                log(WARNING, "Node %d: %s; its LoRA scaling keeps the default", nid, problem)
            if alpha is not None:
                self.node_alpha[nid] = alpha
            if rslora is not None:
                self.node_rslora[nid] = rslora

    def node_arrays(self, node_id: int, arrays: ArrayRecord) -> ArrayRecord:
        return to_arrayrecord(self.adapter_for(node_id))

    def train_plan(self, server_round: int) -> str:
        return ", each with its own adapter"

    def train_template(self, server_round: int) -> Template:
        assert self.consensus is not None, "configure_train sets the consensus first"
        return template_of(self.consensus)

    def aggregate_uploads(self, server_round: int, report: ScreenReport
                          ) -> tuple[ArrayRecord | None, dict[str, object]]:
        metrics: dict[str, object] = dict(report.metrics())
        for up in report.accepted:
            self.node_ranks[up.node_id] = module_ranks(template_of(up.state))
        if report.accepted:
            metrics.update(self.update_adapters(server_round, report.accepted))
            metrics.update(self.train_metric_means(report.accepted))
        assert self.consensus is not None
        return to_arrayrecord(self.consensus), metrics

    def summary(self) -> None:
        alpha = "as each client" if self.lora_alpha is None else f"{self.lora_alpha:g}"
        log(INFO, "\t├──> Per-client adapters: global rank %s, lora_alpha %s%s (clients' reports take "
            "precedence), rank probe %s", self.global_rank or "of the initial arrays", alpha,
            " (rsLoRA)" if self.use_rslora else "", "on" if self.rank_probe else "off")
        super().summary()


def _seed(name: str) -> int:
    """A fixed seed per module name (Python's ``hash`` of a str changes between processes)."""
    return zlib.crc32(name.encode())
