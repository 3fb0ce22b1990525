"""``run_clair``: one CLAIR aggregation over all adapted modules (steps 1 to 6).

This is the project's reconstruction of CLAIR (Collaborative Low-rank Alignment and
Identifiable Recovery; He, Chen, Feng 2026, arXiv 2605.21217) from the paper's abstract, as
described in ``docs/DESIGN.md``; the paper's full text was not available, so the choices (pair
set, lambda selection, vote thresholds, multi-module rule, second stage) are ours. Per module,
the pairwise differences of the clients' LoRA updates are split into a low-rank part (the shared
subspace ``U``) and a block-sparse part (pairs touching contaminated clients)
(:mod:`~clair_flower.clair.fit`, :mod:`~clair_flower.clair.path`); a majority vote over pairs,
joint over modules, gives the collaborative set (:mod:`~clair_flower.clair.detection`); each
benign client receives its update projected on ``U`` plus the collaborative mean off ``U``,
re-factored at its own rank (:mod:`~clair_flower.clair.refinement`).

Default form: ``constrained``. It recovers ``U`` to ~1e-8 noiseless and with error linear in the
noise. The ``penalized`` form (weight ``mu = penalty * ||X||_2``) matches the cvxpy reference
too, but its shrinkage of ``L`` leaves an error floor on ``U`` (about 5e-3 at ``penalty=0.01`` on
the synthetic model), so it is opt-in.

Inputs that are all zero for every module (a free-rider, or an untrained adapter) are excluded
before the decomposition and reported as flagged with ``reason="all-zero update"``: a zero update
has no direction to test and would otherwise distort the block scale.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np

from clair_flower.clair import detection
from clair_flower.clair.calibration import calibrated_vote
from clair_flower.clair.config import ClairConfig
from clair_flower.clair.decomposition import ClientFactors, make_pairs
from clair_flower.clair.fit import Factors, ModuleFit, client_factors, decompose_modules, set_subspaces
from clair_flower.clair.inputs import ClairInputError, is_zero, validate_updates
from clair_flower.clair.refinement import gram_svd, mean_factors, refine_module, top_factors
from clair_flower.clair.result import ClairResult, ClientId, ClientReport, ModuleReport
from clair_flower.clair.threads import blas_threads, map_all
from clair_flower.lora import LoraFactors

__all__ = ["ClairConfig", "ClairInputError", "ClairResult", "ClientReport", "ModuleReport", "run_clair"]


def run_clair(updates: Mapping[ClientId, Mapping[str, LoraFactors | np.ndarray]],
              cfg: ClairConfig | None = None,
              prior_z: Mapping[ClientId, Sequence[float]] | None = None) -> ClairResult:
    """Run CLAIR on one round of uploads (``updates[client][module]``).

    ``prior_z`` maps a client to its ``score_z`` of earlier rounds (oldest first); it only
    matters when the vote is inconclusive (see ``ClairConfig.z_memory``).
    """
    cfg = cfg or ClairConfig()
    cfg.validate()
    if cfg.blas_threads is None:
        return _run_clair(updates, cfg, prior_z or {})
    with blas_threads(cfg.blas_threads):
        return _run_clair(updates, cfg, prior_z or {})


def _persistent_outliers(active: list, z: np.ndarray, prior_z: Mapping, cfg: ClairConfig) -> np.ndarray:
    """``z > z_threshold``, or the mean z over the last ``z_memory`` rounds above it."""
    out = z > cfg.z_threshold
    for i, c in enumerate(active):
        recent = [float(v) for v in prior_z.get(c, ())][-(cfg.z_memory - 1):] if cfg.z_memory > 1 else []
        if recent and np.mean([*recent, z[i]]) > cfg.z_threshold:
            out[i] = True
    return out


def _run_clair(updates: Mapping, cfg: ClairConfig, prior_z: Mapping) -> ClairResult:
    t0 = time.perf_counter()
    cids, modules, fac = validate_updates(updates)
    zero = [c for c in cids if all(is_zero(fac[m][c]) for m in modules)]
    active = [c for c in cids if c not in zero]
    if len(active) < 3:
        raise ClairInputError(
            f"CLAIR needs at least 3 clients with non-zero updates; all-zero: {zero!r} (module: all)"
        )
    n = len(active)
    pairs = make_pairs(n, cfg.pairs, cfg.pair_degree, cfg.seed)
    fits = decompose_modules(fac, modules, active, pairs, cfg, n)
    informative = np.logical_or.reduce([fits[m].informative for m in modules])
    structured = [m for m in modules if fits[m].admissible]
    # The vote reads the modules that show the model's structure (their S is off-subspace
    # evidence); a round without any reads every module's fallback point for its score.
    combined = detection.combine_modules([fits[m].evidence for m in structured or modules])
    votes, th = calibrated_vote(pairs, n, combined, informative, cfg.flag_threshold, cfg.noise_factor,
                                cfg.vote_threshold)
    if structured:  # a client is flagged by any module whose decomposition certifies its vote
        votes.flagged = np.logical_or.reduce([_module_vote(fits[m], pairs, n, cfg) for m in structured])
    flagged = votes.flagged.copy()
    distance = detection.client_scores(pairs, n, detection.combine_modules([fits[m].distance for m in modules]),
                                       informative)
    score_z = detection.robust_z(votes.score)
    structure = bool(structured)
    inconclusive = 2 * int(flagged.sum()) >= n
    if inconclusive or not structure:
        # No module shows the model's structure, or a flagged majority contradicts it
        # (contaminated clients are a minority): the vote decides nothing, and only robust
        # outliers of the continuous score (mean ||S_kl|| of each module's fallback point,
        # which never is the trivial S = 0 point when another exists) are flagged.
        flagged = _persistent_outliers(active, score_z, prior_z, cfg)
    decision = "vote" if structure and not inconclusive else ("fallback" if flagged.any() else "none")
    z_scores = None
    if cfg.in_subspace_stage:  # tests coefficients on the subspace of the flags so far
        set_subspaces(fits, pairs, flagged, cfg.rank)
        z_scores = _in_subspace_stage(fac, fits, modules, active, flagged, cfg.z_threshold)
    collab = [i for i in range(n) if not flagged[i]]
    if not collab:
        raise RuntimeError("CLAIR flagged every client; no collaborative set to aggregate")
    no_structure_round = decision != "vote" and cfg.no_structure != "refine"
    set_subspaces(fits, pairs, flagged, cfg.rank, {m: fac[m][active[0]].out_features for m in modules} if no_structure_round else None)
    refined, errors, consensus = _refine(fac, fits, modules, cids, active, zero, collab, cfg)
    if no_structure_round and cfg.no_structure == "own":
        for i in collab:
            refined[active[i]] = {m: fac[m][active[i]] for m in modules}
            errors[active[i]] = {m: 0.0 for m in modules}
    clients = {}
    for i, c in enumerate(active):
        clients[c] = ClientReport(float(votes.vote[i]), float(votes.score[i]), bool(flagged[i]), refined[c],
                                  errors[c], reason=_reason(i, votes, flagged, decision == "vote"),
                                  in_subspace_z=None if z_scores is None or i not in z_scores else float(z_scores[i]),
                                  clean_vote=float(votes.clean_vote[i]), score_z=float(score_z[i]),
                                  distance=float(distance[i]))
    for c in zero:
        clients[c] = ClientReport(1.0, float("inf"), True, refined[c], errors[c], reason="all-zero update",
                                  clean_vote=1.0)
    flagged_ids = frozenset(c for c in cids if clients[c].flagged)
    reports = {m: ModuleReport(fits[m].U, fits[m].rank, fits[m].diagnostics) for m in modules}
    statuses = sorted({reports[m].diagnostics["status"] for m in modules})
    diag = {"solver": cfg.solver, "form": cfg.form, "status": statuses[0] if len(statuses) == 1 else ",".join(statuses),
            "seconds": time.perf_counter() - t0, "n_clients": len(cids), "n_active": n, "n_pairs": len(pairs),
            "pairs": cfg.pairs, "lam": {m: reports[m].diagnostics["lam"] for m in modules},
            "c": {m: reports[m].diagnostics["c"] for m in modules},
            "rank": {m: reports[m].rank for m in modules},
            "excluded_zero": [str(c) for c in zero], "in_subspace_stage": cfg.in_subspace_stage,
            "vote_inconclusive": bool(inconclusive), "structure": bool(structure), "decision": decision,
            "structured_modules": len(structured), "pair_noise": th.noise, "pair_threshold": th.threshold,
            "trusted_get": "refined" if not no_structure_round else cfg.no_structure}
    return ClairResult(frozenset(c for c in cids if c not in flagged_ids), flagged_ids, clients, consensus,
                       reports, diag, decision=decision)


def _in_subspace_stage(fac: Factors, fits: dict[str, ModuleFit], modules: list[str], active: list,
                       flagged: np.ndarray, z_threshold: float) -> dict[int, float]:
    """CLAIR+: flag (in place) clients whose in-subspace coefficients are robust outliers
    (magnitude) or whose update points against the others' (direction); see
    :mod:`~clair_flower.clair.detection`. The reported z is the magnitude z, or
    ``max(z_magnitude, -z_direction)`` for a client the direction test flags, so a client is
    flagged exactly when it is above ``z_threshold``."""
    cand = [i for i in range(len(active)) if not flagged[i]]
    coeffs, grams = [], []
    for m in modules:
        cf = client_factors(fac, m, active)
        coeffs.append([(fits[m].U.T @ cf.B[i].astype(np.float64)) @ cf.A[i] for i in cand])
        grams.append(detection.product_gram([cf.B[i] for i in cand], [cf.A[i] for i in cand]))
    z_mag, mag_flags = detection.in_subspace_flags(coeffs, z_threshold)
    z_dir, dir_flags = detection.direction_flags(detection.mean_cosines(grams), z_threshold)
    z = np.where(dir_flags, np.maximum(z_mag, -z_dir), z_mag)
    for j, i in enumerate(cand):
        flagged[i] |= bool(mag_flags[j] or dir_flags[j])
    return dict(zip(cand, z))


def _refine(fac: Factors, fits: dict[str, ModuleFit], modules: list[str], cids: list, active: list,
            zero: list, collab: list[int], cfg: ClairConfig) -> tuple[dict, dict, dict[str, LoraFactors]]:
    """Steps 5-6 for every module: refined factors and truncation errors per client, consensus."""
    refined: dict = {c: {} for c in cids}
    errors: dict = {c: {} for c in cids}
    consensus: dict[str, LoraFactors] = {}

    def refine(m: str) -> tuple:
        cf = client_factors(fac, m, active)
        scal = [fac[m][c].scaling for c in active]
        ref, err, cons = refine_module(cf.B, cf.A, scal, fits[m].U, collab, cfg.flagged_policy, inner=fits[m].inner)
        zeros = {c: _policy_for_zero(fac[m][c], cf, collab, cfg.flagged_policy) for c in zero}
        return ref, err, cons, zeros

    for m, (ref, err, cons, zeros) in zip(modules, map_all(refine, modules, cfg.workers)):
        consensus[m] = cons
        for i, c in enumerate(active):
            refined[c][m], errors[c][m] = ref[i], err[i]
        for c in zero:  # excluded clients get the policy as well
            refined[c][m], errors[c][m] = zeros[c]
    return refined, errors, consensus


def _module_vote(fit: ModuleFit, pairs: Sequence, n: int, cfg: ClairConfig) -> np.ndarray:
    """The vote of one module at its chosen point, with that point's calibrated threshold: the
    flags its admissibility certified (consistent pattern, flagged minority, low rank, low noise).

    Modules are not averaged: on the copy task's SGD clients only the modules nearest the output
    flagged the contaminated clients; the others' ``L`` absorbed them, and their near-zero
    evidence diluted the joint norm below the threshold (docs/identification.md).
    """
    return calibrated_vote(pairs, n, fit.evidence, fit.informative, cfg.flag_threshold, cfg.noise_factor,
                           cfg.vote_threshold)[0].flagged


def _reason(i: int, votes: detection.Votes, flagged: np.ndarray, decided: bool) -> str:
    if not decided and flagged[i]:
        return "score outlier (no structure or inconclusive vote)"
    if votes.flagged[i] and flagged[i]:
        return "off-subspace majority vote"
    if flagged[i]:
        return "in-subspace stage"
    return ""


def _policy_for_zero(f: LoraFactors, cf: ClientFactors, collab, policy: str) -> tuple[LoraFactors, float]:
    """The flagged policy for an excluded all-zero client (its own rank and scaling)."""
    dtype = cf.B[0].dtype
    if policy == "consensus":
        Bm, Am = mean_factors(cf.B, cf.A, collab)
        return top_factors(*gram_svd(Bm, Am, f.rank), f.rank, f.scaling or 1.0, dtype)
    return LoraFactors(B=np.zeros_like(f.B, dtype=dtype), A=np.zeros_like(f.A, dtype=dtype), scaling=float(f.scaling)), 0.0
