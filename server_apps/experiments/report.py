"""The report: ``results.csv``, the ``results.md`` page of tables, and the plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from clair_flower.server_apps.experiments.grid import Grid
from clair_flower.server_apps.experiments.plots import (plot_accuracy_per_round, plot_accuracy_vs_fraction,
                                           plot_detection_per_round, plot_gain_vs_rank, plot_score_heatmaps)
from clair_flower.server_apps.experiments.rows import CONFIG_COLUMNS, FIGURE_COLUMNS
from clair_flower.server_apps.experiments.tables import (FLAGGING, STRATEGY_ORDER, attack_rows, done_rows, fraction_rows,
                                            gain_by_seed, gain_over_local, ordered, pivot, rank_rows, seed_mean,
                                            seeds_of)
from clair_flower.server_apps.results import markdown_table, write_atomic, write_csv

RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"


def _md_pivot(title: str, rows: Sequence[Mapping[str, object]], row_key: str, col_key: str, value: str,
              row_order: Sequence[object] = (), col_order: Sequence[object] = ()) -> str:
    if not rows:
        return ""
    rks, cks, table = pivot(rows, row_key, col_key, value, row_order, col_order)
    body = markdown_table([f"{row_key} \\ {col_key}"] + [str(c) for c in cks],
                          [[rk] + vals for rk, vals in zip(rks, table)])
    return f"### {title}\n\n{body}\n"


def _md_detection(title: str, rows: Sequence[Mapping[str, object]], row_key: str) -> str:
    """TPR and FPR (final round, and mean over rounds) of each flagging method, one row per
    value of ``row_key`` (seed means); empty when no flagging method ran."""
    rows = [r for r in rows if r["strategy"] in FLAGGING]
    if not rows:
        return ""
    keys = ordered(r[row_key] for r in rows)
    strats = ordered((r["strategy"] for r in rows), STRATEGY_ORDER)
    figures = (("final-tpr", "TPR"), ("final-fpr", "FPR"), ("mean-tpr", "mean TPR"), ("mean-fpr", "mean FPR"))
    header = [row_key] + [f"{s} {label}" for s in strats for _, label in figures]
    table = [[k] + [seed_mean([r for r in rows if r[row_key] == k and r["strategy"] == s], key)
                    for s in strats for key, _ in figures] for k in keys]
    return f"### {title}\n\n{markdown_table(header, table)}\n"


def seed_spread(rows: Sequence[Mapping[str, object]]) -> list[list[object]]:
    """One row per configuration run with more than one seed: the final benign token
    accuracy of each seed, their mean and range (max - min), and for the flagging methods
    each seed's final TPR and FPR, so the tables' seed means can be read with their spread."""
    done = done_rows(rows)
    seeds = seeds_of(done)
    groups: dict[tuple[object, ...], dict[int, Mapping[str, object]]] = {}
    for r in done:
        key = (r["strategy"], r["attack"], r["attack-fraction"], r["lora-rank"])
        groups.setdefault(key, {})[int(r["seed"])] = r  # type: ignore[call-overload]
    out = []
    for key in sorted((k for k, g in groups.items() if len(g) > 1),
                      key=lambda k: (str(k[1]), float(k[2]), int(k[3]),  # type: ignore[arg-type, call-overload]
                                     STRATEGY_ORDER.index(k[0]) if k[0] in STRATEGY_ORDER else 99)):
        g = groups[key]
        accs = [g[s].get("final-benign-token-acc") if s in g else None for s in seeds]
        vals = [float(a) for a in accs if a is not None]  # type: ignore[arg-type]
        flags = key[0] in FLAGGING
        tpr = [g[s].get("final-tpr") if flags and s in g else None for s in seeds]
        fpr = [g[s].get("final-fpr") if flags and s in g else None for s in seeds]
        out.append([*key, *accs, float(np.mean(vals)) if vals else None,
                    float(max(vals) - min(vals)) if vals else None, *tpr, *fpr])
    return out


def results_markdown(rows: Sequence[Mapping[str, object]], grid: Grid) -> str:
    """The report page: the attack tables, detection, the fraction and r/p sweeps, failures."""
    f, r = grid.headline_fraction, grid.headline_rank
    parts = [f"# Experiment grid: {grid.name}", "",
             f"{len(done_rows(rows))} of {len(rows)} cells done. Values are final-round means over benign "
             f"clients (mean over seeds where a cell has several: seeds {seeds_of(done_rows(rows))} in this grid; "
             f"\"Seed spread\" lists which configurations have more than one, and each seed's value).", ""]
    head = attack_rows(rows, grid)
    parts.append(_md_pivot(f"Final benign token accuracy, method x attack (fraction {f:g}, rank {r})",
                           head, "strategy", "attack", "final-benign-token-acc", STRATEGY_ORDER))
    parts.append(_md_pivot(f"Final benign exact-sequence accuracy, method x attack (fraction {f:g}, rank {r})",
                           head, "strategy", "attack", "final-benign-exact-acc", STRATEGY_ORDER))
    flag = [x for x in head if x["strategy"] in FLAGGING]
    for key, label in (("final-tpr", "TPR"), ("final-fpr", "FPR"), ("mean-tpr", "TPR, mean over rounds"),
                       ("mean-fpr", "FPR, mean over rounds")):
        parts.append(_md_pivot(f"Detection {label}, flagging methods (fraction {f:g})", flag,
                               "strategy", "attack", key, STRATEGY_ORDER))
    frac = fraction_rows(rows, grid)
    for attack in ordered(x["attack"] for x in frac):
        parts.append(_md_pivot(f"Final benign token accuracy vs contaminated fraction ({attack}, rank {r})",
                               [x for x in frac if x["attack"] == attack], "attack-fraction", "strategy",
                               "final-benign-token-acc", col_order=STRATEGY_ORDER))
        parts.append(_md_detection(f"Detection vs contaminated fraction ({attack}, rank {r}; TPR is undefined "
                                   f"at fraction 0)", [x for x in frac if x["attack"] == attack], "attack-fraction"))
    ranks = rank_rows(rows, grid)
    for attack in ordered(x["attack"] for x in ranks):
        sel = [x for x in ranks if x["attack"] == attack]
        parts.append(_md_pivot(f"Final benign token accuracy vs LoRA rank ({attack}, fraction {f:g}, "
                               f"width p = {sel[0]['model-width']})", sel, "lora-rank", "strategy",
                               "final-benign-token-acc", col_order=STRATEGY_ORDER))
        parts.append(_md_detection(f"Detection vs LoRA rank ({attack}, fraction {f:g})", sel, "lora-rank"))
        gains = [g for g in gain_over_local(sel) if g[0] == attack]
        if gains:
            seeds = seeds_of(sel) if len(seeds_of(sel)) > 1 else []
            per_seed = gain_by_seed(sel)
            header = ["lora-rank", "r/p", "clair - local (token acc" + (", seed mean)" if seeds else ")")]
            table = [[g[1], g[2], g[3]] + [per_seed.get((str(attack), g[1]), {}).get(s) for s in seeds]
                     for g in gains]
            parts.append(f"### CLAIR's gain over local vs r/p ({attack})\n\n"
                         + markdown_table(header + [f"seed {s}" for s in seeds], table) + "\n")
    spread = seed_spread(rows)
    if spread:
        seeds = seeds_of(done_rows(rows))
        parts.append("### Seed spread (configurations run with several seeds; range = max - min)\n\n"
                     + markdown_table(["strategy", "attack", "fraction", "rank"]
                                      + [f"token acc s{s}" for s in seeds] + ["mean", "range"]
                                      + [f"TPR s{s}" for s in seeds] + [f"FPR s{s}" for s in seeds], spread) + "\n")
    voting = [[x["cell"], x.get("num-rounds"), x.get("all-pairs-flagged-rounds"), x.get("no-pairs-flagged-rounds"),
               x.get("final-tpr"), x.get("final-fpr")]
              for x in done_rows(rows) if x.get("all-pairs-flagged-rounds") is not None]
    if voting:
        parts.append("### CLAIR's pair vote per cell (every pair flagged: the vote was inconclusive and the flags "
                     "came from the score-outlier rule; no pair flagged: the vote saw no contamination)\n\n"
                     + markdown_table(["cell", "rounds", "rounds, every pair flagged", "rounds, no pair flagged",
                                       "final TPR", "final FPR"], voting) + "\n")
    cost = [[x["cell"], x.get("wall-seconds"), x.get("cell-cpu-seconds"), x.get("total-server-seconds"),
             x.get("total-bytes-up"), x.get("fallback-rounds")] for x in done_rows(rows)]
    if cost:
        total = lambda key: sum(float(x.get(key) or 0.0) for x in done_rows(rows))  # noqa: E731
        parts.append("### Per-cell cost (fallback rounds: CLAIR fell back instead of refining)\n\n"
                     + markdown_table(["cell", "federation wall s", "cell CPU s", "server s (total)",
                                       "bytes up (total)", "fallback rounds"],
                                      cost, digits=1)
                     + f"\nSum over the {len(cost)} done cells: cell wall {total('cell-wall-seconds'):.0f} s, "
                       f"cell CPU {total('cell-cpu-seconds'):.0f} s, strategy server step "
                       f"{total('total-server-seconds'):.0f} s.\n")
    bad = [x for x in rows if x.get("status") != "done"]
    if bad:
        parts.append("### Cells not done\n\n" + markdown_table(
            ["cell", "status", "error"], [[x["cell"], x["status"], x.get("error")] for x in bad]) + "\n")
    return "\n".join(p for p in parts if p is not None)


def write_report(rows: Sequence[Mapping[str, object]], out: Path, grid: Grid) -> list[Path]:
    """results.csv, results.md and the plots (those with data); returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / RESULTS_CSV, rows, CONFIG_COLUMNS + FIGURE_COLUMNS)
    write_atomic(out / RESULTS_MD, results_markdown(rows, grid))
    paths = [out / RESULTS_CSV, out / RESULTS_MD]
    for plot, selected, name in (
            (plot_accuracy_per_round, attack_rows(rows, grid), "accuracy_per_round.png"),
            (plot_detection_per_round, attack_rows(rows, grid), "detection_per_round.png"),
            (plot_score_heatmaps, attack_rows(rows, grid), "score_heatmap.png"),
            (plot_accuracy_vs_fraction, fraction_rows(rows, grid), "accuracy_vs_fraction.png"),
            (plot_gain_vs_rank, rank_rows(rows, grid), "gain_vs_rank.png")):
        written = plot(selected, out / name)
        if written is not None:
            paths.append(written)
    return paths
