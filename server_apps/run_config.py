"""The run configuration: one typed, validated object built once from Flower's run config.

``[tool.flwr.app.config]`` in ``pyproject.toml`` holds the defaults with kebab-case keys
(``lora-rank``); ``flwr run . --run-config "lora-rank=8"`` overrides them. Both the
ServerApp and the ClientApp call :meth:`RunConfig.from_mapping`, so a wrong value fails
fast with a message that names the key, what was given and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from clair_flower.clair.config import NO_STRUCTURE_POLICIES, ClairConfig
from clair_flower.clair.refinement import POLICIES
from clair_flower.copytask.attacks import ATTACKS, AttackConfig
from clair_flower.copytask.model import LoraSpec, ModelConfig
from clair_flower.copytask.task import PLANTED_BACKGROUNDS, TaskConfig
from clair_flower.copytask.training import OPTIMIZERS, TrainConfig
from clair_flower.strategies.protocol import DOWNLINKS

# Defaults live once, in the core's dataclasses; pyproject's [tool.flwr.app.config] repeats
# them for `flwr run`, and tests/apps/test_run_config.py checks that the two agree.
_TASK, _MODEL, _LORA, _TRAIN = TaskConfig(), ModelConfig(), LoraSpec(), TrainConfig()
_ATTACK, _CLAIR = AttackConfig(), ClairConfig()

MODEL_ARCHS = ("gpt2", "llama")
PROTOCOLS = ("rounds", "one-shot")
"""``rounds``: federated rounds of ``local-steps`` each. ``one-shot`` (the CLAIR paper's):
every client trains once from the same initial adapter (``local-steps`` should reach
convergence), the server aggregates once, each client is evaluated on what it receives."""
#: Strategies whose method is a sequence of rounds (RoLoRA alternates A and B between rounds).
ROUND_ONLY_STRATEGIES = ("rolora", "clair-rolora")
CLAIR_SOLVERS = ("fast", "reference")



class ConfigError(ValueError):
    """A run-config value that cannot be used; the message names the key."""


@dataclass(frozen=True)
class RunConfig:
    """Every knob of a run. Field ``lora_rank`` is run-config key ``lora-rank``."""

    # federation
    protocol: str = "rounds"
    num_server_rounds: int = 5
    strategy: str = "fedavg"
    seed: int = 0
    output_dir: str = ""
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_nodes: int = 2
    round_timeout: float = 600.0
    max_norm_ratio: float = 1000.0
    resume: bool = False
    train_cache_dir: str = ""
    # task
    vocab_size: int = _TASK.vocab_size
    min_len: int = _TASK.min_len
    max_len: int = _TASK.max_len
    num_train: int = _TASK.num_train
    num_test: int = _TASK.num_test
    dirichlet_alpha: float = _TASK.dirichlet_alpha
    planted: bool = _TASK.planted
    planted_rank: int = _TASK.planted_rank
    planted_mass: float = _TASK.planted_mass
    planted_background: str = _TASK.planted_background
    # model
    model_arch: str = _MODEL.arch
    model_layers: int = _MODEL.n_layer
    model_width: int = _MODEL.n_embd
    model_heads: int = _MODEL.n_head
    # LoRA
    lora_rank: int = _LORA.rank
    lora_alpha: float = _LORA.alpha
    lora_target_modules: str = ""
    use_rslora: bool = _LORA.use_rslora
    # local training
    local_steps: int = _TRAIN.local_steps
    learning_rate: float = _TRAIN.lr
    batch_size: int = _TRAIN.batch_size
    optimizer: str = _TRAIN.optimizer
    # contamination
    attack: str = _ATTACK.name
    attack_fraction: float = _ATTACK.fraction
    attack_start_round: int = _ATTACK.start_round
    attack_strength: float = 0.0
    attack_seed: int = _ATTACK.seed
    # CLAIR
    clair_rank: int = 0
    clair_solver: str = _CLAIR.solver
    clair_c: str = str(_CLAIR.c)
    clair_policy: str = _CLAIR.flagged_policy
    clair_no_structure: str = _CLAIR.no_structure
    clair_downlink: str = "own-rank"
    # robust baselines: attackers assumed by Krum/Bulyan/trimmed mean (-1: from attack-fraction)
    num_malicious: int = -1

    def __post_init__(self) -> None:
        from clair_flower.server_apps.strategy_factory import BUILDERS  # the strategy names are the builders'

        _one_of("strategy", self.strategy, tuple(BUILDERS))
        _one_of("model-arch", self.model_arch, MODEL_ARCHS)
        _one_of("clair-solver", self.clair_solver, CLAIR_SOLVERS)
        _one_of("clair-policy", self.clair_policy, POLICIES)
        _one_of("clair-no-structure", self.clair_no_structure, NO_STRUCTURE_POLICIES)
        _one_of("clair-downlink", self.clair_downlink, DOWNLINKS)
        _one_of("attack", self.attack, ATTACKS)
        _one_of("planted-background", self.planted_background, PLANTED_BACKGROUNDS)
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("protocol", self.protocol, PROTOCOLS)
        for key in ("num-server-rounds", "vocab-size", "min-len", "num-train", "num-test",
                    "model-layers", "model-width", "model-heads", "lora-rank", "local-steps",
                    "batch-size", "attack-start-round", "min-nodes"):
            _at_least(key, getattr(self, _field(key)), 1)
        _at_least("clair-rank", self.clair_rank, 0)
        if self.max_len < self.min_len:
            raise ConfigError(f"max-len ({self.max_len}) must be >= min-len ({self.min_len})")
        if self.model_width % self.model_heads:
            raise ConfigError(f"model-width ({self.model_width}) must be divisible by model-heads ({self.model_heads})")
        for key in ("fraction-train", "fraction-evaluate"):
            v = getattr(self, _field(key))
            if not 0.0 < v <= 1.0:
                raise ConfigError(f"{key} must be in (0, 1], got {v}")
        if not 0.0 <= self.attack_fraction < 0.5:
            raise ConfigError(f"attack-fraction must be in [0, 0.5) (a contaminated minority), got {self.attack_fraction}")
        for key in ("lora-alpha", "learning-rate", "dirichlet-alpha", "round-timeout", "max-norm-ratio"):
            if not getattr(self, _field(key)) > 0:
                raise ConfigError(f"{key} must be positive, got {getattr(self, _field(key))}")
        if self.clair_c != "auto":
            try:
                c = float(self.clair_c)
            except ValueError:
                raise ConfigError(f"clair-c must be 'auto' or a positive number, got {self.clair_c!r}") from None
            if c <= 0:
                raise ConfigError(f"clair-c must be positive, got {c}")
        if self.protocol == "one-shot":
            self._check_one_shot()
        if self.output_dir and not os.path.isabs(os.path.expanduser(self.output_dir)):
            raise ConfigError(
                f"output-dir must be an absolute path (the SuperLink's working directory is not "
                f"yours), got {self.output_dir!r}")
        if self.train_cache_dir and not os.path.isabs(os.path.expanduser(self.train_cache_dir)):
            raise ConfigError(f"train-cache-dir must be an absolute path, got {self.train_cache_dir!r}")
        if self.resume and not self.output_dir:
            raise ConfigError(
                "resume needs output-dir: checkpoints are read from the run's output directory, "
                "and without output-dir every run gets a new, empty one")

    def _check_one_shot(self) -> None:
        """One aggregation of adapters trained once: no later round, no attack that starts later."""
        if self.num_server_rounds != 1:
            raise ConfigError(f"protocol 'one-shot' aggregates once: set num-server-rounds = 1 "
                              f"(got {self.num_server_rounds})")
        if self.strategy in ROUND_ONLY_STRATEGIES:
            raise ConfigError(f"strategy {self.strategy!r} alternates A and B between rounds, which the "
                              f"'one-shot' protocol does not have; use protocol = 'rounds'")
        if self.attack_start_round != 1:
            raise ConfigError(f"protocol 'one-shot' has one round: attack-start-round must be 1, "
                              f"got {self.attack_start_round}")

    @classmethod
    def from_mapping(cls, run_config: Mapping[str, object]) -> RunConfig:
        """Build from Flower's ``context.run_config``: unknown keys and wrong types are errors."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        values: dict[str, object] = {}
        for key, value in run_config.items():
            if key not in known:
                near = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean '{near[0]}'?)" if near else ""
                raise ConfigError(f"unknown run-config key '{key}'{hint}")
            values[known[key].name] = _coerce(key, value, known[key].type)
        return cls(**values)  # type: ignore[arg-type]

    def to_mapping(self) -> dict[str, object]:
        """Kebab-case dict, the inverse of :meth:`from_mapping` (for summaries)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: object) -> RunConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @property
    def target_modules(self) -> tuple[str, ...] | None:
        """Comma-separated ``lora-target-modules``; empty means the architecture's default."""
        mods = tuple(m.strip() for m in self.lora_target_modules.split(",") if m.strip())
        return mods or None


def _field(key: str) -> str:
    return key.replace("-", "_")


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{key} must be >= {low}, got {value}")


def _coerce(key: str, value: object, typ: object) -> object:
    """Accept what TOML and ``--run-config`` produce; refuse lossy conversions."""
    name = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    if name == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if name == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if name == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


# -- the core's own config objects, built from one validated RunConfig ------------------------

def task_config(cfg: RunConfig) -> TaskConfig:
    return TaskConfig(vocab_size=cfg.vocab_size, min_len=cfg.min_len, max_len=cfg.max_len,
                      num_train=cfg.num_train, num_test=cfg.num_test,
                      dirichlet_alpha=cfg.dirichlet_alpha, seed=cfg.seed, planted=cfg.planted,
                      planted_rank=cfg.planted_rank, planted_mass=cfg.planted_mass,
                      planted_background=cfg.planted_background)


def base_task_config(cfg: RunConfig) -> TaskConfig:
    """The task the base model is pre-trained on: independent of the run seed, so every
    seed of an experiment fine-tunes the same base model (pre-trained once, cached)."""
    return dataclasses.replace(task_config(cfg), seed=0)


def model_config(cfg: RunConfig) -> ModelConfig:
    return ModelConfig(arch=cfg.model_arch, n_layer=cfg.model_layers, n_embd=cfg.model_width,
                       n_head=cfg.model_heads, max_positions=max(64, 2 * cfg.max_len + 2))


def lora_spec(cfg: RunConfig) -> LoraSpec:
    return LoraSpec(rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                    target_modules=cfg.target_modules or (), use_rslora=cfg.use_rslora)


def train_config(cfg: RunConfig) -> TrainConfig:
    return TrainConfig(local_steps=cfg.local_steps, lr=cfg.learning_rate, batch_size=cfg.batch_size,
                       optimizer=cfg.optimizer)


def attack_config(cfg: RunConfig) -> AttackConfig:
    from clair_flower.copytask.attacks import UnknownAttackError

    kwargs: dict[str, object] = dict(name=cfg.attack, fraction=cfg.attack_fraction,
                                     start_round=cfg.attack_start_round, seed=cfg.attack_seed)
    if cfg.attack_strength > 0:
        kwargs["strength"] = cfg.attack_strength
    try:
        return AttackConfig(**kwargs)  # type: ignore[arg-type]
    except (UnknownAttackError, ValueError) as err:
        raise ConfigError(f"attack: {err}") from None
