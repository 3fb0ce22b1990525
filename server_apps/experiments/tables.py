"""Selecting and pivoting result rows: the tables that the report and the plots share."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from clair_flower.server_apps.experiments.grid import Grid

#: Strategies that flag clients (their rounds carry TPR/FPR).
FLAGGING = ("clair", "clair-plus", "clair-rolora")
#: Grid axes that make a variant of a method (its rows read ``clair (clair-downlink=merged-delta)``).
METHOD_KEY_PREFIX = "clair-"


def is_flagging(row: Mapping[str, object]) -> bool:
    """Whether the row's method flags clients (a variant of a flagging strategy does too)."""
    return str(row.get("base-strategy", row["strategy"])) in FLAGGING


def done_rows(rows: Iterable[Mapping[str, object]]) -> list[Mapping[str, object]]:
    return [r for r in rows if r.get("status") == "done"]


def seed_mean(rows: Sequence[Mapping[str, object]], key: str) -> float | None:
    vals = [float(r[key]) for r in rows if r.get(key) is not None]  # type: ignore[arg-type]
    return float(np.mean(vals)) if vals else None


def ordered(values: Iterable[object], order: Sequence[object] = ()) -> list[object]:
    uniq = list(dict.fromkeys(values))
    def key(v: object) -> tuple[int, float, str]:
        number = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.inf
        return (order.index(v) if v in order else len(order), number, str(v))

    return sorted(uniq, key=key)


STRATEGY_ORDER = ("local", "fedavg", "oracle", "krum", "multikrum", "fedmedian", "fedtrimmedavg", "bulyan",
                  "ffa-lora", "rolora", "clair", "clair-plus", "clair-rolora")


def select_rows(rows: Iterable[Mapping[str, object]], **match: object) -> list[Mapping[str, object]]:
    return [r for r in rows if all(r.get(k.replace("_", "-")) == v for k, v in match.items())]


def pivot(rows: Sequence[Mapping[str, object]], row_key: str, col_key: str, value: str,
          row_order: Sequence[object] = (), col_order: Sequence[object] = ()
          ) -> tuple[list[object], list[object], list[list[float | None]]]:
    """Mean of ``value`` over seeds for each (row, column) pair; None where no cell ran."""
    rks = ordered((r[row_key] for r in rows), row_order)
    cks = ordered((r[col_key] for r in rows), col_order)
    table = [[seed_mean([r for r in rows if r[row_key] == rk and r[col_key] == ck], value) for ck in cks]
             for rk in rks]
    return rks, cks, table


def attack_rows(rows: Sequence[Mapping[str, object]], grid: Grid) -> list[Mapping[str, object]]:
    """Cells of the method x attack table: headline fraction and rank, plus the ``none`` column
    (no attack) at the headline rank, whatever its fraction."""
    at_rank = select_rows(done_rows(rows), lora_rank=grid.headline_rank)
    return [r for r in at_rank if r["attack-fraction"] == grid.headline_fraction or r["attack"] == "none"]


def fraction_rows(rows: Sequence[Mapping[str, object]], grid: Grid) -> list[Mapping[str, object]]:
    """Cells of the accuracy-vs-fraction sweep: headline rank, attacks with > 1 fraction."""
    at_rank = select_rows(done_rows(rows), lora_rank=grid.headline_rank)
    swept = {a for a in {r["attack"] for r in at_rank}
             if len({r["attack-fraction"] for r in at_rank if r["attack"] == a}) > 1}
    return [r for r in at_rank if r["attack"] in swept]


def rank_rows(rows: Sequence[Mapping[str, object]], grid: Grid) -> list[Mapping[str, object]]:
    """Cells of the r/p sweep: headline fraction, (attack) groups with > 1 rank."""
    at_f = select_rows(done_rows(rows), attack_fraction=grid.headline_fraction)
    swept = {a for a in {r["attack"] for r in at_f}
             if len({r["lora-rank"] for r in at_f if r["attack"] == a}) > 1}
    return [r for r in at_f if r["attack"] in swept]


def gain_over_local(rows: Sequence[Mapping[str, object]], method: str = "clair"
                    ) -> list[tuple[str, int, float, float]]:
    """(attack, rank, r/p, method's final benign token-acc minus local's) per swept rank."""
    out = []
    for attack in ordered(r["attack"] for r in rows):
        for rank in sorted({int(r["lora-rank"]) for r in rows if r["attack"] == attack}):  # type: ignore[call-overload]
            sel = [r for r in rows if r["attack"] == attack and r["lora-rank"] == rank]
            mine = seed_mean([r for r in sel if r["strategy"] == method], "final-benign-token-acc")
            local = seed_mean([r for r in sel if r["strategy"] == "local"], "final-benign-token-acc")
            if mine is not None and local is not None:
                width = int(sel[0]["model-width"])  # type: ignore[call-overload]
                out.append((str(attack), rank, rank / width, mine - local))
    return out


def seeds_of(rows: Iterable[Mapping[str, object]]) -> list[int]:
    return sorted({int(r["seed"]) for r in rows})  # type: ignore[call-overload]


def gain_by_seed(rows: Sequence[Mapping[str, object]], method: str = "clair"
                 ) -> dict[tuple[str, int], dict[int, float]]:
    """{(attack, rank): {seed: method's final benign token-acc minus local's}}, same seed only."""
    out: dict[tuple[str, int], dict[int, float]] = {}
    acc = {(r["strategy"], r["attack"], int(r["lora-rank"]), int(r["seed"])): r.get("final-benign-token-acc")  # type: ignore[call-overload]
           for r in rows}
    for (strat, attack, rank, seed), mine in acc.items():
        local = acc.get(("local", attack, rank, seed))
        if strat == method and mine is not None and local is not None:
            out.setdefault((str(attack), rank), {})[seed] = float(mine) - float(local)  # type: ignore[arg-type]
    return out
