"""Run config -> strategy: the one place where a strategy name becomes an object."""

from __future__ import annotations

from collections.abc import Callable

from flwr.serverapp.strategy import Bulyan, FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Strategy

from server_apps.run_config import ConfigError, RunConfig
from strategies.local import LocalOnly
from strategies.screen import ReplyScreen
from strategies.screened import ScreenedStrategy


def assumed_attackers(cfg: RunConfig, num_nodes: int) -> int:
    """Attackers the Krum/Bulyan family is told to expect (``num-malicious``, or the
    contaminated fraction times the federation size)."""
    if cfg.num_malicious >= 0:
        return cfg.num_malicious
    return int(round(cfg.attack_fraction * num_nodes))


def _sampling(cfg: RunConfig) -> dict[str, object]:
    return dict(fraction_train=cfg.fraction_train, fraction_evaluate=cfg.fraction_evaluate,
                min_train_nodes=cfg.min_nodes, min_evaluate_nodes=cfg.min_nodes,
                min_available_nodes=cfg.min_nodes)


def _screened(strategy: Strategy, cfg: RunConfig) -> Strategy:
    return ScreenedStrategy(strategy, ReplyScreen(max_norm_ratio=cfg.max_norm_ratio))


def _clair(cfg: RunConfig, num_nodes: int, plus: bool = False) -> Strategy:
    from strategies.clair import ClairStrategy  # imports cvxpy: only when CLAIR is asked for

    lam: str | float = cfg.clair_lambda if cfg.clair_lambda == "auto" else float(cfg.clair_lambda)
    kwargs = _sampling(cfg)
    kwargs["min_train_nodes"] = max(3, cfg.min_nodes)
    kwargs["min_available_nodes"] = max(3, cfg.min_nodes)
    return ClairStrategy(lora_alpha=cfg.lora_alpha, use_rslora=cfg.use_rslora,
                         rank=cfg.clair_rank or None, solver=cfg.clair_solver, lam=lam,
                         flagged_policy=cfg.clair_policy, no_structure=cfg.clair_no_structure,
                         in_subspace_stage=plus, seed=cfg.seed,
                         max_norm_ratio=cfg.max_norm_ratio, **kwargs)  # type: ignore[arg-type]


def _krum_family(cfg: RunConfig, num_nodes: int, name: str) -> Strategy:
    f = assumed_attackers(cfg, num_nodes)
    base = dict(fraction_train=cfg.fraction_train, fraction_evaluate=cfg.fraction_evaluate,
                min_train_nodes=cfg.min_nodes, min_evaluate_nodes=cfg.min_nodes,
                min_available_nodes=cfg.min_nodes)
    if name == "krum":
        inner: Strategy = Krum(num_malicious_nodes=f, **base)  # type: ignore[arg-type]
    elif name == "multikrum":
        inner = MultiKrum(num_malicious_nodes=f, num_nodes_to_select=max(1, num_nodes - f), **base)  # type: ignore[arg-type]
    else:
        # Bulyan needs n >= 4f + 3 replies; with fewer it would skip every round.
        inner = Bulyan(num_malicious_nodes=min(f, max(0, (num_nodes - 3) // 4)), **base)  # type: ignore[arg-type]
    return _screened(inner, cfg)


def _trimmed(cfg: RunConfig, num_nodes: int) -> Strategy:
    f = assumed_attackers(cfg, num_nodes)
    beta = min(0.45, f / max(num_nodes, 1)) if f else 0.1
    return _screened(FedTrimmedAvg(beta=beta, **_sampling(cfg)), cfg)  # type: ignore[arg-type]


def _factorwise(cfg: RunConfig, name: str) -> Strategy:
    """RoLoRA, FFA-LoRA or CLAIR-RoLoRA: one LoRA factor trained and uploaded per round."""
    from strategies.ffa_lora import FFALoRA
    from strategies.rolora import RoLoRA

    kwargs = dict(_sampling(cfg), max_norm_ratio=cfg.max_norm_ratio)
    if name == "rolora":
        return RoLoRA(**kwargs)  # type: ignore[arg-type]
    if name == "ffa-lora":
        return FFALoRA(**kwargs)  # type: ignore[arg-type]
    from strategies.clair_rolora import ClairRoLoRA  # imports cvxpy: only when asked for

    kwargs["min_train_nodes"] = max(3, cfg.min_nodes)
    kwargs["min_available_nodes"] = max(3, cfg.min_nodes)
    lam: str | float = cfg.clair_lambda if cfg.clair_lambda == "auto" else float(cfg.clair_lambda)
    return ClairRoLoRA(lora_alpha=cfg.lora_alpha, use_rslora=cfg.use_rslora, rank=cfg.clair_rank or None,
                       solver=cfg.clair_solver, lam=lam, seed=cfg.seed, **kwargs)  # type: ignore[arg-type]


BUILDERS: dict[str, Callable[[RunConfig, int], Strategy]] = {
    "fedavg": lambda c, n: _screened(FedAvg(**_sampling(c)), c),  # type: ignore[arg-type]
    "oracle": lambda c, n: _screened(FedAvg(**_sampling(c)), c),  # type: ignore[arg-type]
    "local": lambda c, n: LocalOnly(screen=ReplyScreen(max_norm_ratio=c.max_norm_ratio), **_sampling(c)),  # type: ignore[arg-type]
    "clair": _clair,
    "clair-plus": lambda c, n: _clair(c, n, plus=True),
    "krum": lambda c, n: _krum_family(c, n, "krum"),
    "multikrum": lambda c, n: _krum_family(c, n, "multikrum"),
    "bulyan": lambda c, n: _krum_family(c, n, "bulyan"),
    "fedmedian": lambda c, n: _screened(FedMedian(**_sampling(c)), c),  # type: ignore[arg-type]
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
