"""Does CLAIR identify by its own vote, and are benign clients better off? Planted vs natural task.

Runs, in-process (the real ClientApp and ServerApp code, no Ray), the multi-round protocol on two
workloads (``--workloads``), ``planted`` (benign clients differ only by remapping a shared token set, the paper's
model on a transformer) and ``natural`` (the plain copy task), each with 10 clients of which 30%
are contaminated (random targets), and optionally ``planted-seen`` (the planted task on the
vocabulary the base model copies, SGD clients: where the model holds on one-shot uploads), for
several seeds (a seed changes the data, the adapter's
initialisation and which partitions attack). Strategies: CLAIR, FedAvg, local-only and the
oracle (FedAvg over the true benign set). Prints a table and, last, one JSON object with per
workload:

- ``vote_decided_fraction``: CLAIR rounds whose flags came from the pair vote (not the score
  fallback and not "nobody flagged by anyone");
- ``tpr``, ``fpr``: CLAIR's detection rates, mean over rounds and seeds;
- ``benign_acc_clair`` / ``_fedavg`` / ``_local`` / ``_oracle``: final mean benign token
  accuracy, mean over seeds (``*_per_seed`` lists alongside);
- ``downlink_norm_loss``: CLAIR's largest relative truncation error of a refined adapter per
  round (the part of the refined update lost by re-factoring to the client's rank), mean.

    python benchmarks/identification.py [--seeds 3] [--rounds 5] [--nodes 10] [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

from clair_flower.client_apps.copy_client import app as copy_client_app
from clair_flower.server_apps.inprocess import InProcessGrid, simulation_node_configs
from clair_flower.server_apps.runner import run_federation

STRATEGIES = ("clair", "fedavg", "local", "oracle")
WORKLOADS: dict[str, dict[str, object]] = {
    "planted": {"planted": True, "planted-rank": 4},
    "natural": {"planted": False},
    # the paper's model holds on one-shot uploads here (docs/identification.md, "noise-calibrated vote")
    "planted-seen": {"planted": True, "planted-rank": 4, "planted-background": "seen", "optimizer": "sgd",
                     "learning-rate": 0.05},
}
DEFAULT_WORKLOADS = ("planted", "natural")


def run_one(workload: str, strategy: str, seed: int, args: argparse.Namespace, out: Path) -> dict:
    """One in-process federation; the summary the runner writes."""
    run_config = {"strategy": strategy, "num-server-rounds": args.rounds, "local-steps": args.local_steps,
                  "seed": seed, "attack": "random", "attack-fraction": args.attack_fraction,
                  "output-dir": str(out / f"{workload}-{strategy}-{seed}"), **WORKLOADS[workload]}
    grid = InProcessGrid(copy_client_app, simulation_node_configs(args.nodes), run_config)
    return run_federation(grid, run_config)


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def clair_detection(summary: dict) -> dict[str, list[float]]:
    """Per-round decision, detection rates and truncation error of one CLAIR run (read from the
    run's ``rounds.jsonl``, which keeps the strategy's train metrics)."""
    lines = (Path(str(summary["output-dir"])) / "rounds.jsonl").read_text().splitlines()
    rounds = [json.loads(line) for line in lines if line.strip()]
    metrics = [r.get("train-metrics") or {} for r in rounds]
    return {
        "vote": [float(m.get("decided-by-vote", 0)) for m in metrics],
        "tpr": [float(r["tpr"]) for r in rounds if r.get("tpr") is not None],
        "fpr": [float(r["fpr"]) for r in rounds if r.get("fpr") is not None],
        "trunc": [float(m.get("max-truncation-error", 0.0)) for m in metrics],
    }


def workload_result(summaries: dict[tuple[str, int], dict], seeds: list[int]) -> dict[str, object]:
    """The benchmark's figures for one workload from its runs."""
    det = [clair_detection(summaries[("clair", s)]) for s in seeds]
    out: dict[str, object] = {
        "vote_decided_fraction": _mean([v for d in det for v in d["vote"]]),
        "tpr": _mean([v for d in det for v in d["tpr"]]),
        "fpr": _mean([v for d in det for v in d["fpr"]]),
        "downlink_norm_loss": _mean([v for d in det for v in d["trunc"]]),
    }
    for s in STRATEGIES:
        accs = [summaries[(s, seed)]["final-benign-token-acc"] for seed in seeds]
        out[f"benign_acc_{s}"] = _mean(accs)
        out[f"benign_acc_{s}_per_seed"] = accs
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--attack-fraction", type=float, default=0.3)
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 rounds, 5 local steps")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(DEFAULT_WORKLOADS))
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.rounds, args.local_steps = 1, 2, 5
    logging.getLogger("flwr").setLevel(logging.WARNING)
    seeds = list(range(args.seeds))
    result: dict[str, object] = {}
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:  # every run's files live until its figures are read
        for workload in args.workloads:
            summaries = {}
            for seed in seeds:
                for s in STRATEGIES:
                    t0 = time.time()
                    summaries[(s, seed)] = run_one(workload, s, seed, args, Path(tmp))
                    print(f"{workload:<8} seed {seed} {s:<7} benign token-acc "
                          f"{summaries[(s, seed)]['final-benign-token-acc']:.3f} ({time.time() - t0:.0f} s)",
                          flush=True)
            result[workload] = workload_result(summaries, seeds)
    result["settings"] = {"seeds": seeds, "rounds": args.rounds, "nodes": args.nodes,
                          "local-steps": args.local_steps, "attack": "random",
                          "attack-fraction": args.attack_fraction, "seconds": round(time.time() - t_start, 1)}
    for workload in args.workloads:
        r = result[workload]
        print(f"{workload}: vote decided {r['vote_decided_fraction']}, TPR {r['tpr']}, FPR {r['fpr']}, "  # type: ignore[index]
              f"benign acc CLAIR {r['benign_acc_clair']} FedAvg {r['benign_acc_fedavg']} "  # type: ignore[index]
              f"local {r['benign_acc_local']} oracle {r['benign_acc_oracle']}")  # type: ignore[index]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
