"""RoLoRA's client-count trend from the experiment runner's rows (configs/rolora.toml).

Usage::

    python scripts/rolora_trend.py outputs/experiments/rolora [--metric final-benign-token-acc]

Reads ``results.csv`` (or, for a grid still running, every finished cell's ``summary.json``) and
prints Markdown tables: per client count, each method's mean with its 95% t-interval over seeds,
and the paired per-seed differences RoLoRA - FedAvg-LoRA and RoLoRA - FFA-LoRA, at equal rounds
and at equal uplink bytes (FedAvg-LoRA at half RoLoRA's rounds). A difference whose interval
contains 0, or whose mean is smaller than the seed spread (the larger standard deviation over
seeds of the two methods), is "no difference" (the latter flagged "paired better/worse"). The trend (does RoLoRA's advantage grow with
the number of clients?) is the difference at the largest client count minus that at the
smallest, with a Welch interval (different federations, so not paired). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from clair_flower.server_apps.experiments.stats import Interval, mean_ci, paired_ci, welch_ci

NAMES = {"fedavg": "FedAvg-LoRA", "ffa-lora": "FFA-LoRA", "rolora": "RoLoRA"}
Key = tuple[str, int, int]  # (strategy, num-nodes, num-server-rounds)


def verdict(diff: Interval, spread: float) -> str:
    """"RoLoRA better/worse" only when the interval excludes 0 and the mean exceeds the seed
    spread; a paired interval that excludes 0 with a mean inside the spread is still "no
    difference", and says so (consistent per seed, but smaller than seed-to-seed variation)."""
    if not diff.excludes_zero():
        return "no difference"
    sign = "better" if diff.mean > 0 else "worse"
    if abs(diff.mean) < spread:
        return f"no difference: paired {sign}, < seed SD {spread:.3f}"
    return f"RoLoRA {sign}"


# -- reading the runner's output -------------------------------------------------------------

def read_rows(out: Path) -> list[dict[str, object]]:
    """``results.csv`` rows, or (grid still running) one row per finished cell's summary."""
    csv_path = out / "results.csv"
    if csv_path.exists():
        with csv_path.open() as fh:
            return [dict(r) for r in csv.DictReader(fh)]
    rows = []
    for path in sorted((out / "cells").glob("*/summary.json")):
        s = json.loads(path.read_text())
        cfg = s.get("config", {})
        rows.append({"cell": path.parent.name, "status": "done", "strategy": s.get("strategy"),
                     "seed": cfg.get("seed"), "num-nodes": s.get("num-nodes"),
                     "num-server-rounds": cfg.get("num-server-rounds"),
                     "final-benign-token-acc": s.get("final-benign-token-acc"),
                     "final-benign-exact-acc": s.get("final-benign-exact-acc"),
                     "total-bytes-up": s.get("total-bytes-up")})
    return rows


def by_seed(rows: Sequence[Mapping[str, object]], metric: str) -> dict[Key, dict[int, float]]:
    """(strategy, nodes, rounds) -> seed -> metric, finished cells only."""
    table: dict[Key, dict[int, float]] = {}
    for r in rows:
        if r.get("status") != "done" or r.get(metric) in (None, ""):
            continue
        key = (str(r["strategy"]), int(r["num-nodes"]), int(r["num-server-rounds"]))  # type: ignore[call-overload]
        table.setdefault(key, {})[int(r["seed"])] = float(r[metric])  # type: ignore[arg-type]
    return table


def bytes_per_client(rows: Sequence[Mapping[str, object]]) -> dict[Key, float]:
    """Mean uplink bytes per client over the run, per (strategy, nodes, rounds)."""
    out: dict[Key, list[float]] = {}
    for r in rows:
        if r.get("status") == "done" and r.get("total-bytes-up") not in (None, ""):
            key = (str(r["strategy"]), int(r["num-nodes"]), int(r["num-server-rounds"]))  # type: ignore[call-overload]
            out.setdefault(key, []).append(float(r["total-bytes-up"]) / int(r["num-nodes"]))  # type: ignore[arg-type, call-overload]
    return {k: float(np.mean(v)) for k, v in out.items()}


# -- the tables ------------------------------------------------------------------------------

def comparison(table: Mapping[Key, Mapping[int, float]], nodes: int, rolora_rounds: int,
               fedavg_rounds: int) -> dict[str, object] | None:
    """Means and paired differences at one client count (None if RoLoRA's cells are missing)."""
    ro = table.get(("rolora", nodes, rolora_rounds))
    fa = table.get(("fedavg", nodes, fedavg_rounds))
    ff = table.get(("ffa-lora", nodes, rolora_rounds))
    if not ro:
        return None
    res: dict[str, object] = {"nodes": nodes, "rolora": mean_ci(ro.values()),
                              "fedavg": mean_ci(fa.values()) if fa else None,
                              "ffa-lora": mean_ci(ff.values()) if ff else None}
    for name, other in (("fedavg", fa), ("ffa-lora", ff)):
        diff = paired_ci(ro, other) if other else None
        res[f"rolora-minus-{name}"] = diff
        if diff is not None:
            spread = max(res["rolora"].sd or 0.0, res[name].sd or 0.0)  # type: ignore[union-attr]
            res[f"verdict-vs-{name}"] = verdict(diff, spread)
    return res


def trend(rows: Sequence[Mapping[str, object]], key: str) -> Interval | None:
    """The difference ``key`` at the largest client count minus at the smallest (Welch)."""
    have = [r for r in rows if r.get(key) is not None]
    if len(have) < 2:
        return None
    lo, hi = have[0][key], have[-1][key]
    return welch_ci(hi, lo) if lo.n > 1 and hi.n > 1 else None  # type: ignore[arg-type, union-attr]


def fmt(e: object) -> str:
    return e.text() if isinstance(e, Interval) else "-"


def markdown(title: str, rows: Sequence[Mapping[str, object]], fedavg_label: str) -> list[str]:
    lines = [f"### {title}", "",
             f"| clients | {fedavg_label} | FFA-LoRA | RoLoRA | RoLoRA - FedAvg (paired) | "
             "RoLoRA - FFA (paired) | seeds |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        n = r["rolora"].n  # type: ignore[union-attr]
        lines.append(f"| {r['nodes']} | {fmt(r['fedavg'])} | {fmt(r['ffa-lora'])} | {fmt(r['rolora'])} | "
                     f"{fmt(r.get('rolora-minus-fedavg'))} ({r.get('verdict-vs-fedavg', '-')}) | "
                     f"{fmt(r.get('rolora-minus-ffa-lora'))} ({r.get('verdict-vs-ffa-lora', '-')}) | {n} |")
    return lines


def jsonable(obj: object) -> object:
    if isinstance(obj, Interval):
        return {k: (None if v is None or (isinstance(v, float) and math.isnan(v)) else round(v, 5))
                for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [jsonable(v) for v in obj]
    return obj


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the runner's output directory (outputs/experiments/rolora)")
    parser.add_argument("--metric", default="final-benign-token-acc",
                        help="results.csv column to compare (default final-benign-token-acc)")
    parser.add_argument("--rounds", type=int, default=4, help="RoLoRA's and FFA-LoRA's rounds (default 4)")
    args = parser.parse_args(argv)
    rows = read_rows(args.out)
    table = by_seed(rows, args.metric)
    nodes = sorted({k[1] for k in table})
    half = args.rounds // 2
    equal_rounds = [c for n in nodes if (c := comparison(table, n, args.rounds, args.rounds))]
    equal_bytes = [c for n in nodes if (c := comparison(table, n, args.rounds, half))]
    up = bytes_per_client(rows)
    print(f"RoLoRA's client-count trend: {args.metric}, mean ± 95% t-interval over seeds; "
          f"paired differences over the seeds both ran ({args.out})\n")
    lines = markdown(f"Equal rounds ({args.rounds} each)", equal_rounds, f"FedAvg-LoRA ({args.rounds} rounds)")
    lines += [""] + markdown(f"Equal uplink bytes (FedAvg-LoRA {half} rounds, RoLoRA and FFA-LoRA {args.rounds})",
                             equal_bytes, f"FedAvg-LoRA ({half} rounds)")
    tr = {f"{setting}:{key}": trend(rs, key) for setting, rs in (("equal-rounds", equal_rounds),
                                                                 ("equal-bytes", equal_bytes))
          for key in ("rolora-minus-fedavg", "rolora-minus-ffa-lora")}
    if nodes:
        lines += ["", f"Trend: difference at {nodes[-1]} clients minus at {nodes[0]} (Welch 95% interval; "
                  "positive = RoLoRA's advantage grows with the client count)", ""]
        lines += [f"- {k}: {fmt(v)}" + ("" if v is None else f" ({'grows' if v.lo > 0 else 'shrinks' if v.hi < 0 else 'no trend'})")
                  for k, v in tr.items()]
    lines += ["", "Uplink bytes per client over the run: " + ", ".join(
        f"{NAMES.get(k[0], k[0])} {k[2]} rounds {v:,.0f}" for k, v in sorted(up.items()) if k[1] == (nodes[0] if nodes else 0))]
    print("\n".join(lines))
    print(json.dumps(jsonable({"metric": args.metric, "equal-rounds": equal_rounds, "equal-bytes": equal_bytes,
                               "trend": tr, "bytes-up-per-client": {f"{k[0]}:{k[1]}:{k[2]}": v for k, v in up.items()}})))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
