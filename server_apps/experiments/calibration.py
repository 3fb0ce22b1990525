"""Calibration before comparison: does a grid configuration test what its table claims?

A method comparison means something only if (i) local training has converged (otherwise
"better than local" measures under-training), (ii) collaboration helps (the oracle, FedAvg
over the benign clients alone, beats local training; otherwise there is nothing for a robust
method to protect) and (iii) the attack hurts (the oracle beats FedAvg by a visible margin,
or a backdoor takes under FedAvg; otherwise there is nothing to recover). Each check is
computed per seed from the configuration's ``local``, ``oracle`` and ``fedavg`` cells and
judged on the seed mean; a configuration that fails one is marked in every table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from clair_flower.server_apps.experiments.stats import Interval, mean_ci
from clair_flower.server_apps.experiments.tables import METHOD_KEY_PREFIX

#: Row columns that define one configuration (everything a method comparison holds fixed).
CONFIG_KEY = ("protocol", "planted", "attack", "attack-fraction", "lora-rank", "num-nodes", "model-width",
              "num-server-rounds", "local-steps", "optimizer")
#: (i) the local cell's train token accuracy rose by less than this at the end of training.
PLATEAU_TOL = 0.02
#: (iii) oracle minus FedAvg benign token accuracy, at least.
ATTACK_DAMAGE = 0.05
#: (iii) for the backdoor: benign clients' backdoor success under FedAvg, at least.
BACKDOOR_SUCCESS = 0.5
ACC = "final-benign-token-acc"


@dataclass(frozen=True)
class Check:
    """One calibration check of a configuration: the measured seed mean (with its interval),
    the threshold, and whether it passed (None: a cell it needs did not run)."""

    name: str
    value: Interval | None
    threshold: str
    passed: bool | None


@dataclass(frozen=True)
class Calibration:
    """The checks of one configuration."""

    key: tuple[object, ...]
    checks: tuple[Check, ...]

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if c.passed is False]

    @property
    def mark(self) -> str:
        """What the tables print next to the configuration's figures: ``""`` when it passed."""
        return f" [fails: {', '.join(self.failed)}]" if self.failed else ""


def other_axes(row: Mapping[str, object]) -> str:
    """The cell's grid axes outside :data:`CONFIG_KEY` (``dirichlet-alpha=10`` ...), read from
    its name, so a grid that sweeps any run-config key keeps its configurations apart."""
    parts = str(row.get("cell", "")).split("__")
    return " ".join(sorted(p for p in parts if "=" in p and p.split("=")[0] not in CONFIG_KEY
                           and not p.startswith(METHOD_KEY_PREFIX)))


def config_key(row: Mapping[str, object]) -> tuple[object, ...]:
    """:data:`CONFIG_KEY`'s values, then :func:`other_axes`."""
    return (*(row.get(k) for k in CONFIG_KEY), other_axes(row))


def _by_seed(rows: Sequence[Mapping[str, object]], strategy: str, key: str) -> dict[int, float]:
    return {int(r["seed"]): float(r[key]) for r in rows  # type: ignore[call-overload, arg-type]
            if r["strategy"] == strategy and r.get(key) is not None}


def _differences(a: Mapping[int, float], b: Mapping[int, float]) -> list[float]:
    return [a[s] - b[s] for s in sorted(set(a) & set(b))]


def _check(name: str, values: list[float], threshold: str, ok) -> Check:  # noqa: ANN001
    interval = mean_ci(values)
    return Check(name, interval, threshold, None if interval is None else bool(ok(interval.mean)))


def calibrate(rows: Sequence[Mapping[str, object]]) -> Calibration:
    """The checks of one configuration's rows (every strategy and seed of it)."""
    local = _by_seed(rows, "local", ACC)
    oracle = _by_seed(rows, "oracle", ACC)
    fedavg = _by_seed(rows, "fedavg", ACC)
    plateau = list(_by_seed(rows, "local", "train-plateau-gain").values())
    checks = [
        _check("converged", plateau, f"local train-acc gain at the end < {PLATEAU_TOL}",
               lambda v: v < PLATEAU_TOL),
        _check("collaboration", _differences(oracle, local), "oracle - local > 0", lambda v: v > 0),
    ]
    attack, fraction = rows[0].get("attack"), float(rows[0].get("attack-fraction") or 0.0)  # type: ignore[arg-type]
    if attack == "backdoor" and fraction > 0:
        asr = list(_by_seed(rows, "fedavg", "final-backdoor-asr").values())
        checks.append(_check("attack", asr, f"backdoor success under FedAvg >= {BACKDOOR_SUCCESS}",
                             lambda v: v >= BACKDOOR_SUCCESS))
    elif attack != "none" and fraction > 0:
        checks.append(_check("attack", _differences(oracle, fedavg), f"oracle - fedavg >= {ATTACK_DAMAGE}",
                             lambda v: v >= ATTACK_DAMAGE))
    return Calibration(config_key(rows[0]), tuple(checks))


def calibrate_all(rows: Sequence[Mapping[str, object]]) -> dict[tuple[object, ...], Calibration]:
    """Every configuration of the done rows, by :func:`config_key`."""
    groups: dict[tuple[object, ...], list[Mapping[str, object]]] = {}
    for r in rows:
        if r.get("status") == "done":
            groups.setdefault(config_key(r), []).append(r)
    return {k: calibrate(g) for k, g in groups.items()}
