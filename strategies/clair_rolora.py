"""CLAIR on RoLoRA's upload: one LoRA factor per round, screened for contamination.

Clients alternate as in :class:`~clair_flower.strategies.rolora.RoLoRA` (B first) and upload only the
factor they trained. The server completes each upload with the factor it holds into a LoRA
update, ``dW_k = s * B_k @ A`` in a B round (``dW_k = s * B @ A_k`` in an A round), runs
:func:`clair_flower.clair.run_clair` on those, drops the flagged clients, and averages the
*refined* trained factor of the others (weighted by num-examples) into the broadcast adapter.

Re-projection onto the shared factor
------------------------------------
CLAIR returns each client's refined update ``dW~_k`` as LoRA factors of its own. Only the
trained factor may change, so ``dW~_k`` is mapped back by least squares on the frozen one::

    B round:  B~_k = dW~_k A^+ / s        A round:  A~_k = B^+ dW~_k / s

(``^+`` the Moore-Penrose pseudo-inverse, computed on the ``r``-sized factors, never on the
dense update). This is exact when ``dW~_k``'s row space lies in ``rowspan(A)`` (column space
in ``colspan(B)``). CLAIR's refinement is a projection of the updates plus a mean of
them, so it stays in that space; the relative residual is reported each round
(``max-reprojection-residual``) to show it. The refined factors of the last CLAIR round are kept
per node in :attr:`ClairRoLoRA.refined` (personalised variants); the broadcast stays shared, as
RoLoRA's exactness needs one frozen factor for everyone.

What CLAIR can and cannot detect in this mode
---------------------------------------------
* With ``A`` shared, every ``dW_k`` of a B round has its row space in ``rowspan(A)`` (``r``
  dimensions). Pairwise differences ``s (B_j - B_k) A`` then differ only in the B-column space:
  CLAIR compares the clients' ``B_k`` through a fixed lens. Symmetrically an A round compares
  ``A_k`` through ``colspan(B)``.
* An attack confined to ``A`` (or needing input directions outside ``rowspan(A)``, e.g. a
  trigger token's embedding direction) cannot be sent at all in a B round: the client can only
  upload ``B`` (a reply carrying ``A`` keys is rejected by the screen). It shows up only in the
  following A round, so evidence is split across rounds and each round sees half of it.
  Flags are per round; :attr:`ClairRoLoRA.flag_history` keeps them across rounds.
* Attacks that stay inside the benign span (scaling, sign flip, inner-product manipulation)
  leave no off-subspace block: as for CLAIR on full adapters, they need ``in_subspace_stage``.
* The shared subspace CLAIR recovers has rank at most ``r`` here; one module's stack of
  differences is at most rank ``r`` on the frozen side, so a small ``rank`` (``r_hat``) is
  natural, and a contaminated client that mimics the benign ``B`` column space is undetectable
  in that round by construction.
* With fewer than 3 usable uploads, or if CLAIR fails, the round is skipped (no aggregation, so
  the phase does not advance; see the parity rule in :mod:`clair_flower.strategies.rolora`).
"""

from __future__ import annotations

from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.supercore import log

from clair_flower.clair import ClairConfig
from clair_flower.lora import LORA_A_SUFFIX, LORA_B_SUFFIX, LoraFactors, lora_module_names, lora_scaling
from clair_flower.strategies.base import LoraStrategy, State, weighted_mean_state
from clair_flower.strategies.clair_aggregator import ClairAggregator, UsesClairAggregator, clair_config
from clair_flower.strategies.protocol import FACTOR_A, FACTOR_B
from clair_flower.strategies.rolora import RoLoRA
from clair_flower.strategies.state import StrategyState
from clair_flower.strategies.uploads import Upload


def _gram_norm(left: np.ndarray, right: np.ndarray) -> float:
    """``||left @ right||_F`` from the two small Gram matrices (no dense product)."""
    l64, r64 = left.astype(np.float64), right.astype(np.float64)
    return float(np.sqrt(max(np.sum((l64.T @ l64) * (r64 @ r64.T)), 0.0)))


def reproject(refined: LoraFactors, frozen: np.ndarray, factor: str, scaling: float
              ) -> tuple[np.ndarray, float]:
    """Least-squares trained factor reproducing ``refined`` with ``frozen`` held fixed.

    Returns the factor and the relative residual ``||dW~ - s * B~ A|| / ||dW~||`` (zero when
    the refined update lies in the frozen factor's row / column space).
    """
    fb, fa = refined.B.astype(np.float64), refined.A.astype(np.float64)
    fr = frozen.astype(np.float64)
    ratio = refined.scaling / scaling
    if factor == FACTOR_B:  # frozen is A (r x in)
        core = fa @ np.linalg.pinv(fr)                   # r_ref x r
        new = ratio * fb @ core
        residual = _gram_norm(fb, fa - core @ fr)
    else:              # frozen is B (out x r)
        core = np.linalg.pinv(fr) @ fb                   # r x r_ref
        new = ratio * core @ fa
        residual = _gram_norm(fb - fr @ core, fa)
    total = _gram_norm(fb, fa)
    return new.astype(np.float32), residual / total if total > 0 else 0.0


class ClairRoLoRA(UsesClairAggregator, RoLoRA):
    """RoLoRA whose per-round aggregation of the trained factor goes through CLAIR.

    Parameters
    ----------
    lora_alpha, use_rslora : float, bool
        The clients' PEFT scaling, so that ``dW_k = s B_k A`` with ``s = alpha / r``.
    config : ClairConfig, optional
        Every CLAIR setting at once; then the CLAIR keyword arguments stay at their defaults.
    rank, solver, form, c, flag_threshold, vote_threshold, in_subspace_stage, pairs, seed
        CLAIR settings, as in :class:`clair_flower.strategies.clair.ClairStrategy`.
    **kwargs
        RoLoRA's sampling, keys and screen settings (``min_train_nodes`` defaults to 3).
    """

    def __init__(self, *, lora_alpha: float, use_rslora: bool = False, config: ClairConfig | None = None,
                 rank: int | None = None, solver: str = "fast", form: str = "constrained",
                 c: str | float = "auto", flag_threshold: float | None = None, vote_threshold: float = 0.5,
                 in_subspace_stage: bool = False, pairs: str = "all", seed: int = 0,
                 min_train_nodes: int = 3, min_available_nodes: int = 3, **kwargs: Any) -> None:
        super().__init__(min_train_nodes=min_train_nodes, min_available_nodes=min_available_nodes, **kwargs)
        self.lora_alpha = float(lora_alpha)
        self.use_rslora = use_rslora
        cfg = clair_config(config, rank=rank, solver=solver, form=form, c=c, pairs=pairs,
                           flag_threshold=flag_threshold, vote_threshold=vote_threshold,
                           in_subspace_stage=in_subspace_stage, seed=seed)
        self.clair = ClairAggregator(cfg, label="CLAIR-RoLoRA", fallback="round skipped",
                                     use_score_history=False)
        self.refined: dict[int, State] = {}

    def summary(self) -> None:
        c = self.config
        log(INFO, "\t├──> CLAIR-RoLoRA: alternating factors (B first), CLAIR on s*B_k@A / s*B@A_k")
        log(INFO, "\t├──> CLAIR: lora_alpha %g%s, r_hat %s, solver %s, lambda %s, in-subspace stage %s",
            self.lora_alpha, " (rsLoRA)" if self.use_rslora else "", c.rank or "auto (gap)", c.solver,
            c.c, c.in_subspace_stage)
        LoraStrategy.summary(self)

    # -- checkpoint --------------------------------------------------------------------
    def export_state(self) -> StrategyState:
        """RoLoRA's phase counter, plus every node's refined factors and flag history."""
        state = super().export_state()
        state.per_client["refined"] = {n: dict(s) for n, s in self.refined.items()}
        state.per_client_meta["flag-history"] = {n: list(h) for n, h in self.flag_history.items()}
        return state

    def restore_state(self, state: StrategyState) -> None:
        """Take back the phase counter, refined factors and flag history (node ids remapped)."""
        super().restore_state(state)
        self.refined = {int(n): dict(s) for n, s in state.per_client.get("refined", {}).items()}
        self.clair.flag_history = state.per_client_int_lists("flag-history")

    # -- uploads as LoRA updates -------------------------------------------------------
    def _as_factors(self, upload: State, factor: str) -> dict[str, LoraFactors]:
        """Complete one upload with the server's frozen factor into per-module LoRA factors."""
        assert self.global_state is not None
        out = {}
        for name in lora_module_names(self.global_state):
            a = upload[name + LORA_A_SUFFIX] if factor == FACTOR_A else self.global_state[name + LORA_A_SUFFIX]
            b = upload[name + LORA_B_SUFFIX] if factor == FACTOR_B else self.global_state[name + LORA_B_SUFFIX]
            out[name] = LoraFactors(B=b, A=a, scaling=lora_scaling(self.lora_alpha, a.shape[0], self.use_rslora))
        return out

    def _reproject_all(self, refined: dict[str, LoraFactors], factor: str) -> tuple[State, float]:
        assert self.global_state is not None
        frozen_suffix = LORA_A_SUFFIX if factor == FACTOR_B else LORA_B_SUFFIX
        suffix = LORA_B_SUFFIX if factor == FACTOR_B else LORA_A_SUFFIX
        state, worst = {}, 0.0
        for name, f in refined.items():
            frozen = self.global_state[name + frozen_suffix]
            r = frozen.shape[0] if factor == FACTOR_B else frozen.shape[1]
            new, res = reproject(f, frozen, factor, lora_scaling(self.lora_alpha, r, self.use_rslora))
            state[name + suffix], worst = new, max(worst, res)
        return state, worst

    # -- aggregation -------------------------------------------------------------------
    def aggregate_factor(self, server_round: int, factor: str, uploads: list[Upload]
                         ) -> tuple[State | None, dict[str, object]]:
        # A fallback round is skipped: no aggregation, the phase does not advance.
        result, metrics = self.clair.run(server_round, uploads, lambda u: self._as_factors(u.state, factor),
                                         note=f" ({factor})")
        if result is None:
            return None, metrics
        benign = [u for u in uploads if u.node_id not in result.flagged]
        if not benign:
            log(WARNING, "CLAIR flagged every client: round skipped")
            return None, {**metrics, "clair-fallback": 1}
        residual = 0.0
        for u in benign:
            self.refined[u.node_id], res = self._reproject_all(result.clients[u.node_id].refined, factor)
            residual = max(residual, res)
        new = weighted_mean_state([self.refined[u.node_id] for u in benign], self.upload_weights(benign))
        return new, {**metrics, "max-reprojection-residual": residual}
