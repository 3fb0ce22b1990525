"""The report: ``results.csv``, the ``results.md`` page of tables, and the plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from clair_flower.server_apps.experiments.calibration import (ACC, CONFIG_KEY, Calibration, calibrate_all, config_key,
                                                      other_axes)
from clair_flower.server_apps.experiments.grid import Grid
from clair_flower.server_apps.experiments.plots import (plot_accuracy_by_attack, plot_accuracy_per_round, plot_accuracy_vs_fraction,
                                           plot_detection_per_round, plot_gain_vs_rank, plot_score_heatmaps)
from clair_flower.server_apps.experiments.rows import CONFIG_COLUMNS, FIGURE_COLUMNS
from clair_flower.server_apps.experiments.tables import (STRATEGY_ORDER, attack_rows, done_rows, fraction_rows, is_flagging,
                                            ordered, pivot, rank_rows,
                                            seeds_of)
from clair_flower.server_apps.experiments.stats import Interval, mean_ci, paired_ci
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
        flags = any(is_flagging(r) for r in g.values())
        tpr = [g[s].get("final-tpr") if flags and s in g else None for s in seeds]
        fpr = [g[s].get("final-fpr") if flags and s in g else None for s in seeds]
        out.append([*key, *accs, float(np.mean(vals)) if vals else None,
                    float(max(vals) - min(vals)) if vals else None, *tpr, *fpr])
    return out


def _setting(row: Mapping[str, object]) -> tuple[object, object, str]:
    """What a table holds fixed besides its own axes: protocol, task, and any other swept key."""
    return row.get("protocol", "rounds"), bool(row.get("planted")), other_axes(row)


def _setting_name(setting: tuple[object, object, str]) -> str:
    name = f"{setting[0]} protocol, {'planted' if setting[1] else 'natural'} copy task"
    return f"{name}, {setting[2]}" if setting[2] else name


def results_markdown(rows: Sequence[Mapping[str, object]], grid: Grid) -> str:
    """The report page: calibration, the attack tables with 95% CIs and paired differences, the
    worst case over attacks, detection, the fraction and r/p sweeps, the settings side by side,
    per-seed detail and failures."""
    done = done_rows(rows)
    calib = calibrate_all(done)
    parts = [f"# Experiment grid: {grid.name}", "",
             f"{len(done)} of {len(rows)} cells done. Values are final-round means over benign clients; "
             f"`m ± h` is the mean over seeds and the half-width of its 95% t-interval, `(n)` the number of "
             f"seeds where it is not the same everywhere (seeds {seeds_of(done)} in this grid; a single seed "
             f"has no interval). Paired differences are over the seeds both methods ran: an interval that "
             f"excludes 0 is a difference larger than the seed spread, otherwise \"no difference\". "
             f"A figure marked `[fails: ...]` comes from a configuration that failed a calibration check "
             f"(first table): read it as not testing the claim.", ""]
    parts.append(md_calibration(calib))
    settings = ordered(_setting(x) for x in done)
    for setting in settings:
        sel = [x for x in rows if _setting(x) == setting]
        if len(settings) > 1:
            parts.append(f"## {_setting_name(setting)}\n")
        parts.extend(_setting_sections(sel, grid, calib))
    if len(settings) > 1:
        parts.append(md_settings_side_by_side(done, grid, calib))
    parts.extend(_detail_sections(rows))
    return "\n".join(p for p in parts if p)


def _setting_sections(rows: Sequence[Mapping[str, object]], grid: Grid,
                      calib: Mapping[tuple[object, ...], Calibration]) -> list[str]:
    f, r = grid.headline_fraction, grid.headline_rank
    parts = []
    head = attack_rows(rows, grid)
    parts.append(md_ci_pivot(f"Final benign token accuracy, method x attack (fraction {f:g}, rank {r})",
                             head, "strategy", "attack", ACC, calib, STRATEGY_ORDER))
    parts.append(md_paired(f"Paired differences, CLAIR minus each baseline (fraction {f:g}, rank {r})",
                           head, "attack"))
    parts.append(md_worst_case(f"Worst case over attacks (fraction {f:g}, rank {r}; the ByzFL convention)",
                               head, calib))
    flag = [x for x in head if is_flagging(x)]
    for key, label in (("final-tpr", "TPR"), ("final-fpr", "FPR")):
        parts.append(md_ci_pivot(f"Detection {label}, final round (fraction {f:g})", flag,
                                 "strategy", "attack", key, calib, STRATEGY_ORDER))
    parts.append(_md_pivot(f"Final benign exact-sequence accuracy, seed means (fraction {f:g}, rank {r})",
                           head, "strategy", "attack", "final-benign-exact-acc", STRATEGY_ORDER))
    frac = fraction_rows(rows, grid)
    for attack in ordered(x["attack"] for x in frac):
        sel = [x for x in frac if x["attack"] == attack]
        parts.append(md_ci_pivot(f"Final benign token accuracy vs contaminated fraction ({attack}, rank {r})",
                                 sel, "attack-fraction", "strategy", ACC, calib, col_order=STRATEGY_ORDER))
        parts.append(md_ci_pivot(f"Detection TPR vs contaminated fraction ({attack}; undefined at 0)",
                                 [x for x in sel if is_flagging(x)], "attack-fraction", "strategy",
                                 "final-tpr", calib, col_order=STRATEGY_ORDER))
        parts.append(md_ci_pivot(f"Detection FPR vs contaminated fraction ({attack})",
                                 [x for x in sel if is_flagging(x)], "attack-fraction", "strategy",
                                 "final-fpr", calib, col_order=STRATEGY_ORDER))
        parts.append(md_paired(f"Paired differences vs contaminated fraction, CLAIR minus baseline ({attack})",
                               sel, "attack-fraction"))
    ranks = rank_rows(rows, grid)
    for attack in ordered(x["attack"] for x in ranks):
        sel = [x for x in ranks if x["attack"] == attack]
        parts.append(md_ci_pivot(f"Final benign token accuracy vs LoRA rank ({attack}, fraction {f:g}, "
                                 f"width p = {sel[0]['model-width']})", sel, "lora-rank", "strategy", ACC,
                                 calib, col_order=STRATEGY_ORDER))
        parts.append(md_paired(f"CLAIR's gain vs r/p, paired ({attack}, fraction {f:g}, p = "
                               f"{sel[0]['model-width']})", sel, "lora-rank"))
    return parts


def _detail_sections(rows: Sequence[Mapping[str, object]]) -> list[str]:
    parts = []
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
    return parts


# -- tables with intervals --------------------------------------------------------------------

def _interval_text(interval: Interval | None, n_all: int | None = None) -> str:
    if interval is None:
        return "-"
    text = interval.text()
    return text if n_all is None or interval.n == n_all else f"{text} ({interval.n})"


def _mark(rows: Sequence[Mapping[str, object]], calib: Mapping[tuple[object, ...], Calibration]) -> str:
    failed = sorted({name for x in rows for name in (calib.get(config_key(x)) or _NO_CHECKS).failed})
    return f" [fails: {', '.join(failed)}]" if failed else ""


def md_ci_pivot(title: str, rows: Sequence[Mapping[str, object]], row_key: str, col_key: str, value: str,
                calib: Mapping[tuple[object, ...], Calibration], row_order: Sequence[object] = (),
                col_order: Sequence[object] = ()) -> str:
    """Mean ± 95% CI over seeds per (row, column); cells of failing configurations marked."""
    if not rows:
        return ""
    rks = ordered((x[row_key] for x in rows), row_order)
    cks = ordered((x[col_key] for x in rows), col_order)
    n_all = len(seeds_of(rows))
    table = []
    for rk in rks:
        line: list[object] = [rk]
        for ck in cks:
            sel = [x for x in rows if x[row_key] == rk and x[col_key] == ck]
            line.append(_interval_text(mean_ci(x.get(value) for x in sel), n_all) + _mark(sel, calib)
                        if sel else "-")
        table.append(line)
    body = markdown_table([f"{row_key} \\ {col_key}"] + [str(c) for c in cks], table)
    return f"### {title}\n\n{body}\n"


def _baselines(rows: Sequence[Mapping[str, object]]) -> list[str]:
    present = {str(x["strategy"]) for x in rows}
    flagging = {str(x["strategy"]) for x in rows if is_flagging(x)}
    return [s for s in STRATEGY_ORDER if s in present and s not in flagging]


def _seed_values(rows: Sequence[Mapping[str, object]], strategy: str) -> dict[int, float | None]:
    return {int(x["seed"]): x.get(ACC) for x in rows if x["strategy"] == strategy}  # type: ignore[call-overload, misc]


def _verdict(interval: Interval | None) -> str:
    if interval is None:
        return "-"
    if interval.lo is None:
        return f"{interval.mean:+.3f} (1 seed)"
    word = "better" if interval.lo > 0 else "worse" if interval.hi < 0 else "no difference"  # type: ignore[operator]
    return f"{interval.mean:+.3f} [{interval.lo:+.3f}, {interval.hi:+.3f}] {word}"


def md_paired(title: str, rows: Sequence[Mapping[str, object]], by: str) -> str:
    """Per value of ``by``: each CLAIR method (and variant) minus each baseline, paired over
    seeds, with its 95% CI and the verdict (better / worse / no difference)."""
    present = [str(m) for m in ordered((x["strategy"] for x in rows if is_flagging(x)), STRATEGY_ORDER)]
    baselines = _baselines(rows)
    if not present or not baselines:
        return ""
    table = []
    for value in ordered(x[by] for x in rows):
        sel = [x for x in rows if x[by] == value]
        for m in present:
            mine = _seed_values(sel, m)
            table.append([value, m] + [_verdict(paired_ci(mine, _seed_values(sel, b))) for b in baselines])
    body = markdown_table([by, "method"] + [f"minus {b}" for b in baselines], table)
    return f"### {title}\n\n{body}\n"


def md_worst_case(title: str, rows: Sequence[Mapping[str, object]],
                  calib: Mapping[tuple[object, ...], Calibration]) -> str:
    """Each method's lowest seed-mean accuracy over the attacks (not ``none``), and the attack
    that achieved it; a second column restricted to attacks whose configuration passed the
    "attack hurts" check, so an attack that does nothing cannot make a method look robust."""
    attacked = [x for x in rows if x["attack"] != "none"]
    if len({x["attack"] for x in attacked}) < 2:
        return ""
    table = []
    for m in ordered((x["strategy"] for x in attacked), STRATEGY_ORDER):
        per_attack = {a: mean_ci(x.get(ACC) for x in attacked if x["strategy"] == m and x["attack"] == a)
                      for a in ordered(x["attack"] for x in attacked)}
        per_attack = {a: v for a, v in per_attack.items() if v is not None}
        hurt = {a: v for a, v in per_attack.items()
                if "attack" not in _mark([x for x in attacked if x["attack"] == a], calib)}
        line: list[object] = [m]
        for pool in (per_attack, hurt):
            if pool:
                a = min(pool, key=lambda k: pool[k].mean)
                line += [pool[a].text(), a]
            else:
                line += ["-", "-"]
        table.append(line)
    body = markdown_table(["strategy", "worst accuracy", "attack", "worst, attacks that hurt FedAvg", "attack"],
                          table)
    return f"### {title}\n\n{body}\n"


def md_calibration(calib: Mapping[tuple[object, ...], Calibration]) -> str:
    """One row per configuration: its checks' seed means (± CI) and pass/fail."""
    if not calib:
        return ""
    names = ("converged", "collaboration", "attack")
    columns = (*CONFIG_KEY, "other axes")
    varying = [i for i, _ in enumerate(columns) if len({k[i] for k in calib}) > 1] or [2]
    table = []
    for key, cal in sorted(calib.items(), key=lambda kv: str(kv[0])):
        checks = {c.name: c for c in cal.checks}
        line: list[object] = [key[i] for i in varying]
        for name in names:
            c = checks.get(name)
            line.append("-" if c is None or c.value is None else
                        f"{c.value.text()} {'pass' if c.passed else 'FAIL'}")
        table.append(line)
    thresholds = {c.name: c.threshold for cal in calib.values() for c in cal.checks}
    legend = "; ".join(f"{n}: {thresholds[n]}" for n in names if n in thresholds)
    body = markdown_table([columns[i] for i in varying] + list(names), table)
    return (f"### Calibration checks (per configuration; seed means ± 95% CI)\n\n{legend}. A check that "
            f"needs a cell the grid did not run (local, oracle or fedavg) shows `-`.\n\n{body}\n")


def md_settings_side_by_side(rows: Sequence[Mapping[str, object]], grid: Grid,
                             calib: Mapping[tuple[object, ...], Calibration]) -> str:
    """The headline attack at the headline fraction and rank, one column per (protocol, task)."""
    sel = [x for x in attack_rows(rows, grid) if x["attack"] != "none"]
    if not sel:
        return ""
    out = []
    for attack in ordered(x["attack"] for x in sel):
        at = [{**x, "setting": _setting_name(_setting(x))} for x in sel if x["attack"] == attack]
        out.append(md_ci_pivot(f"The settings side by side ({attack}, fraction {grid.headline_fraction:g})",
                               at, "strategy", "setting", ACC, calib, STRATEGY_ORDER))
    return "\n".join(out)


_NO_CHECKS = Calibration((), ())


def write_report(rows: Sequence[Mapping[str, object]], out: Path, grid: Grid) -> list[Path]:
    """results.csv, results.md and the plots (those with data; one set per protocol and task
    when the grid has several); returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / RESULTS_CSV, rows, CONFIG_COLUMNS + FIGURE_COLUMNS)
    write_atomic(out / RESULTS_MD, results_markdown(rows, grid))
    paths = [out / RESULTS_CSV, out / RESULTS_MD]
    settings = ordered(_setting(x) for x in done_rows(rows))
    for setting in settings:
        sel = [x for x in rows if _setting(x) == setting]
        suffix = "" if len(settings) == 1 else "_" + _setting_name(setting).replace(" ", "").replace(",", "_")
        for plot, selected, name in (
                (plot_accuracy_by_attack, attack_rows(sel, grid), "accuracy_by_attack"),
                (plot_accuracy_per_round, attack_rows(sel, grid), "accuracy_per_round"),
                (plot_detection_per_round, attack_rows(sel, grid), "detection_per_round"),
                (plot_score_heatmaps, attack_rows(sel, grid), "score_heatmap"),
                (plot_accuracy_vs_fraction, fraction_rows(sel, grid), "accuracy_vs_fraction"),
                (plot_gain_vs_rank, rank_rows(sel, grid), "gain_vs_rank")):
            written = plot(selected, out / f"{name}{suffix}.png")
            if written is not None:
                paths.append(written)
    return paths
