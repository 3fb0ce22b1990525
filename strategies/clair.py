"""CLAIR as a Flower strategy: detect contaminated clients, send each benign one its own
subspace-refined adapter.

Drop-in for any project whose ClientApp follows the FlowerTune convention: the reply holds
``ArrayRecord(get_peft_model_state_dict(model))`` under ``"arrays"`` and a MetricRecord with
``"num-examples"`` under ``"metrics"``. LoRA modules are parsed from the state-dict keys, so
any PEFT model, any target modules and per-client ranks work unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
from flwr.app import Message
from flwr.supercore import log

from clair_flower.clair import ClairConfig, ClairResult, run_clair
from clair_flower.lora import factors_from_state_dict, factors_to_state_dict
from strategies.personalized import PersonalizedLoraStrategy
from strategies.screen import ReplyScreen, template_of
from strategies.state import StrategyState
from strategies.uploads import Upload

DECISIONS = ("vote", "fallback", "none")
"""Which rule decided a round's flags (see :attr:`clair_flower.clair.ClairResult.decision`)."""


@dataclass(frozen=True)
class Detection:
    """Per-node detection outcome of one CLAIR run (no aggregation)."""

    flagged: frozenset[int]
    votes: dict[int, float]
    scores: dict[int, float]
    rejected: dict[int, str]
    result: ClairResult | None


class ClairStrategy(PersonalizedLoraStrategy):
    """Contamination-aware aggregation of LoRA adapters (CLAIR).

    Parameters
    ----------
    lora_alpha : float
        PEFT ``lora_alpha`` of the clients, so that ``dW_k = (alpha / r_k) B_k A_k``.
    use_rslora : bool
        Clients use rsLoRA scaling ``alpha / sqrt(r_k)``.
    rank : int or None
        ``r_hat``, the rank of the shared subspace; ``None`` picks it from the singular gap.
    solver : {"fast", "reference"}
        Exact reduced solver, or the cvxpy reference (small problems only).
    lam : "auto" or float
        Penalty of the block-sparse part; "auto" is the scale-free data-driven selection.
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
        Add the robust median/MAD test on in-subspace coefficients (CLAIR+), which also
        catches sign flip, scaling and IPM.
    """

    def __init__(self, *, lora_alpha: float, use_rslora: bool = False, rank: int | None = None,
                 solver: str = "fast", form: str = "constrained", lam: str | float = "auto",
                 flag_threshold: float | None = None, vote_threshold: float = 0.5,
                 flagged_policy: str = "consensus", no_structure: str = "mean",
                 in_subspace_stage: bool = False,
                 pairs: str = "all", seed: int = 0, max_norm_ratio: float = 1e3,
                 fraction_train: float = 1.0, fraction_evaluate: float = 1.0,
                 min_train_nodes: int = 3, min_evaluate_nodes: int = 2,
                 min_available_nodes: int = 3) -> None:
        super().__init__(fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
                         min_train_nodes=min_train_nodes, min_evaluate_nodes=min_evaluate_nodes,
                         min_available_nodes=min_available_nodes,
                         screen=ReplyScreen(any_rank=True, max_norm_ratio=max_norm_ratio))
        self.lora_alpha = float(lora_alpha)
        self.use_rslora = use_rslora
        cfg_kwargs: dict[str, object] = dict(rank=rank, solver=solver, form=form, lam=lam,
                                             pairs=pairs, vote_threshold=vote_threshold,
                                             flagged_policy=flagged_policy, no_structure=no_structure,
                                             in_subspace_stage=in_subspace_stage, seed=seed)
        if flag_threshold is not None:
            cfg_kwargs["flag_threshold"] = flag_threshold
        self.config = ClairConfig(**cfg_kwargs)  # type: ignore[arg-type]
        self.flag_history: dict[int, list[int]] = {}
        self.score_z_history: dict[int, list[float]] = {}

    def summary(self) -> None:
        c = self.config
        log(INFO, "\t├──> CLAIR: lora_alpha %g%s, r_hat %s, solver %s (%s form), lambda %s",
            self.lora_alpha, " (rsLoRA)" if self.use_rslora else "", c.rank or "auto (gap)",
            c.solver, c.form, c.lam)
        log(INFO, "\t├──> Detection: pairs %s, flag threshold %s, vote > %.2f, in-subspace stage %s",
            c.pairs, c.flag_threshold, c.vote_threshold, c.in_subspace_stage)
        log(INFO, "\t├──> Flagged clients get: %s; trusted clients of a round without structure: %s",
            c.flagged_policy, c.no_structure)
        super().summary()

    # -- checkpoint ------------------------------------------------------------------------
    def export_state(self) -> StrategyState:
        """Adapters and consensus (see the base class), plus every node's flag and score histories."""
        state = super().export_state()
        state.per_client_meta["flag-history"] = {n: list(h) for n, h in self.flag_history.items()}
        state.per_client_meta["score-z-history"] = {n: list(h) for n, h in self.score_z_history.items()}
        return state

    def restore_state(self, state: StrategyState) -> None:
        """Take back adapters, consensus, flag and score histories (node ids remapped)."""
        super().restore_state(state)
        self.flag_history = state.per_client_int_lists("flag-history")
        self.score_z_history = state.per_client_float_lists("score-z-history")

    # -- detection alone -------------------------------------------------------------------
    def _run(self, uploads: list[Upload], prior_z: dict[int, list[float]] | None = None) -> ClairResult:
        updates = {u.node_id: factors_from_state_dict(u.state, self.lora_alpha, self.use_rslora)
                   for u in uploads}
        return run_clair(updates, self.config, prior_z)

    def detect(self, replies: Iterable[Message]) -> Detection:
        """Flags and scores of the nodes in ``replies``, without aggregating anything.

        Replies are screened against their own first usable state dict's keys, so this works
        on replies from any project without a prior ``configure_train``.
        """
        replies = list(replies)
        template = template_of(self.consensus) if self.consensus is not None else _first_template(replies, self.screen)
        report = self.screen.train(replies, template)
        result = self._run(report.accepted)
        return Detection(frozenset(result.flagged),
                         {k: float(c.vote) for k, c in result.clients.items()},
                         {k: float(c.score) for k, c in result.clients.items()},
                         dict(report.rejected), result)

    # -- aggregation -----------------------------------------------------------------------
    def update_adapters(self, server_round: int, uploads: list[Upload]) -> dict[str, object]:
        if len(uploads) < 3:
            log(WARNING, "CLAIR needs at least 3 usable uploads, got %d: adapters kept as they were",
                len(uploads))
            return {"clair-fallback": 1, "num-flagged": 0}
        t0 = time.perf_counter()
        try:
            result = self._run(uploads, self.score_z_history)
        except Exception as err:  # noqa: BLE001 - a failed solve must not end the ServerApp
            # Documented fallback: every stored adapter stays as it was for this round.
            log(WARNING, "CLAIR failed this round (%s: %s): adapters kept as they were",
                type(err).__name__, err)
            return {"clair-fallback": 1, "num-flagged": 0}
        seconds = time.perf_counter() - t0
        log(INFO, "CLAIR round %d: decided by %s, flagged %s, trusted clients get %s, %.2f s", server_round,
            result.decision, sorted(result.flagged) or "none", result.diagnostics.get("trusted_get", "refined"),
            seconds)
        for nid, client in result.clients.items():
            self.adapters[nid] = factors_to_state_dict(client.refined)
            self.flag_history.setdefault(nid, []).append(int(client.flagged))
            self.score_z_history.setdefault(nid, []).append(float(client.score_z))
        self.consensus = factors_to_state_dict(result.consensus)
        return self._round_metrics(result, uploads, seconds)

    def _round_metrics(self, result: ClairResult, uploads: list[Upload], seconds: float) -> dict[str, object]:
        nids = [u.node_id for u in uploads]
        diag = result.diagnostics
        trunc = [max(result.clients[n].truncation_error.values(), default=0.0) for n in nids]
        lams = [float(m.diagnostics.get("lam", float("nan"))) for m in result.modules.values()]
        statuses = [str(m.diagnostics.get("status", "")) for m in result.modules.values()]
        ok = all(s.startswith("optimal") or s == "converged" for s in statuses)
        if not ok:
            log(WARNING, "CLAIR solver status this round: %s", sorted(set(statuses)))
        return {
            "clair-fallback": 0,
            **{f"decided-by-{d}": int(result.decision == d) for d in DECISIONS},
            "num-flagged": len(result.flagged),
            "flagged-node-ids": sorted(result.flagged),
            "node-ids": nids,
            "votes": [float(result.clients[n].vote) for n in nids],
            "scores": [float(result.clients[n].score) for n in nids],
            "lambda": float(np.nanmedian(lams)) if lams else float("nan"),
            "solver-ok": int(ok),
            "solver-seconds": float(diag.get("seconds", seconds)),
            "clair-seconds": float(seconds),
            "max-truncation-error": float(max(trunc, default=0.0)),
        }


def _first_template(replies: list[Message], screen: ReplyScreen) -> dict[str, tuple[int, ...]]:
    """Keys and declared shapes of the first reply carrying an ArrayRecord under the screen's
    key (read from the arrays' headers: nothing is decoded outside the screen)."""
    for msg in replies:
        if not msg.has_error() and screen.arrayrecord_key in msg.content.array_records:
            return {k: tuple(v.shape) for k, v in msg.content.array_records[screen.arrayrecord_key].items()}
    return {}

