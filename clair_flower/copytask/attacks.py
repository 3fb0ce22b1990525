"""Contaminated-client behaviour for the S-copy simulation: data poisoning and model poisoning.

(Over 400 lines: the catalogue of thirteen attacks, each a short function, and the one table that
documents them; it reads as one list.)

Pure numpy, no Flower: the ClientApp decides *whether* a client attacks
(:func:`contaminated_partitions`, :func:`is_active`) and calls :func:`data_poison` on its
training arrays or :func:`poison_update` on the PEFT LoRA state dict it is about to upload.

``strength`` has one meaning per attack; ``None`` (or NaN) selects the default below.

===========  ==========================================  =====================  ==========
attack       what the client does (strength: default)    attacker knows         in benign
                                                                                subspace?
===========  ==========================================  =====================  ==========
reversed     trains on ``y = y_clean[:, ::-1]``          own data               no
permutation  trains on ``y = perm[y_clean]``, one fixed   own data; the group's  no
             derangement of the content tokens           ``seed``
random       trains on uniform random content targets    own data               no
backdoor     a fraction of samples get ``x[:, 0] =       own data; the group's  no
             TRIGGER`` and the fixed target (fraction:   ``seed``
             0.5)
sign-flip    uploads ``-k dW``, ``B -> -k B`` (k: 1)     own honest update      yes
scaling      uploads ``k dW``, ``B -> k B`` (k: 10)      own honest update      yes
gaussian     every LoRA array ``X + N(0, sigma^2         own honest update      no
             mean(X^2))`` (sigma: 1)
alie         every coordinate ``mean - z std`` of the    benign mean and std    yes
             benign reference (z: ``alie_z(n, m)`` if    (omniscient or         (approx.)
             n, m are given, else 1)                     colluding)
ipm          ``B = -eps mean(B_ref)``, ``A =             benign mean            yes
             mean(A_ref)`` (eps: 0.5)                    (omniscient or
                                                         colluding)
colluders    all upload one adapter: a direction         group's seed, the      no (shared
             seeded by (seed, round) only, at a norm     round, rough size of   random
             all agree on (norm multiplier: 1)           honest updates         direction)
free-rider   0: ``dW = 0`` (``B = 0``); 1: re-uploads    nothing                yes (0 is
             the received adapter, stale (0)                                    in any span)
subthreshold own update plus a deviation *off* the          benign updates and     no (by
             estimated benign subspace, against the      CLAIR's flag rule      design just
             benign mean, of norm ``k * 0.25 *`` the                            below the
             median benign pair distance (k: 0.9)                               threshold)
in-subspace  own update plus a deviation *inside* the    benign updates and     yes
             estimated benign subspace, against the      CLAIR's model
             benign mean's part there, of norm ``k``
             x the median benign spread there (k: 2)
===========  ==========================================  =====================  ==========

The last two are adaptive: they know CLAIR's rule. Both estimate the benign subspace as the top
``r`` left singular vectors (``r``: the attacker's own LoRA rank) of the centred benign reference
updates, and both change ``B`` only (``dW' = dW + dB @ A``), so the upload keeps its rank and the
deviation lies exactly where it is aimed: ``dB = D @ pinv(A)`` for the aimed direction ``D``.
*subthreshold* scales its off-subspace deviation to ``k`` times CLAIR's pair-flag threshold
(``||S_kl|| > 0.25 x`` the median pair difference, :data:`CLAIR_FLAG_THRESHOLD`), measured on the
benign references: as much as the off-subspace test is expected to let through. *in-subspace*
puts its deviation where that test cannot look at all, sized by the benign spread of the
in-subspace coefficients so that CLAIR+'s robust z stays small for ``k`` below about 3. ALIE is
tuned to the benign spread already (``mean - z std`` of the references).

"Inside the benign subspace" means the column space of the uploaded ``dW`` lies in the span of
benign updates, so CLAIR's off-subspace test (docs/DESIGN.md section 3, *CLAIR+*) cannot see
it; only a second, in-subspace stage (robust median/MAD of the coefficients) can.  ALIE is
applied coordinate-wise to the factors, so its ``B`` is in the benign span only approximately
(exactly when benign ``B``'s differ along one direction).

Knowledge assumptions.  ALIE and IPM follow the literature's omniscient (or colluding) attacker,
who knows the benign updates' mean and std.  In the simulation the ClientApp supplies
``benign_reference``: adapters trained honestly from the same received adapter on regenerated data
of a few benign partitions (the data generator is deterministic, so a real attacker with the same
generator could do this).  Without it, the attacker only has its own ``honest`` adapter and falls
back to ``[honest]`` plus a multiplicative (Bayesian-bootstrap style) resampling of it, i.e. it
assumes the benign spread of each coordinate is about its own magnitude: a weaker attacker.

Model attacks act on PEFT LoRA state dicts (``...lora_A.weight`` (r, in), ``...lora_B.weight``
(out, r), ``dW = s * B @ A``, see :mod:`clair_flower.lora`).  Keys that are not LoRA factors are
passed through from ``honest`` (from ``received`` for the stale free-rider).  Data attacks act on
content arrays; ``vocab_size`` is the number of *content* tokens and the arrays hold ids
``first_token .. first_token + vocab_size - 1``.  The default ``first_token = 0`` matches
:mod:`clair_flower.copytask.task`, whose poison callbacks receive content indices (it adds the special-token
offset when encoding); pass ``first_token = NUM_SPECIAL`` for arrays of model token ids.  Ids
outside that range are rejected, so a mix-up fails loudly.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from clair_flower.lora import LORA_A_SUFFIX, LORA_B_SUFFIX, factors_from_state_dict

DATA_ATTACKS: tuple[str, ...] = ("reversed", "permutation", "random", "backdoor")
MODEL_ATTACKS: tuple[str, ...] = (
    "sign-flip", "scaling", "gaussian", "alie", "ipm", "colluders", "free-rider",
    "subthreshold", "in-subspace",
)
#: Model attacks that read honestly trained benign adapters (``benign_reference``).
NEEDS_REFERENCE: tuple[str, ...] = ("alie", "ipm", "subthreshold", "in-subspace")
#: CLAIR's default pair-flag threshold (``ClairConfig.flag_threshold``), what ``subthreshold``
#: aims under. Copied, not imported: the simulation never imports the method (tests check equality).
CLAIR_FLAG_THRESHOLD = 0.25
ATTACKS: tuple[str, ...] = ("none",) + DATA_ATTACKS + MODEL_ATTACKS

#: Default ``strength`` per attack; ``alie`` is ``None`` because its default z comes from
#: :func:`alie_z` when the federation size is known (else :data:`ALIE_FALLBACK_Z`).
DEFAULT_STRENGTH: dict[str, float | None] = {
    "none": 0.0,
    "reversed": 0.0,
    "permutation": 0.0,
    "random": 0.0,
    "backdoor": 0.5,
    "sign-flip": 1.0,
    "scaling": 10.0,
    "gaussian": 1.0,
    "alie": None,
    "ipm": 0.5,
    "colluders": 1.0,
    "free-rider": 0.0,
    "subthreshold": 0.9,
    "in-subspace": 2.0,
}
ALIE_FALLBACK_Z = 1.0

#: The trigger is the content token ``BACKDOOR_TRIGGER_OFFSET`` places before the last one (the
#: last content token by default: outside the lower part of the vocabulary the base model was
#: pre-trained on).
BACKDOOR_TRIGGER_OFFSET = 0
#: The backdoor target is a seeded block of this many tokens, tiled to the sequence length, so
#: the target for length L is a prefix of the target for any longer length.
BACKDOOR_TARGET_PERIOD = 64

# Distinct tags so the partition draw, the permutation, the target and the noise, all seeded by
# cfg.seed, are independent streams.
_TAG_PARTITIONS, _TAG_PERMUTATION, _TAG_TARGET, _TAG_GAUSSIAN, _TAG_COLLUDE, _TAG_BOOT, _TAG_ADAPT = range(7)

Poison = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]
StateDict = dict[str, np.ndarray]


class UnknownAttackError(ValueError):
    """An attack name that is not one of :data:`ATTACKS`."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown attack {name!r}; valid names: {', '.join(ATTACKS)}")


def _normalise_name(name: str) -> str:
    """Accept ``Sign_Flip`` for ``sign-flip``: run configs often use underscores."""
    return str(name).strip().lower().replace("_", "-")


@dataclass(frozen=True)
class AttackConfig:
    """Which attack contaminated clients run, from when, and how hard.

    Parameters
    ----------
    name : one of :data:`ATTACKS` (case and ``_``/``-`` are normalised).
    fraction : share of partitions that are contaminated, in ``[0, 0.5)``: CLAIR's guarantee,
        and every robust baseline's, needs a benign majority.
    start_round : first server round (1-based) in which contaminated clients attack.
    strength : per-attack meaning (module docstring table); ``None`` or NaN = default.
    seed : the run config's ``attack-seed``. Seeds every shared random object (permutation,
        backdoor target, colluder direction), so all attackers of a run agree on them, and,
        with ``run_seed``, the choice of partitions.
    run_seed : the run config's ``seed``. The contaminated partitions are drawn from
        ``seed`` and ``run_seed`` together (:func:`contaminated_partitions`), so a new run
        seed also changes who attacks; the attack itself (permutation, target, direction)
        depends on ``seed`` alone.
    """

    name: str = "none"
    fraction: float = 0.0
    start_round: int = 1
    strength: float | None = None
    seed: int = 0
    run_seed: int = 0

    def __post_init__(self) -> None:
        name = _normalise_name(self.name)
        if name not in ATTACKS:
            raise UnknownAttackError(self.name)
        object.__setattr__(self, "name", name)
        if not 0.0 <= float(self.fraction) < 0.5:
            raise ValueError(f"fraction must be in [0, 0.5) (a benign majority), got {self.fraction}")
        if int(self.start_round) != self.start_round or self.start_round < 1:
            raise ValueError(f"start_round must be an integer >= 1, got {self.start_round}")
        if int(self.seed) != self.seed or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed}")
        if int(self.run_seed) != self.run_seed or self.run_seed < 0:
            raise ValueError(f"run_seed must be a non-negative integer, got {self.run_seed}")
        strength = self.strength
        if strength is not None and math.isnan(float(strength)):
            strength = None
        object.__setattr__(self, "strength", None if strength is None else float(strength))
        _validate_strength(name, self.strength)

    @property
    def is_data_attack(self) -> bool:
        return self.name in DATA_ATTACKS

    @property
    def is_model_attack(self) -> bool:
        return self.name in MODEL_ATTACKS


def _validate_strength(name: str, strength: float | None) -> None:
    """Reject strengths that make an attack meaningless, early, at config time."""
    if strength is None:
        return
    if not math.isfinite(strength):
        raise ValueError(f"{name}: strength must be finite, got {strength}")
    if name == "backdoor" and not 0.0 < strength <= 1.0:
        raise ValueError(f"backdoor: strength is the poisoned fraction, in (0, 1]; got {strength}")
    if name == "free-rider" and strength not in (0.0, 1.0):
        raise ValueError(f"free-rider: strength 0 (zero update) or 1 (stale); got {strength}")
    if name in ("gaussian", "colluders", "subthreshold", "in-subspace") and strength < 0:
        raise ValueError(f"{name}: strength must be >= 0, got {strength}")


def alie_z(num_clients: int, num_malicious: int) -> float:
    """Baruch et al. (2019) ``z_max``: ``s = floor(n/2 + 1) - m``, ``z = Phi^-1((n - s) / n)``.

    The largest shift that still leaves enough benign clients "behind" the attackers for a
    majority-based defence to pick the attackers' value.
    """
    n, m = int(num_clients), int(num_malicious)
    if n < 1 or not 0 <= m < n:
        raise ValueError(f"need 0 <= num_malicious < num_clients, got n={n}, m={m}")
    s = math.floor(n / 2 + 1) - m
    p = min(max((n - s) / n, 1e-6), 1 - 1e-6)
    return float(NormalDist().inv_cdf(p))


def resolve_strength(
    cfg: AttackConfig, *, num_clients: int | None = None, num_malicious: int | None = None
) -> float:
    """The strength actually used: the configured one, else the per-attack default."""
    if cfg.strength is not None:
        return float(cfg.strength)
    if cfg.name == "alie":
        if num_clients is not None and num_malicious is not None:
            return alie_z(num_clients, num_malicious)
        return ALIE_FALLBACK_Z
    return float(DEFAULT_STRENGTH[cfg.name])  # type: ignore[arg-type]


def _rng(cfg_seed: int, tag: int, *extra: int) -> np.random.Generator:
    """An independent, reproducible stream per (seed, purpose, ...)."""
    return np.random.default_rng(np.random.SeedSequence([int(cfg_seed), tag, *map(int, extra)]))


# --------------------------------------------------------------------------- who attacks, when


def contaminated_partitions(num_partitions: int, cfg: AttackConfig) -> frozenset[int]:
    """The ground-truth contaminated partition ids.

    ``round(fraction * N)`` (half up, capped to a strict minority) ids, the first ones of a
    permutation of ``range(N)`` seeded by ``cfg.seed`` (the ``attack-seed``) and
    ``cfg.run_seed`` (the run ``seed``) together: deterministic, different for a different
    value of either, and nested as the fraction grows. Empty for ``name == "none"``.
    ``run_seed`` 0 draws exactly as before it existed (the entropy is ``(seed, tag)``, and
    ``(seed, tag, run_seed)`` otherwise), so runs recorded with ``seed = 0`` keep their
    partitions.
    """
    n = int(num_partitions)
    if n < 0:
        raise ValueError(f"num_partitions must be >= 0, got {num_partitions}")
    if cfg.name == "none" or n == 0:
        return frozenset()
    count = min(math.floor(cfg.fraction * n + 0.5), (n - 1) // 2)
    extra = (cfg.run_seed,) if cfg.run_seed else ()
    order = _rng(cfg.seed, _TAG_PARTITIONS, *extra).permutation(n)
    return frozenset(int(i) for i in order[:count])


def is_active(cfg: AttackConfig, server_round: int) -> bool:
    """Whether contaminated clients attack in ``server_round`` (1-based)."""
    return cfg.name != "none" and int(server_round) >= cfg.start_round


# --------------------------------------------------------------------------- data attacks


def _content_range(vocab_size: int, first_token: int) -> tuple[int, int]:
    """``[lo, hi)`` of the content ids."""
    if first_token < 0 or vocab_size < 2:
        raise ValueError(
            f"need >= 2 content tokens and first_token >= 0, got {vocab_size=}, {first_token=}"
        )
    return int(first_token), int(first_token) + int(vocab_size)


def vocab_permutation(seed: int, vocab_size: int, first_token: int = 0) -> np.ndarray:
    """Lookup table ``perm`` (size ``first_token + vocab_size``) of the permutation attack.

    A single cycle through the shuffled content tokens, so no content token maps to itself
    (every target really is wrong); ids below ``first_token`` map to themselves. Same for every
    attacker with the same ``seed``, and the same map of content indices for any ``first_token``.
    """
    lo, hi = _content_range(vocab_size, first_token)
    order = lo + _rng(seed, _TAG_PERMUTATION, vocab_size).permutation(hi - lo)
    perm = np.arange(hi, dtype=np.int64)
    perm[order] = np.roll(order, -1)
    return perm


def backdoor_trigger(vocab_size: int, first_token: int = 0) -> int:
    """The trigger token (see :data:`BACKDOOR_TRIGGER_OFFSET`)."""
    lo, hi = _content_range(vocab_size, first_token)
    trigger = hi - 1 - BACKDOOR_TRIGGER_OFFSET
    if trigger < lo:
        raise ValueError("BACKDOOR_TRIGGER_OFFSET leaves no content token for the trigger")
    return trigger


def backdoor_target(length: int, seed: int, vocab_size: int, first_token: int = 0) -> np.ndarray:
    """The fixed target sequence of length ``length`` (a prefix of every longer target)."""
    lo, hi = _content_range(vocab_size, first_token)
    block = _rng(seed, _TAG_TARGET, vocab_size).integers(lo, hi, size=BACKDOOR_TARGET_PERIOD)
    return np.resize(block, int(length)).astype(np.int64)


def _check_tokens(x: np.ndarray, y: np.ndarray, lo: int, hi: int) -> None:
    """Shapes and id range: a poison given token ids where it expects content indices (or
    the reverse) must fail, not silently treat content tokens as specials."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must be (n, L) token arrays, got {x.shape} and {y.shape}")
    for arr in (x, y):
        if arr.size and (arr.min() < lo or arr.max() >= hi):
            raise ValueError(f"token ids must be in [{lo}, {hi}), got {arr.min()}..{arr.max()}")


def data_poison(cfg: AttackConfig, vocab_size: int, first_token: int = 0) -> Poison | None:
    """The training-data transform of a data attack, or ``None`` for any other attack.

    ``poison(x, y, rng) -> (x', y')`` is a pure function of its arguments: it never mutates
    them and sees only what the caller passes (the training split), so a held-out split stays
    clean unless the caller poisons it deliberately. ``y`` is the clean target (``y == x`` in
    the copy task); ``rng`` is used by ``random`` and ``backdoor`` only.
    """
    if cfg.name not in DATA_ATTACKS:
        return None
    lo, hi = _content_range(vocab_size, first_token)
    if cfg.name == "reversed":
        return _checked(_poison_reversed, lo, hi)
    if cfg.name == "permutation":
        perm = vocab_permutation(cfg.seed, vocab_size, first_token)
        return _checked(lambda x, y, rng: (x.copy(), perm[y].astype(y.dtype)), lo, hi)
    if cfg.name == "random":
        def _random(x: np.ndarray, y: np.ndarray, rng: np.random.Generator):
            return x.copy(), rng.integers(lo, hi, size=y.shape).astype(y.dtype)
        return _checked(_random, lo, hi)
    frac = resolve_strength(cfg)
    trigger = backdoor_trigger(vocab_size, first_token)

    def _backdoor(x: np.ndarray, y: np.ndarray, rng: np.random.Generator):
        n = x.shape[0]
        rows = np.sort(rng.choice(n, size=math.floor(frac * n + 0.5), replace=False))
        xp, yp = x.copy(), y.copy()
        xp[rows, 0] = trigger
        yp[rows] = backdoor_target(y.shape[1], cfg.seed, vocab_size, first_token)
        return xp, yp
    return _checked(_backdoor, lo, hi)


def _poison_reversed(x: np.ndarray, y: np.ndarray, rng: np.random.Generator):
    """Reverse the target; assumes no padding inside the (n, L) content arrays."""
    return x.copy(), np.ascontiguousarray(y[:, ::-1])


def _checked(fn: Poison, lo: int, hi: int) -> Poison:
    """Wrap a poison with shape/range checks, so a wrong call fails loudly, not silently."""
    def poison(x: np.ndarray, y: np.ndarray, rng: np.random.Generator):
        x, y = np.asarray(x), np.asarray(y)
        _check_tokens(x, y, lo, hi)
        return fn(x, y, rng)
    return poison


def backdoor_test_set(
    x: np.ndarray, cfg: AttackConfig, vocab_size: int, first_token: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Every row of a (clean, held-out) ``x`` triggered, and the attacker's target for each.

    The attack success rate is the model's accuracy on ``(x_triggered, y_target)``.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x must be an (n, L) token array, got {x.shape}")
    xt = x.copy()
    xt[:, 0] = backdoor_trigger(vocab_size, first_token)
    target = backdoor_target(x.shape[1], cfg.seed, vocab_size, first_token).astype(x.dtype)
    return xt, np.tile(target, (x.shape[0], 1))


# --------------------------------------------------------------------------- model attacks


def dense_update(
    state: Mapping[str, np.ndarray], lora_alpha: float, use_rslora: bool = False
) -> dict[str, np.ndarray]:
    """Module name -> ``dW = s * B @ A`` (float64), via :mod:`clair_flower.lora`; for tests."""
    facs = factors_from_state_dict(
        {k: np.asarray(v, dtype=np.float64) for k, v in state.items()}, lora_alpha, use_rslora
    )
    return {name: f.dense() for name, f in facs.items()}


def _is_b(key: str) -> bool:
    return key.endswith(LORA_B_SUFFIX)


def _is_lora(key: str) -> bool:
    return key.endswith(LORA_A_SUFFIX) or key.endswith(LORA_B_SUFFIX)


def _like(values: Mapping[str, np.ndarray], template: Mapping[str, np.ndarray]) -> StateDict:
    """Fresh arrays with ``template``'s keys and dtypes (the upload contract)."""
    out: StateDict = {}
    for k, t in template.items():
        v = np.asarray(values[k])
        if v.shape != np.shape(t):
            raise ValueError(f"{k}: shape {v.shape} differs from the honest {np.shape(t)}")
        out[k] = np.array(v, dtype=np.asarray(t).dtype, copy=True)
    return out


def _scale_b(honest: Mapping[str, np.ndarray], k: float) -> StateDict:
    """``dW -> k dW`` exactly: only ``B`` is scaled, so ``s * (kB) @ A = k * dW``."""
    return _like({n: (k * np.asarray(v) if _is_b(n) else v) for n, v in honest.items()}, honest)


def _gaussian(honest: Mapping[str, np.ndarray], sigma: float, rng: np.random.Generator) -> StateDict:
    """``X + N(0, sigma^2 mean(X^2))`` per LoRA array: scale-free noise whose expected squared
    norm is ``sigma^2 ||X||^2``, so ``E||X'||^2 = (1 + sigma^2) ||X||^2``."""
    out: dict[str, np.ndarray] = {}
    for n in sorted(honest):
        x = np.asarray(honest[n], dtype=np.float64)
        if _is_lora(n) and x.size:
            x = x + rng.standard_normal(x.shape) * sigma * math.sqrt(float(np.mean(x * x)))
        out[n] = x
    return _like(out, honest)


def _bootstrap_reference(
    honest: Mapping[str, np.ndarray], seed: int, server_round: int, n_boot: int = 16
) -> list[StateDict]:
    """Knowledge-free stand-in for benign updates: ``[honest]`` and ``n_boot`` copies with every
    coordinate multiplied by an i.i.d. Exp(1) weight (mean 1, variance 1), i.e. a benign spread
    per coordinate about its own magnitude. Deterministic per (seed, round, honest)."""
    rng = _rng(seed, _TAG_BOOT, server_round, _digest(honest))
    refs: list[StateDict] = [dict(honest)]
    for _ in range(n_boot):
        refs.append({k: np.asarray(v) * rng.exponential(1.0, np.shape(v)) for k, v in honest.items()})
    return refs


def _reference_stats(refs: Sequence[Mapping[str, np.ndarray]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Coordinate-wise mean and population std (ddof=0) of one array over the references."""
    stack = np.stack([np.asarray(r[key], dtype=np.float64) for r in refs])
    return stack.mean(axis=0), stack.std(axis=0)


def _alie(honest: Mapping[str, np.ndarray], refs: Sequence[Mapping[str, np.ndarray]], z: float) -> StateDict:
    """Every LoRA coordinate set to ``mean - z * std`` of the references (Baruch et al.)."""
    out = {}
    for k, v in honest.items():
        if _is_lora(k):
            mu, sd = _reference_stats(refs, k)
            out[k] = mu - z * sd
        else:
            out[k] = v
    return _like(out, honest)


def _ipm(honest: Mapping[str, np.ndarray], refs: Sequence[Mapping[str, np.ndarray]], eps: float) -> StateDict:
    """Inner-product manipulation (Xie et al. 2020) on LoRA factors: ``B = -eps * mean(B)``,
    ``A = mean(A)``. Negating both factors would cancel in ``B @ A``; with a shared ``A`` (as in
    RoLoRA/FFA-LoRA) the upload is exactly ``-eps`` times the mean benign ``dW``."""
    out = {}
    for k, v in honest.items():
        if _is_lora(k):
            mu, _ = _reference_stats(refs, k)
            out[k] = -eps * mu if _is_b(k) else mu
        else:
            out[k] = v
    return _like(out, honest)


def _module_pairs(state: Mapping[str, np.ndarray]) -> list[tuple[str, str]]:
    """(A key, B key) per module, sorted, so every colluder walks modules in one order."""
    mods = sorted(k[: -len(LORA_A_SUFFIX)] for k in state if k.endswith(LORA_A_SUFFIX))
    pairs = [(m + LORA_A_SUFFIX, m + LORA_B_SUFFIX) for m in mods]
    missing = [b for _, b in pairs if b not in state]
    if missing or not pairs:
        raise ValueError(f"not a LoRA state dict (missing/extra factors: {missing[:3]})")
    return pairs


def _product_norm(a: np.ndarray, b: np.ndarray) -> float:
    """``||B @ A||_F`` from the r x r Gram matrices, without forming the dense product."""
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return math.sqrt(max(float(np.sum((b64.T @ b64) * (a64 @ a64.T))), 0.0))


def _total_norm(state: Mapping[str, np.ndarray]) -> float:
    """Norm of the whole update over modules, ``sqrt(sum_m ||B_m A_m||^2)`` (scaling omitted:
    colluders share ranks, hence scalings)."""
    return math.sqrt(sum(_product_norm(state[a], state[b]) ** 2 for a, b in _module_pairs(state)))


def colluder_norm(
    honest: Mapping[str, np.ndarray], benign_reference: Sequence[Mapping[str, np.ndarray]] | None = None
) -> float:
    """The norm all colluders agree on: the median total norm of the honest updates they can
    see, rounded to the nearest power of two. The rounding is what makes it identical across
    colluders whose honest norms differ by less than the octave grid (they train the same task
    with the same hyper-parameters); pass ``shared_norm`` to :func:`poison_update` for a
    guarantee."""
    refs = list(benign_reference) if benign_reference else [honest]
    med = float(np.median([_total_norm(r) for r in refs]))
    return 0.0 if med <= 0 else float(2.0 ** round(math.log2(med)))


def _colluders(
    honest: Mapping[str, np.ndarray], seed: int, server_round: int, target_norm: float
) -> StateDict:
    """One adapter per (seed, round): Gaussian factors per module seeded by (seed, round, module
    name), balanced and scaled so each module's ``||B A||`` is ``target_norm / sqrt(#modules)``.
    Inputs that differ between colluders (their honest values) are never read, only shapes."""
    pairs = _module_pairs(honest)
    per_module = target_norm / math.sqrt(len(pairs))
    out: dict[str, np.ndarray] = dict(honest)
    for ka, kb in pairs:
        rng = _rng(seed, _TAG_COLLUDE, server_round, zlib.crc32(ka.encode()))
        a = rng.standard_normal(np.shape(honest[ka]))
        b = rng.standard_normal(np.shape(honest[kb]))
        c = math.sqrt(per_module / _product_norm(a, b)) if per_module > 0 else 0.0
        out[ka], out[kb] = c * a, c * b
    return _like(out, honest)


def _benign_subspace(products: Sequence[np.ndarray], rank: int) -> np.ndarray:
    """Top ``rank`` left singular vectors of the centred benign products (p x k, k <= rank);
    directions below 1e-5 of the largest are float32 rounding of the uploads, not spread."""
    mean = np.mean(products, axis=0)
    u, sv, _ = np.linalg.svd(np.concatenate([P - mean for P in products], axis=1), full_matrices=False)
    k = int(min(rank, np.sum(sv > 1e-5 * (sv[0] if sv.size else 0.0))))
    return u[:, :k]


def _adaptive(honest: Mapping[str, np.ndarray], refs: Sequence[Mapping[str, np.ndarray]], k: float,
              inside: bool, seed: int, server_round: int) -> StateDict:
    """``subthreshold`` (``inside=False``) and ``in-subspace``: ``B -> B + dB`` per module with
    ``dB @ A`` aimed against the benign mean off (or inside) the estimated benign subspace, at
    the size the module docstring gives. A seeded random direction stands in where the aimed
    one vanishes (a benign mean with no part there)."""
    out: dict[str, np.ndarray] = dict(honest)
    for ka, kb in _module_pairs(honest):
        A = np.asarray(honest[ka], dtype=np.float64)
        B = np.asarray(honest[kb], dtype=np.float64)
        prods = [np.asarray(r[kb], dtype=np.float64) @ np.asarray(r[ka], dtype=np.float64) for r in refs]
        mean = np.mean(prods, axis=0)
        U = _benign_subspace(prods, A.shape[0])

        def place(D: np.ndarray) -> np.ndarray:
            inner = U @ (U.T @ D)
            return inner if inside else D - inner

        if inside:
            size = k * float(np.median([np.linalg.norm(U.T @ (P - mean)) for P in prods]))
        else:
            pair = [np.linalg.norm(P - Q) for i, P in enumerate(prods) for Q in prods[i + 1:]]
            size = k * CLAIR_FLAG_THRESHOLD * float(np.median(pair)) if pair else 0.0
        dB = place(-mean) @ np.linalg.pinv(A)
        if np.linalg.norm(dB @ A) <= 1e-12 * max(np.linalg.norm(mean), 1e-300):
            rng = _rng(seed, _TAG_ADAPT, server_round, zlib.crc32(kb.encode()))
            dB = place(rng.standard_normal(B.shape))
        dev = float(np.linalg.norm(dB @ A))
        out[kb] = B + (dB * (size / dev) if dev > 0 else 0.0)
    return _like(out, honest)


def _free_rider(honest: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray], stale: bool) -> StateDict:
    """Stale: the received adapter unchanged. Zero: ``B = 0`` with the received ``A`` (a valid,
    untrained-looking adapter whose ``dW`` is exactly 0)."""
    if stale:
        return _like(received, honest)
    return _like({k: (np.zeros_like(honest[k]) if _is_b(k) else received[k]) for k in honest}, honest)


def _digest(state: Mapping[str, np.ndarray]) -> int:
    """A process-independent hash of a state dict (Python's ``hash`` is salted per process)."""
    crc = 0
    for k in sorted(state):
        crc = zlib.crc32(k.encode(), crc)
        crc = zlib.crc32(np.ascontiguousarray(state[k]).tobytes(), crc)
    return crc


def poison_update(
    cfg: AttackConfig,
    honest: Mapping[str, np.ndarray],
    received: Mapping[str, np.ndarray],
    server_round: int,
    *,
    benign_reference: Sequence[Mapping[str, np.ndarray]] | None = None,
    num_clients: int | None = None,
    num_malicious: int | None = None,
    shared_norm: float | None = None,
    rng: np.random.Generator | None = None,
) -> StateDict:
    """The state dict a contaminated client uploads instead of ``honest``.

    Parameters
    ----------
    honest : the adapter trained honestly this round.
    received : what the server sent (used by the free-rider only).
    server_round : 1-based; before ``cfg.start_round``, and for ``none`` and data attacks (which
        act through the training data), ``honest`` is returned (as a copy).
    benign_reference : honestly trained benign adapters, for ALIE, IPM (mean/std), the adaptive
        attacks (:data:`NEEDS_REFERENCE`) and the colluders' norm; ``None`` falls back to the attacker's own ``honest`` (module docstring).
    num_clients, num_malicious : federation size, for ALIE's default ``z = alie_z(n, m)``.
    shared_norm : colluders' total ``||B A||`` norm, if the caller can give all colluders the
        same value; else :func:`colluder_norm` (times ``strength``).
    rng : noise source for ``gaussian``; default seeded by (seed, round, digest of ``honest``),
        so different attackers draw different noise and reruns are identical.

    Returns
    -------
    A new dict with ``honest``'s keys, shapes and dtypes.
    """
    if not is_active(cfg, server_round) or cfg.name not in MODEL_ATTACKS:
        return _like(honest, honest)
    k = resolve_strength(cfg, num_clients=num_clients, num_malicious=num_malicious)
    if cfg.name == "sign-flip":
        return _scale_b(honest, -k)
    if cfg.name == "scaling":
        return _scale_b(honest, k)
    if cfg.name == "gaussian":
        gen = rng if rng is not None else _rng(cfg.seed, _TAG_GAUSSIAN, server_round, _digest(honest))
        return _gaussian(honest, k, gen)
    if cfg.name == "free-rider":
        return _free_rider(honest, received, stale=k == 1.0)
    if cfg.name == "colluders":
        norm = shared_norm if shared_norm is not None else colluder_norm(honest, benign_reference)
        return _colluders(honest, cfg.seed, server_round, k * float(norm))
    refs = list(benign_reference) if benign_reference else _bootstrap_reference(honest, cfg.seed, server_round)
    if cfg.name == "alie":
        return _alie(honest, refs, k)
    if cfg.name in ("subthreshold", "in-subspace"):
        return _adaptive(honest, refs, k, cfg.name == "in-subspace", cfg.seed, server_round)
    return _ipm(honest, refs, k)
