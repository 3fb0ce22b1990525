"""CLAIR as a Flower strategy: detect contaminated clients, send each benign one its own
subspace-refined adapter.

Drop-in for any project whose ClientApp follows the FlowerTune convention: the reply holds
``ArrayRecord(get_peft_model_state_dict(model))`` under ``"arrays"`` and a MetricRecord with
``"num-examples"`` under ``"metrics"``. LoRA modules are parsed from the state-dict keys, so
any PEFT model, any target modules and per-client ranks work unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO

from flwr.app import ArrayRecord, Message
from flwr.supercore import log

from clair_flower.clair import ClairConfig, ClairResult, run_clair
from clair_flower.clair.downlink import merged_deltas
from clair_flower.lora import delta_state_dict, factors_to_state_dict
from clair_flower.strategies.clair_aggregator import DECISIONS, ClairAggregator, UsesClairAggregator, clair_config
from clair_flower.strategies.personalized import PersonalizedLoraStrategy
from clair_flower.strategies.protocol import ARRAYS_KEY, CONFIG_KEY, DOWNLINKS, MERGED_DELTA_KEY, METRICS_KEY
from clair_flower.strategies.records import to_arrayrecord
from clair_flower.strategies.screen import ReplyScreen, template_of
from clair_flower.strategies.state import State, StrategyState
from clair_flower.strategies.uploads import Upload

__all__ = ["DECISIONS", "DOWNLINKS", "ClairStrategy", "Detection"]


@dataclass(frozen=True)
class Detection:
    """Per-node detection outcome of one CLAIR run (no aggregation)."""

    flagged: frozenset[int]
    votes: dict[int, float]
    scores: dict[int, float]
    rejected: dict[int, str]
    result: ClairResult | None


class ClairStrategy(UsesClairAggregator, PersonalizedLoraStrategy):
    """Contamination-aware aggregation of LoRA adapters (CLAIR).

    Parameters
    ----------
    lora_alpha : float
        PEFT ``lora_alpha`` of the global adapter and of every client that does not report its
        own (``"lora-alpha"`` in its reply), so that ``dW_k = (alpha_k / r_k) B_k A_k``.
    use_rslora : bool
        rsLoRA scaling ``alpha / sqrt(r_k)``, for the global adapter and clients that do not
        report ``"use-rslora"``.
    global_rank : int, optional
        Rank of the adapter returned to Flower (the Result's arrays, what a FlowerTune
        ``evaluate_fn`` loads); ``None``: the initial arrays' rank. Each node is sent an adapter
        at its own rank whatever this is.
    rank_probe : bool
        Learn a new node's rank before its first round (an empty adapter, see
        :mod:`clair_flower.strategies.personalized`), so mixed-rank FlowerTune clients work
        unchanged; ``False``: new nodes get the global adapter.
    config : ClairConfig, optional
        Every CLAIR setting at once; then the CLAIR keyword arguments below stay at their
        defaults (:func:`clair_flower.strategies.clair_aggregator.clair_config`).
    rank : int or None
        ``r_hat``, the rank of the shared subspace; ``None`` picks it from the singular gap.
    solver : {"fast", "reference"}
        Exact reduced solver, or the cvxpy reference (small problems only).
    c : "auto" or float
        The constant of the block-sparse penalty ``lam = c / sqrt(|P|)`` on the normalised
        stack; "auto" chooses it along the path that spans the program's transition.
    flag_threshold, vote_threshold : float
        A pair is flagged when its sparse block exceeds ``flag_threshold`` relative to the
        block scale; a client when more than ``vote_threshold`` of its pairs are flagged.
    flagged_policy : {"consensus", "local", "zero"}
        What a flagged client is sent back; its upload is never used for anyone else.
    no_structure : {"mean", "own", "refine"}
        What the trusted clients get in a round whose decomposition found no structure (the
        vote decided nothing): the trusted clients' mean, their own update, or the subspace
        refinement anyway.
    in_subspace_stage : bool
        Add CLAIR+'s second stage: a robust median/MAD test on the in-subspace coefficients
        (scaling) and a direction test, a negative outlying median cosine to the other clients
        (sign flip, IPM; docs/DESIGN.md, "Adaptive attackers").
    downlink : {"own-rank", "merged-delta"}
        ``"own-rank"``: each client gets its refined update re-factored at its own rank (what a
        plain PEFT client loads; the round's ``max-truncation-error`` says how much is lost).
        ``"merged-delta"``: lossless; besides that adapter, each client gets the rest of its
        refined update in an ArrayRecord ``merged_delta_key`` (``lora_A``/``lora_B`` keys of
        any rank, no scaling) and adds ``lora_B @ lora_A`` to each module's base weight before
        loading the adapter (:func:`clair_flower.copytask.peft_io.merge_delta`).
    merged_delta_key : str
        Name of that ArrayRecord (default ``"merged-delta"``).
    form, pairs, seed
        As in :class:`~clair_flower.clair.ClairConfig`.
    max_norm_ratio, fraction_train, ..., min_available_nodes, arrayrecord_key, ..., comm_budget_mb
        :class:`~clair_flower.strategies.base.LoraStrategy`'s (at least 3 nodes by default); the screen
        accepts any LoRA rank.
    """

    def __init__(self, *, lora_alpha: float, use_rslora: bool = False, global_rank: int | None = None,
                 rank_probe: bool = True, config: ClairConfig | None = None,
                 rank: int | None = None, solver: str = "fast", form: str = "constrained",
                 c: str | float = "auto", flag_threshold: float | None = None, vote_threshold: float = 0.5,
                 flagged_policy: str = "consensus", no_structure: str = "mean",
                 in_subspace_stage: bool = False, pairs: str = "all", seed: int = 0,
                 downlink: str = "own-rank", merged_delta_key: str = MERGED_DELTA_KEY,
                 max_norm_ratio: float = 1e3, fraction_train: float = 1.0, fraction_evaluate: float = 1.0,
                 min_train_nodes: int = 3, min_evaluate_nodes: int = 2, min_available_nodes: int = 3,
                 arrayrecord_key: str = ARRAYS_KEY, configrecord_key: str = CONFIG_KEY,
                 metricrecord_key: str = METRICS_KEY, comm_budget_mb: float | None = None) -> None:
        super().__init__(lora_alpha=lora_alpha, use_rslora=use_rslora, global_rank=global_rank,
                         rank_probe=rank_probe, fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
                         min_train_nodes=min_train_nodes, min_evaluate_nodes=min_evaluate_nodes,
                         min_available_nodes=min_available_nodes, max_norm_ratio=max_norm_ratio,
                         any_rank=True, arrayrecord_key=arrayrecord_key, configrecord_key=configrecord_key,
                         metricrecord_key=metricrecord_key, comm_budget_mb=comm_budget_mb)
        cfg = clair_config(config, rank=rank, solver=solver, form=form, c=c, pairs=pairs,
                           flag_threshold=flag_threshold, vote_threshold=vote_threshold,
                           flagged_policy=flagged_policy, no_structure=no_structure,
                           in_subspace_stage=in_subspace_stage, seed=seed)
        self.clair = ClairAggregator(cfg, label="CLAIR", fallback="adapters kept as they were")
        if downlink not in DOWNLINKS:
            raise ValueError(f"downlink must be one of {', '.join(DOWNLINKS)}, got {downlink!r}")
        self.downlink = downlink
        self.merged_delta_key = merged_delta_key
        self.deltas: dict[int, State] = {}

    @property
    def score_z_history(self) -> dict[int, list[float]]:
        """Every node's score z, one per CLAIR round it took part in."""
        return self.clair.score_z_history

    def summary(self) -> None:
        c = self.config
        log(INFO, "\t├──> CLAIR: r_hat %s, solver %s (%s form), lambda %s",
            c.rank or "auto (gap)", c.solver, c.form, c.c)
        log(INFO, "\t├──> Detection: pairs %s, flag threshold %s, vote > %.2f, in-subspace stage %s",
            c.pairs, c.flag_threshold, c.vote_threshold, c.in_subspace_stage)
        log(INFO, "\t├──> Flagged clients get: %s; trusted clients of a round without structure: %s; "
            "downlink %s", c.flagged_policy, c.no_structure, self.downlink)
        super().summary()

    # -- checkpoint ------------------------------------------------------------------------
    def export_state(self) -> StrategyState:
        """Adapters and consensus (see the base class), plus every node's flag and score histories."""
        state = super().export_state()
        state.per_client_meta["flag-history"] = {n: list(h) for n, h in self.flag_history.items()}
        state.per_client_meta["score-z-history"] = {n: list(h) for n, h in self.score_z_history.items()}
        if self.deltas:
            state.per_client["merged-deltas"] = {n: dict(d) for n, d in self.deltas.items()}
        return state

    def restore_state(self, state: StrategyState) -> None:
        """Take back adapters, consensus, flag and score histories (node ids remapped)."""
        super().restore_state(state)
        self.clair.flag_history = state.per_client_int_lists("flag-history")
        self.clair.score_z_history = state.per_client_float_lists("score-z-history")
        self.deltas = {int(n): dict(d) for n, d in state.per_client.get("merged-deltas", {}).items()}

    # -- detection alone -------------------------------------------------------------------
    def detect(self, replies: Iterable[Message]) -> Detection:
        """Flags and scores of the nodes in ``replies``, without aggregating anything.

        Replies are screened against their own first usable state dict's keys, so this works
        on replies from any project without a prior ``configure_train``.
        """
        replies = list(replies)
        template = template_of(self.consensus) if self.consensus is not None else _first_template(replies, self.screen)
        report = self.screen.train(replies, template)
        result = run_clair({u.node_id: self.as_factors(u) for u in report.accepted}, self.config)
        return Detection(frozenset(result.flagged),
                         {k: float(c.vote) for k, c in result.clients.items()},
                         {k: float(c.score) for k, c in result.clients.items()},
                         dict(report.rejected), result)

    # -- aggregation -----------------------------------------------------------------------
    def update_adapters(self, server_round: int, uploads: list[Upload]) -> dict[str, object]:
        # A fallback round keeps every stored adapter as it was (see ClairAggregator).
        result, metrics = self.clair.run(server_round, uploads, self.as_factors)
        if result is not None:
            for nid, client in result.clients.items():
                self.adapters[nid] = factors_to_state_dict(client.refined)
            self.consensus = self.to_global(result.consensus)  # global rank and scaling
            if self.downlink == "merged-delta":
                metrics.update(self._merged_deltas(uploads, result))
        return metrics

    def _merged_deltas(self, uploads: list[Upload], result: ClairResult) -> dict[str, object]:
        """Keep each client's merged delta (sent with its adapter until the next CLAIR round)."""
        deltas, losses = merged_deltas({u.node_id: self.as_factors(u) for u in uploads}, result,
                                       self.config.flagged_policy)
        for nid, per_module in deltas.items():
            self.deltas[nid] = delta_state_dict(per_module)
        ranks = [d.rank for per in deltas.values() for d in per.values()]
        return {"refit-norm-loss": float(max((v for per in losses.values() for v in per.values()), default=0.0)),
                "merged-delta-max-rank": int(max(ranks, default=0))}

    def node_extra_records(self, node_id: int) -> dict[str, ArrayRecord]:
        if self.downlink != "merged-delta" or node_id not in self.deltas:
            return {}
        return {self.merged_delta_key: to_arrayrecord(self.deltas[node_id])}


def _first_template(replies: list[Message], screen: ReplyScreen) -> dict[str, tuple[int, ...]]:
    """Keys and declared shapes of the first reply carrying an ArrayRecord under the screen's
    key (read from the arrays' headers: nothing is decoded outside the screen)."""
    for msg in replies:
        if not msg.has_error() and screen.arrayrecord_key in msg.content.array_records:
            return {k: tuple(v.shape) for k, v in msg.content.array_records[screen.arrayrecord_key].items()}
    return {}

