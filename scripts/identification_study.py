"""Where does CLAIR's low-rank plus block-sparse model hold on transformer LoRA updates?

Issue 16, part 1 ("a measured answer"). Trains the copy task's real PEFT LoRA clients
(:mod:`clair_flower.copytask`) and measures, per adapted module, on

(a) what is decomposed
    ``whole``      each client's whole adapter product ``s B A`` after ``--oneshot-steps`` local
                   steps from the base model and one shared init (the paper's one-shot protocol);
    ``round``      the change of each client's adapter product within one round, every client
                   starting the round from one common point (the base plus the FedAvg of the
                   dense updates of ``--warmup`` earlier rounds, merged into the weights), with a
                   fresh adapter (shared seeded ``A``, ``B = 0``), so the update is ``s B_k A_k``;
    ``consensus``  the ``round`` update minus the round's consensus (mean over all clients: the
                   server does not know who is benign), passed to CLAIR as dense arrays;
(b) which modules go into ``run_clair``: ``all``, ``residual`` (``attn.c_proj``, ``mlp.c_proj``:
    they write into the residual stream), ``last`` (the last layer's four modules);
(c) the natural copy task vs the planted one (``TaskConfig.planted``), and the planted one on the
    seen vocabulary only (``planted-seen``: ``planted_background="seen"``, the base model copies
    every background token, so a client's only task is its remap of ``T``);
(d) equal ranks (all 4) vs mixed ranks (4 on even, 8 on odd partitions).

Per module: the number of singular values holding 90% of the energy of the stack of
benign-benign differences (``hstack`` of ``dW_k - dW_l``, the column space, as CLAIR stacks
them) against ``sum(r_k)`` over benign clients and ``p`` (out features); the ratio of the mean
norm of contaminated-benign differences to the mean norm of benign-benign differences; the mean
cosine between benign updates; on the planted task, the share of the residual modules'
benign-difference energy inside the span of ``T``'s (tied) output embeddings.

Per (a) x (b): ``run_clair`` with the default ``ClairConfig`` (``workers=1`` only, which does not
change results): vote inconclusive or not, TPR/FPR, and where flags came from (``vote``,
``fallback`` = "score outlier (vote inconclusive)", ``none``).

Accuracy (token accuracy on the client's own held-out test set) of every benign client with:
its own update, the mean of the benign updates, CLAIR's refined update for it. Updates are
applied *merged into the weights* (``W_start + dW``, lossless, no re-factoring by this script):
the refined update is CLAIR's own downlink (its factors at the client's rank, ``.dense()``), so
whatever CLAIR's re-factoring loses is in the number. Modules not passed to ``run_clair`` (the
``residual``/``last`` subsets) keep the client's own update. For ``consensus`` the consensus is
added back before evaluation.

Last stdout line: one JSON object. Markdown tables are printed before it.

    python scripts/identification_study.py            # full: 3 seeds, both tasks, both rank mixes
    python scripts/identification_study.py --quick    # 1 seed, equal ranks, fewer steps
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from collections import defaultdict

import numpy as np
import torch

from clair_flower.clair import ClairConfig, run_clair
from clair_flower.copytask.attacks import AttackConfig, contaminated_partitions, data_poison
from clair_flower.copytask.model import LoraSpec, ModelConfig, load_base_model, wrap_lora
from clair_flower.copytask.peft_io import get_adapter_arrays
from clair_flower.copytask.task import NUM_SPECIAL, TaskConfig, make_client_data, planted_tokens
from clair_flower.copytask.training import TrainConfig, evaluate, train_local
from clair_flower.lora import LoraFactors, factors_from_state_dict

KINDS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
RESIDUAL = ("attn.c_proj", "mlp.c_proj")
PREFIX = "base_model.model."
FALLBACK_REASON = "score outlier (vote inconclusive)"
TRAIN_OVERRIDES: dict = {}  # --optimizer / --lr
CLAIR_OVERRIDES: dict = {}  # --clair KEY=VALUE


def log(msg: str) -> None:
    print(msg, flush=True)


def short(name: str) -> str:
    """``base_model.model.transformer.h.1.mlp.c_proj`` -> ``h1.mlp.c_proj``."""
    parts = name.split(".")
    i = parts.index("h")
    return f"h{parts[i + 1]}." + ".".join(parts[i + 2:])


def base_path(name: str) -> str:
    """PEFT module name -> the plain model's module path."""
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


# --------------------------------------------------------------------------- model plumbing


class Merged:
    """A plain (un-adapted) model whose Conv1D weights can be set to ``W_start + dW.T``."""

    def __init__(self, model: torch.nn.Module, modules: list[str]) -> None:
        self.model = model
        self.layers = {m: model.get_submodule(base_path(m)) for m in modules}
        self.start = {m: self.layers[m].weight.detach().clone() for m in modules}

    @torch.no_grad()
    def set(self, dense: dict[str, np.ndarray]) -> None:
        for m, layer in self.layers.items():
            w = self.start[m]
            if m in dense:  # GPT-2 Conv1D stores (in, out); dW is (out, in)
                w = w + torch.as_tensor(dense[m].T, dtype=w.dtype)
            layer.weight.copy_(w)

    def acc(self, dense: dict[str, np.ndarray], data) -> float:
        self.set(dense)
        out = evaluate(self.model, data.test_inputs, data.test_labels, num_threads=1)["token-acc"]
        self.set({})
        return float(out)


def train_round(start: torch.nn.Module, datas: list, ranks: list[int], alpha: float, steps: int,
                init_seed: int, round_id: int, seed: int) -> list[dict[str, LoraFactors]]:
    """Each client: a fresh adapter (seeded, shared A per rank, B = 0) on ``start``, trained."""
    out = []
    for k, data in enumerate(datas):
        model = wrap_lora(copy.deepcopy(start), LoraSpec(rank=ranks[k], alpha=alpha), seed=init_seed)
        train_local(model, data, TrainConfig(local_steps=steps, num_threads=1, **TRAIN_OVERRIDES),
                    seed=seed * 1_000_003 + k * 1009 + round_id)
        out.append(factors_from_state_dict(get_adapter_arrays(model), alpha))
    return out


def dense_all(updates: list[dict[str, LoraFactors]]) -> list[dict[str, np.ndarray]]:
    return [{m: f.dense().astype(np.float64) for m, f in u.items()} for u in updates]


# --------------------------------------------------------------------------- measurements


def energy_count(stack_gram: np.ndarray, frac: float) -> int:
    ev = np.clip(np.linalg.eigvalsh(stack_gram)[::-1], 0, None)
    tot = ev.sum()
    if tot <= 0:
        return 0
    return int(np.searchsorted(np.cumsum(ev) / tot, frac) + 1)


def module_stats(dense: list[dict[str, np.ndarray]], benign: list[int], bad: list[int], ranks: list[int],
                 t_basis: np.ndarray | None) -> dict[str, dict]:
    """Per module: energy counts of the benign-difference stack, pair norm ratio, cosines."""
    out = {}
    pairs_bb = [(k, l) for i, k in enumerate(benign) for l in benign[i + 1:]]
    pairs_cb = [(c, k) for c in bad for k in benign]
    for m in dense[0]:
        p = dense[0][m].shape[0]
        gram = np.zeros((p, p))
        nb = []
        for k, l in pairs_bb:
            d = dense[k][m] - dense[l][m]
            gram += d @ d.T
            nb.append(np.linalg.norm(d))
        nc = [np.linalg.norm(dense[c][m] - dense[k][m]) for c, k in pairs_cb]
        cos = []
        for k, l in pairs_bb:
            a, b = dense[k][m].ravel(), dense[l][m].ravel()
            cos.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)))
        row = {
            "p": p, "sum_r_benign": int(sum(ranks[k] for k in benign)),
            "k90": energy_count(gram, 0.90), "k99": energy_count(gram, 0.99),
            "pair_ratio": float(np.mean(nc) / max(np.mean(nb), 1e-30)) if nc else float("nan"),
            "benign_cos": float(np.mean(cos)),
        }
        if t_basis is not None and p == t_basis.shape[0] and np.trace(gram) > 0:
            row["energy_in_T"] = float(np.trace(t_basis.T @ gram @ t_basis) / np.trace(gram))
        out[short(m)] = row
    return out


def clair_eval(inputs: list[dict], benign: list[int], bad: list[int], modules: list[str]) -> tuple[dict, object]:
    cfg = dataclasses.replace(ClairConfig(), workers=1, **CLAIR_OVERRIDES)
    upd = {k: {m: inputs[k][m] for m in modules} for k in range(len(inputs))}
    t0 = time.perf_counter()
    res = run_clair(upd, cfg)
    sec = time.perf_counter() - t0
    flagged = sorted(int(k) for k in res.flagged)
    reasons = sorted({res.clients[k].reason for k in flagged})
    decision = getattr(res, "decision", None)  # newer run_clair: "vote", "fallback" or "none"
    if decision is not None:
        inconclusive = decision == "fallback" or bool(res.diagnostics.get("vote_inconclusive"))
        source = decision if flagged else "none"
    else:
        inconclusive = bool(res.diagnostics.get("vote_inconclusive"))
        source = "none" if not flagged else ("fallback" if inconclusive or FALLBACK_REASON in reasons else "vote")
    tp = len(set(flagged) & set(bad))
    fp = len(set(flagged) & set(benign))
    ranks = res.diagnostics.get("rank", {})
    trunc = [float(np.mean([res.clients[k].truncation_error[m] for k in benign])) for m in modules]
    return {
        "vote_inconclusive": inconclusive, "flagged": flagged, "reasons": reasons, "source": source,
        # conclusive vote (a flagged minority or nothing); TPR says whether it found anyone
        "vote_decided": (not inconclusive) and source != "fallback",
        "tpr": tp / max(1, len(bad)), "fpr": fp / max(1, len(benign)),
        "status": res.diagnostics.get("status"),
        "rank": {short(m): int(r) for m, r in ranks.items()},
        "mean_truncation_error": float(np.mean(trunc)), "seconds": sec,
    }, res


def run_cell(args, task_name: str, mixed: bool, seed: int, base: torch.nn.Module, modules: list[str]) -> dict:
    t_cell = time.perf_counter()
    n = args.clients
    tcfg = TaskConfig(seed=seed, planted=task_name.startswith("planted"), planted_rank=args.planted_rank,
                      planted_background="seen" if task_name == "planted-seen" else "all")
    acfg = AttackConfig(name=args.attack, fraction=args.fraction, seed=seed)
    bad = sorted(contaminated_partitions(n, acfg))
    benign = [k for k in range(n) if k not in bad]
    poison = data_poison(acfg, tcfg.vocab_size)
    datas = [make_client_data(tcfg, k, n, poison=poison if k in bad else None) for k in range(n)]
    ranks = [(args.rank if k % 2 == 0 else args.rank2) if mixed else args.rank for k in range(n)]
    t_basis = None
    if tcfg.planted:
        emb = base.get_input_embeddings().weight.detach().double().numpy()
        t_basis = np.linalg.qr(emb[planted_tokens(tcfg) + NUM_SPECIAL].T)[0]

    # (i) whole adapters, one shot from the base model and one init
    log(f"cell {task_name}/{'mixed' if mixed else 'equal'}/seed {seed}: contaminated {bad}, ranks {ranks}")
    whole = train_round(base, datas, ranks, args.alpha, args.oneshot_steps, seed, 0, seed)
    # warm-up FedAvg (dense, merged), then one measured round from the common start
    start = copy.deepcopy(base)
    for w in range(1, args.warmup + 1):
        ups = dense_all(train_round(start, datas, ranks, args.alpha, args.local_steps, seed, w, seed))
        merged = Merged(start, modules)
        merged.set({m: np.mean([u[m] for u in ups], axis=0) for m in modules})
        start = merged.model
    log(f"  trained one-shot and warm-up ({time.perf_counter() - t_cell:.0f}s)")
    rnd = train_round(start, datas, ranks, args.alpha, args.local_steps, seed, args.warmup + 1, seed)
    rnd_dense = dense_all(rnd)
    cons = {m: np.mean([u[m] for u in rnd_dense], axis=0) for m in modules}
    rel_dense = [{m: u[m] - cons[m] for m in modules} for u in rnd_dense]
    # CLAIR's input for (iii): each relative update truncated to its client's rank r_k (what a
    # rank-r_k upload can carry; the exact one has rank up to r_k + sum r_j, on which the fast
    # solver takes minutes per module). Stats and accuracies use the exact dense arrays.
    rel_in, kept = [], []
    for k, u in enumerate(rel_dense):
        row = {}
        for m in modules:
            uu, ss, vt = np.linalg.svd(u[m], full_matrices=False)
            r = ranks[k]
            row[m] = (uu[:, :r] * ss[:r]) @ vt[:r]
            kept.append(float(np.sum(ss[:r] ** 2) / max(np.sum(ss ** 2), 1e-30)))
        rel_in.append(row)

    variants = {
        "whole": (whole, dense_all(whole), base, {}),
        "round": (rnd, rnd_dense, start, {}),
        "consensus": (rel_in, rel_dense, start, cons),
    }
    subsets = {
        "all": modules,
        "residual": [m for m in modules if short(m).split(".", 1)[1] in RESIDUAL],
        "last": [m for m in modules if short(m).startswith(f"h{max(int(short(x)[1:].split('.')[0]) for x in modules)}.")],
    }
    cell = {"task": task_name, "ranks": "mixed" if mixed else "equal", "seed": seed,
            "consensus_input_energy_kept": float(np.mean(kept)),
            "contaminated": bad, "client_ranks": ranks, "variants": {}}
    for a, (inputs, dense, start_model, offset) in variants.items():
        stats = module_stats(dense, benign, bad, ranks, t_basis)
        ev = Merged(start_model, modules)
        add = (lambda d: {m: d[m] + offset[m] for m in d}) if offset else (lambda d: d)
        mean_b = {m: np.mean([dense[k][m] for k in benign], axis=0) for m in modules}
        own_acc = [ev.acc(add(dense[k]), datas[k]) for k in benign]
        mean_acc = [ev.acc(add(mean_b), datas[k]) for k in benign]
        base_acc = [ev.acc({}, datas[k]) for k in benign]
        row = {"modules": stats, "acc_start": float(np.mean(base_acc)), "acc_own": float(np.mean(own_acc)),
               "acc_mean_benign": float(np.mean(mean_acc)), "acc_own_per_client": own_acc, "clair": {}}
        for b, mods in subsets.items():
            rep, res = clair_eval(inputs, benign, bad, mods)
            ref_acc = []
            for k in benign:
                upd = dict(dense[k])
                for m in mods:
                    upd[m] = res.clients[k].refined[m].dense().astype(np.float64)
                ref_acc.append(ev.acc(add(upd), datas[k]))
            rep["acc_refined"] = float(np.mean(ref_acc))
            rep["acc_refined_per_client"] = ref_acc
            row["clair"][b] = rep
            log(f"  [{task_name}/{cell['ranks']}/seed {seed}] {a:9s} {b:8s}: inconclusive={rep['vote_inconclusive']} "
                f"source={rep['source']} flagged={rep['flagged']} (bad {bad}) TPR {rep['tpr']:.2f} FPR {rep['fpr']:.2f} "
                f"| acc own {row['acc_own']:.3f} mean {row['acc_mean_benign']:.3f} refined {rep['acc_refined']:.3f} "
                f"| clair {rep['seconds']:.1f}s, rank {sorted(set(rep['rank'].values()))}, {rep['status']}")
        ks = "; ".join(f"{m} k90={s['k90']}/{s['sum_r_benign']} ratio={s['pair_ratio']:.2f} cos={s['benign_cos']:.2f}"
                       + (f" inT={s['energy_in_T']:.2f}" if "energy_in_T" in s else "") for m, s in stats.items())
        log(f"  [{task_name}/{cell['ranks']}/seed {seed}] {a}: {ks}")
        cell["variants"][a] = row
    cell["seconds"] = time.perf_counter() - t_cell
    log(f"cell {task_name}/{cell['ranks']}/seed {seed} done in {cell['seconds']:.0f}s")
    return cell


# --------------------------------------------------------------------------- summary


def summarise(cells: list[dict]) -> dict:
    groups: dict = defaultdict(list)
    for c in cells:
        groups[(c["task"], c["ranks"])].append(c)
    out = {}
    for (task, ranks), cs in groups.items():
        key = f"{task}/{ranks}"
        out[key] = {}
        for a in cs[0]["variants"]:
            vs = [c["variants"][a] for c in cs]
            mods = {}
            for m in vs[0]["modules"]:
                ms = [v["modules"][m] for v in vs]
                mods[m] = {f: float(np.mean([x[f] for x in ms])) for f in ms[0]}
            clair = {}
            for b in vs[0]["clair"]:
                rs = [v["clair"][b] for v in vs]
                clair[b] = {
                    "vote_decided_fraction": float(np.mean([r["vote_decided"] for r in rs])),
                    "sources": [r["source"] for r in rs],
                    "tpr": float(np.mean([r["tpr"] for r in rs])), "fpr": float(np.mean([r["fpr"] for r in rs])),
                    "acc_refined": float(np.mean([r["acc_refined"] for r in rs])),
                    "acc_refined_std": float(np.std([r["acc_refined"] for r in rs])),
                    "mean_truncation_error": float(np.mean([r["mean_truncation_error"] for r in rs])),
                }
            out[key][a] = {
                "acc_start": float(np.mean([v["acc_start"] for v in vs])),
                "acc_own": float(np.mean([v["acc_own"] for v in vs])),
                "acc_own_std": float(np.std([v["acc_own"] for v in vs])),
                "acc_mean_benign": float(np.mean([v["acc_mean_benign"] for v in vs])),
                "acc_mean_benign_std": float(np.std([v["acc_mean_benign"] for v in vs])),
                "modules": mods, "clair": clair,
            }
    return out


def markdown(summary: dict, n_seeds: int) -> str:
    lines = []
    for key, av in summary.items():
        lines.append(f"\n### {key} ({n_seeds} seed(s), means)\n")
        lines.append("| (a) | module | p | sum r_k benign | k90 | k99 | contaminated/benign pair norm | benign cos |"
                     + (" energy in span(E_T) |" if "planted" in key else ""))
        lines.append("|---|---|---|---|---|---|---|---|" + ("---|" if "planted" in key else ""))
        for a, v in av.items():
            for m, s in v["modules"].items():
                extra = f" {s['energy_in_T']:.2f} |" if "energy_in_T" in s else (" - |" if "planted" in key else "")
                lines.append(f"| {a} | {m} | {s['p']:.0f} | {s['sum_r_benign']:.0f} | {s['k90']:.1f} | {s['k99']:.1f} | "
                             f"{s['pair_ratio']:.2f} | {s['benign_cos']:.3f} |{extra}")
        lines.append("")
        lines.append("| (a) | (b) | vote conclusive | flag sources | TPR | FPR | acc start | acc own | acc mean benign | acc CLAIR refined | truncation err |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for a, v in av.items():
            for b, c in v["clair"].items():
                lines.append(f"| {a} | {b} | {c['vote_decided_fraction']:.2f} | {','.join(c['sources'])} | {c['tpr']:.2f} | "
                             f"{c['fpr']:.2f} | {v['acc_start']:.3f} | {v['acc_own']:.3f} | {v['acc_mean_benign']:.3f} | "
                             f"{c['acc_refined']:.3f} | {c['mean_truncation_error']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--attack", default="random")
    ap.add_argument("--fraction", type=float, default=0.3)
    ap.add_argument("--rank", type=int, default=4, help="rank of every client (equal) / of even clients (mixed)")
    ap.add_argument("--rank2", type=int, default=8, help="rank of odd clients in the mixed setting")
    ap.add_argument("--rank-mix", choices=["equal", "mixed", "both"], default="both")
    ap.add_argument("--tasks", nargs="+", choices=["natural", "planted", "planted-seen"],
                    default=["natural", "planted"],
                    help="planted-seen: the planted task on the seen vocabulary only (planted_background='seen')")
    ap.add_argument("--planted-rank", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=8.0)
    ap.add_argument("--local-steps", type=int, default=20)
    ap.add_argument("--oneshot-steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="1 seed, 1 warm-up round, 40 one-shot steps, equal ranks unless --rank-mix is given")
    ap.add_argument("--clair", nargs="*", default=[], metavar="KEY=VALUE",
                    help="ClairConfig fields to override, e.g. rank=4 no_structure=own")
    ap.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    ap.add_argument("--lr", type=float, default=None, help="local learning rate (default: TrainConfig's)")
    ap.add_argument("--out", default="", help="also write the JSON object to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.warmup, args.oneshot_steps = args.seeds[:1], 1, 40
        args.rank_mix = "equal" if args.rank_mix == "both" else args.rank_mix
    for item in args.clair:
        key, _, value = item.partition("=")
        CLAIR_OVERRIDES[key] = json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value
    TRAIN_OVERRIDES.update({"optimizer": args.optimizer} | ({"lr": args.lr} if args.lr else {}))
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    mcfg = ModelConfig()  # the project's defaults: gpt2, 2 layers, width 128, 4 heads
    base = load_base_model(mcfg, TaskConfig())  # pre-trained on seed 0's task, cached
    probe = wrap_lora(copy.deepcopy(base), LoraSpec(rank=args.rank, alpha=args.alpha))
    modules = sorted(factors_from_state_dict(get_adapter_arrays(probe), args.alpha))
    mixes = {"equal": [False], "mixed": [True], "both": [False, True]}[args.rank_mix]
    log(f"identification study: seeds {args.seeds}, {args.clients} clients, attack {args.attack} "
        f"{args.fraction}, tasks {args.tasks}, rank mixes {args.rank_mix}, {len(modules)} modules")
    cells = [run_cell(args, t, mx, s, base, modules) for s in args.seeds for t in args.tasks for mx in mixes]
    summary = summarise(cells)
    log(markdown(summary, len(args.seeds)))
    result = {"config": {k: v for k, v in vars(args).items()}, "seconds": time.perf_counter() - t0,
              "summary": summary, "cells": cells}
    blob = json.dumps(result, separators=(",", ":"))
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(blob + "\n")
    print(blob, flush=True)


if __name__ == "__main__":
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    sys.exit(main())
