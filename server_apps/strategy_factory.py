"""Run config -> strategy: the one place where a strategy name becomes an object."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypedDict

from flwr.serverapp.strategy import Bulyan, FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Strategy

from clair_flower.clair.config import ClairConfig
from clair_flower.server_apps.run_config import ConfigError, RunConfig
from clair_flower.strategies.local import LocalOnly
from clair_flower.strategies.screen import ReplyScreen
from clair_flower.strategies.screened import ScreenedStrategy


def assumed_attackers(cfg: RunConfig, num_nodes: int) -> int:
    """Attackers the Krum/Bulyan family is told to expect (``num-malicious``, or the
    contaminated fraction times the federation size)."""
    if cfg.num_malicious >= 0:
        return cfg.num_malicious
    return int(round(cfg.attack_fraction * num_nodes))


class Sampling(TypedDict):
    """Flower's sampling arguments, as every strategy here takes them."""

    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_evaluate_nodes: int
    min_available_nodes: int


def _sampling(cfg: RunConfig, at_least: int = 0) -> Sampling:
    """Sampling from the run config; training needs ``at_least`` nodes (CLAIR: 3)."""
    return Sampling(fraction_train=cfg.fraction_train, fraction_evaluate=cfg.fraction_evaluate,
                    min_train_nodes=max(at_least, cfg.min_nodes), min_evaluate_nodes=cfg.min_nodes,
                    min_available_nodes=max(at_least, cfg.min_nodes))


def _screened(strategy: Strategy, cfg: RunConfig) -> Strategy:
    return ScreenedStrategy(strategy, ReplyScreen(max_norm_ratio=cfg.max_norm_ratio))


def _clair_config(cfg: RunConfig, plus: bool = False) -> ClairConfig:
    """The run config's CLAIR settings, packed once."""
    c: str | float = cfg.clair_c if cfg.clair_c == "auto" else float(cfg.clair_c)
    return ClairConfig(rank=cfg.clair_rank or None, solver=cfg.clair_solver, c=c,
                       flagged_policy=cfg.clair_policy, no_structure=cfg.clair_no_structure,
                       in_subspace_stage=plus, seed=cfg.seed)


def _clair(cfg: RunConfig, num_nodes: int, plus: bool = False) -> Strategy:
    from clair_flower.strategies.clair import ClairStrategy  # imports cvxpy: only when CLAIR is asked for

    # rank_probe off: every copy-task client trains at the run config's lora-rank, and this
    # project's ClientApp refuses the probe's empty adapter (one wasted message per node).
    return ClairStrategy(lora_alpha=cfg.lora_alpha, use_rslora=cfg.use_rslora, config=_clair_config(cfg, plus),
                         max_norm_ratio=cfg.max_norm_ratio, rank_probe=False, downlink=cfg.clair_downlink,
                         **_sampling(cfg, at_least=3))


def _krum_family(cfg: RunConfig, num_nodes: int, name: str) -> Strategy:
    f = assumed_attackers(cfg, num_nodes)
    if name == "krum":
        inner: Strategy = Krum(num_malicious_nodes=f, **_sampling(cfg))
    elif name == "multikrum":
        inner = MultiKrum(num_malicious_nodes=f, num_nodes_to_select=max(1, num_nodes - f), **_sampling(cfg))
    else:
        # Bulyan needs n >= 4f + 3 replies; with fewer it would skip every round.
        inner = Bulyan(num_malicious_nodes=min(f, max(0, (num_nodes - 3) // 4)), **_sampling(cfg))
    return _screened(inner, cfg)


def _trimmed(cfg: RunConfig, num_nodes: int) -> Strategy:
    f = assumed_attackers(cfg, num_nodes)
    beta = min(0.45, f / max(num_nodes, 1)) if f else 0.1
    return _screened(FedTrimmedAvg(beta=beta, **_sampling(cfg)), cfg)


def _factorwise(cfg: RunConfig, name: str) -> Strategy:
    """RoLoRA, FFA-LoRA or CLAIR-RoLoRA: one LoRA factor trained and uploaded per round."""
    from clair_flower.strategies.ffa_lora import FFALoRA
    from clair_flower.strategies.rolora import RoLoRA

    if name == "rolora":
        return RoLoRA(max_norm_ratio=cfg.max_norm_ratio, **_sampling(cfg))
    if name == "ffa-lora":
        return FFALoRA(max_norm_ratio=cfg.max_norm_ratio, **_sampling(cfg))
    from clair_flower.strategies.clair_rolora import ClairRoLoRA  # imports cvxpy: only when asked for

    # CLAIR-RoLoRA has no flagged_policy / no_structure: flagged clients are dropped.
    config = ClairConfig(rank=cfg.clair_rank or None, solver=cfg.clair_solver, c=_clair_config(cfg).c,
                         seed=cfg.seed)
    return ClairRoLoRA(lora_alpha=cfg.lora_alpha, use_rslora=cfg.use_rslora, config=config,
                       max_norm_ratio=cfg.max_norm_ratio, **_sampling(cfg, at_least=3))


BUILDERS: dict[str, Callable[[RunConfig, int], Strategy]] = {
    "fedavg": lambda c, n: _screened(FedAvg(**_sampling(c)), c),
    "oracle": lambda c, n: _screened(FedAvg(**_sampling(c)), c),
    "local": lambda c, n: LocalOnly(max_norm_ratio=c.max_norm_ratio, rank_probe=False, **_sampling(c)),
    "clair": _clair,
    "clair-plus": lambda c, n: _clair(c, n, plus=True),
    "krum": lambda c, n: _krum_family(c, n, "krum"),
    "multikrum": lambda c, n: _krum_family(c, n, "multikrum"),
    "bulyan": lambda c, n: _krum_family(c, n, "bulyan"),
    "fedmedian": lambda c, n: _screened(FedMedian(**_sampling(c)), c),
    "fedtrimmedavg": _trimmed,
    "rolora": lambda c, n: _factorwise(c, "rolora"),
    "ffa-lora": lambda c, n: _factorwise(c, "ffa-lora"),
    "clair-rolora": lambda c, n: _factorwise(c, "clair-rolora"),
}


def build_strategy(cfg: RunConfig, num_nodes: int) -> Strategy:
    """The strategy named by ``cfg.strategy``, sized for ``num_nodes`` connected nodes.

    ``oracle`` is FedAvg; the ServerApp feeds it only the truly benign replies.
    """
    try:
        builder = BUILDERS[cfg.strategy]
    except KeyError:
        raise ConfigError(f"strategy '{cfg.strategy}' is not available; choose one of "
                          f"{', '.join(sorted(BUILDERS))}") from None
    return builder(cfg, num_nodes)
