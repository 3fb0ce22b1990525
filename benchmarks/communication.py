"""Uplink cost and accuracy of FedAvg-LoRA, RoLoRA and FFA-LoRA at equal rounds.

Runs the three strategies in-process (real ClientApp and runner, no Ray) on the copy task
with honest clients and identical settings, then prints a table and, as its last line, one
JSON object: bytes up per client per round for each strategy, the ratios to FedAvg and the
final benign token accuracies. Bytes are those the recorder counts in the messages.

    python benchmarks/communication.py [--nodes 10] [--rounds 4] [--local-steps 10]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from clair_flower.client_apps.copy_client import app as copy_client_app
from clair_flower.server_apps.inprocess import InProcessGrid, simulation_node_configs
from clair_flower.server_apps.runner import run_federation

STRATEGIES = ("fedavg", "rolora", "ffa-lora")


def run_one(strategy: str, nodes: int, rounds: int, local_steps: int, out: Path, seed: int) -> dict:
    """One in-process federation; the summary the runner writes."""
    run_config = {"strategy": strategy, "num-server-rounds": rounds, "local-steps": local_steps,
                  "seed": seed, "output-dir": str(out / strategy)}
    grid = InProcessGrid(copy_client_app, simulation_node_configs(nodes), run_config)
    return run_federation(grid, run_config)


def compare(summaries: dict[str, dict]) -> dict[str, object]:
    """Per-round uplink per client, its ratio to FedAvg, and the final accuracies."""
    up = {s: [int(r["bytes-up"]) for r in summ["rounds"]] for s, summ in summaries.items()}
    base = sum(up["fedavg"])
    return {
        "bytes-up-per-round": up,
        "mean-bytes-up-per-round": {s: sum(v) / len(v) for s, v in up.items()},
        "ratio-to-fedavg": {s: round(sum(v) / base, 4) for s, v in up.items()},
        "total-bytes-up": {s: int(summ["total-bytes-up"]) for s, summ in summaries.items()},
        "final-benign-token-acc": {s: summ["final-benign-token-acc"] for s, summ in summaries.items()},
        "benign-token-acc-per-round": {s: [r["benign-token-acc"] for r in summ["rounds"]]
                                       for s, summ in summaries.items()},
    }


def table(result: dict[str, object], seconds: dict[str, float]) -> str:
    """Plain-text table, one row per strategy."""
    rows = [f"{'strategy':<10} {'bytes up/client/round':>22} {'ratio':>7} {'total up':>10} "
            f"{'benign token-acc':>17} {'seconds':>8}"]
    for s in STRATEGIES:
        rows.append(f"{s:<10} {result['mean-bytes-up-per-round'][s]:>22.0f} "  # type: ignore[index]
                    f"{result['ratio-to-fedavg'][s]:>7.3f} {result['total-bytes-up'][s]:>10d} "  # type: ignore[index]
                    f"{result['final-benign-token-acc'][s]:>17.4f} {seconds[s]:>8.1f}")  # type: ignore[index]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4, help="even, so RoLoRA does as many A as B rounds")
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    summaries, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for s in STRATEGIES:
            t0 = time.time()
            summaries[s] = run_one(s, args.nodes, args.rounds, args.local_steps, Path(tmp), args.seed)
            seconds[s] = time.time() - t0
    result = compare(summaries)
    result["settings"] = {"nodes": args.nodes, "rounds": args.rounds, "local-steps": args.local_steps,
                          "seed": args.seed, "attack": "none"}
    print(table(result, seconds))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
