"""Pair evidence along CLAIR's lambda path on real one-shot LoRA uploads, benign vs contaminated.

docs/identification.md ("The noise-calibrated vote"): trains 10 copy-task clients one-shot (the
same init, ``--steps`` local steps, ``--optimizer``), 30% with random targets, then solves one
module's path and prints, per ``c``: the rank of ``L``, the median/max evidence
(``||S_kl|| / median block norm``) of benign-benign pairs, the median/min of pairs with a
contaminated end, the calibrated threshold and the clients its vote flags. Last line: one JSON
object with the same rows.

    python scripts/path_evidence.py --task planted-seen --optimizer sgd --lr 0.05 --seed 0
"""

from __future__ import annotations

import argparse
import copy
import json

import numpy as np
import torch

from clair_flower.clair import ClairConfig, detection
from clair_flower.clair.calibration import calibrated_vote
from clair_flower.clair.decomposition import lam_from_c, make_pairs
from clair_flower.clair.fit import build_problem, client_factors
from clair_flower.clair.inputs import balanced_factors
from clair_flower.clair.path import effective_rank, transition
from clair_flower.clair.solvers import solve
from clair_flower.copytask.attacks import AttackConfig, contaminated_partitions, data_poison
from clair_flower.copytask.model import LoraSpec, ModelConfig, load_base_model, wrap_lora
from clair_flower.copytask.peft_io import get_adapter_arrays
from clair_flower.copytask.task import TaskConfig, make_client_data
from clair_flower.copytask.training import TrainConfig, train_local
from clair_flower.lora import factors_from_state_dict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=["natural", "planted", "planted-seen"], default="planted-seen")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--optimizer", choices=["adamw", "sgd"], default="sgd")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--module", default="h.1.mlp.c_proj", help="suffix of the adapted module's name")
    args = ap.parse_args()
    torch.set_num_threads(1)
    n, cfg = args.clients, ClairConfig()
    base = load_base_model(ModelConfig(), TaskConfig())
    tcfg = TaskConfig(seed=args.seed, planted=args.task != "natural",
                      planted_background="seen" if args.task == "planted-seen" else "all")
    acfg = AttackConfig(name="random", fraction=0.3, seed=args.seed)
    bad = sorted(contaminated_partitions(n, acfg))
    poison = data_poison(acfg, tcfg.vocab_size)
    ups = []
    for k in range(n):
        data = make_client_data(tcfg, k, n, poison=poison if k in bad else None)
        model = wrap_lora(copy.deepcopy(base), LoraSpec(rank=4, alpha=8.0), seed=args.seed)
        train_local(model, data, TrainConfig(local_steps=args.steps, lr=args.lr, optimizer=args.optimizer),
                    seed=args.seed * 1_000_003 + k)
        ups.append(factors_from_state_dict(get_adapter_arrays(model), 8.0))
    module = next(m for m in sorted(ups[0]) if m.endswith(args.module))
    pairs = make_pairs(n)
    kind = np.array([(k in bad) + (l in bad) for k, l in pairs])
    fac = {module: {k: balanced_factors(ups[k][module]) for k in range(n)}}
    problem, _ = build_problem(client_factors(fac, module, list(range(n))), pairs, cfg)
    informative = detection.informative_pairs(problem.block_norms)
    rows, warm = [], None
    print(f"{module}: contaminated {bad}")
    print("| c | rank of L | bb median | bb max | cb median | cb min | threshold | calibrated vote flags |")
    print("|---|---|---|---|---|---|---|---|")
    for c in transition(problem).grid(cfg.path_points):
        res = solve(problem, lam_from_c(float(c), len(pairs)), cfg.form, cfg.solver, tol=1e-4,
                    max_iter=cfg.max_iter, warm=warm)
        warm = res
        ev = detection.pair_evidence(res.S_norms, problem.block_norms)
        votes, th = calibrated_vote(pairs, n, ev, informative, cfg.flag_threshold, cfg.noise_factor,
                                    cfg.vote_threshold)
        bb, cb = ev[kind == 0], ev[kind >= 1]
        row = {"c": float(c), "rank": effective_rank(res.L_sv, cfg.rank_rtol),
               "bb_median": float(np.median(bb)), "bb_max": float(bb.max()),
               "cb_median": float(np.median(cb)), "cb_min": float(cb.min()),
               "noise": th.noise, "threshold": th.threshold,
               "flagged": [int(i) for i in np.flatnonzero(votes.flagged)]}
        rows.append(row)
        print(f"| {row['c']:.2f} | {row['rank']} | {row['bb_median']:.2f} | {row['bb_max']:.2f} | "
              f"{row['cb_median']:.2f} | {row['cb_min']:.2f} | {row['threshold']:.2f} | {row['flagged']} |")
    print(json.dumps({"module": module, "contaminated": bad, "args": vars(args), "path": rows}))


if __name__ == "__main__":
    main()
