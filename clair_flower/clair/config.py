"""Settings of one CLAIR aggregation."""

from __future__ import annotations

from dataclasses import dataclass

from clair_flower.clair.refinement import POLICIES
from clair_flower.clair.solvers import FORMS

NO_STRUCTURE_POLICIES = ("mean", "own", "refine")


@dataclass(frozen=True)
class ClairConfig:
    """Settings of one CLAIR aggregation (``docs/DESIGN.md`` section 3 explains each rule).

    ``c`` is the constant of the penalty ``lam = c / sqrt(|P|)``: ``"auto"`` (chosen along a
    path, see :mod:`clair_flower.clair.path`) or a fixed positive number.
    """

    rank: int | None = None
    solver: str = "fast"
    form: str = "constrained"
    c: str | float = "auto"
    pairs: str = "all"
    pair_degree: int | None = None
    flag_threshold: float = 0.25
    """Pair flagged when ``||S_kl||_F > flag_threshold * median block norm``: client-specific
    off-subspace error below a quarter of a typical difference is treated as noise."""
    noise_factor: float = 1.5
    """Pairs are flagged above ``max(flag_threshold, noise_factor * noise)``, ``noise`` the benign
    pairs' own evidence level at that point (:mod:`clair_flower.clair.calibration`); 0 keeps the
    fixed threshold. On the copy task's SGD clients benign pairs keep 20-40% in ``S`` at the
    planted rank; contaminated pairs 1.5-3x that (docs/identification.md)."""
    max_noise: float = 0.25
    """A path point is admissible only when that ``noise`` is at most this (the fixed threshold's
    level): ``L`` must explain most of a benign difference. Without it an under-fitted ``L``
    (rank 1 of a planted 3, its shrinkage leaving 30% of every benign pair in ``S``) passed as
    the lowest-rank admissible point."""
    vote_threshold: float = 0.5
    flagged_policy: str = "consensus"
    no_structure: str = "mean"
    """What the trusted clients get when the round found no structure (no module has an
    admissible point, or the vote is inconclusive): ``"mean"``, the mean of the trusted clients'
    updates (FedAvg over the unflagged clients); ``"own"``, each its own update unchanged;
    ``"refine"``, the subspace refinement anyway (the behaviour before this rule existed)."""
    in_subspace_stage: bool = False
    seed: int = 0
    max_iter: int = 3000
    tol: float = 1e-8
    penalty: float = 0.01
    """Penalized form: ``mu = penalty * ||X||_2`` on the normalised stack."""
    z_threshold: float = 3.5
    """Robust z-score above which a client is flagged: by the in-subspace stage, and by the
    score when the vote is inconclusive."""
    z_memory: int = 3
    """Inconclusive vote: a client is also flagged when the mean of its score's robust z over
    this round and its last ``z_memory - 1`` rounds (``prior_z`` of ``run_clair``) is above
    ``z_threshold``, so a persistent outlier is not lost to one round's dip."""
    structure_ratio: float = 0.25
    """A path point shows structure when the effective rank of its ``L`` is at most this fraction
    of the largest rank the clients' updates could span, ``min(p, sum_k r_k)``. On real LoRA
    updates of the copy task the fits that absorbed everything had 45-85% (docs/identification.md);
    the synthetic model with a shared subspace needs ``r* / min(p, sum_k r_k)``, 10% in the tests."""
    rank_rtol: float = 0.05
    consistency_tol: float = 0.02
    path_points: int = 16
    blas_threads: int | None = 1
    """BLAS threads inside ``run_clair``; 1 avoids OpenBLAS thread hand-offs that made LAPACK
    calls 10x slower on a shared 2-core machine; ``None`` keeps the library's setting."""
    workers: int | None = None
    """Modules decomposed concurrently (threads; numpy and LAPACK release the GIL). ``None``:
    one per CPU core. Results do not depend on it. Two solves on two threads each run about 40%
    slower than one alone (Python-level work between kernels holds the GIL), so 2 cores give
    about 1.4x."""
    share_c: bool = True
    """With ``c="auto"``: reuse the ``c`` chosen on the first module for every other module
    whose point at that ``c`` is admissible (the rest run their own path)."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting that cannot be used."""
        if self.solver not in ("fast", "reference"):
            raise ValueError(f"solver must be 'fast' or 'reference', got {self.solver!r}")
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {self.form!r}")
        if self.flagged_policy not in POLICIES:
            raise ValueError(f"flagged_policy must be one of {POLICIES}, got {self.flagged_policy!r}")
        if self.no_structure not in NO_STRUCTURE_POLICIES:
            raise ValueError(f"no_structure must be one of {NO_STRUCTURE_POLICIES}, got {self.no_structure!r}")
        if not (self.c == "auto" or (isinstance(self.c, (int, float)) and self.c > 0)):
            raise ValueError(f"c must be 'auto' or a positive number, got {self.c!r}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be None or >= 1, got {self.rank}")
        if not 0.0 < self.structure_ratio <= 1.0:
            raise ValueError(f"structure_ratio must be in (0, 1], got {self.structure_ratio}")
        if self.noise_factor < 0 or self.max_noise <= 0:
            raise ValueError(f"need noise_factor >= 0 and max_noise > 0, got {self.noise_factor}, {self.max_noise}")
        if self.z_memory < 1:
            raise ValueError(f"z_memory must be >= 1, got {self.z_memory}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be None or >= 1, got {self.workers}")
