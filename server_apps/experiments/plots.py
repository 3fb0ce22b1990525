"""The PNG plots of a grid (matplotlib, Agg backend, imported only when a plot is drawn)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from clair_flower.server_apps.experiments.stats import Interval, mean_ci, paired_ci
from clair_flower.server_apps.experiments.tables import STRATEGY_ORDER, is_flagging, ordered, seeds_of, select_rows
from clair_flower.server_apps.results import draw_score_heatmap, integer_round_ticks

LINESTYLES = ("-", "--", "-.", ":")
MARKERS = "os^vDP*Xh<>p"


def _pyplot():  # noqa: ANN202 - matplotlib.pyplot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(n: int):  # noqa: ANN202
    plt = _pyplot()
    cols = min(n, 3)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:n])


def method_style(method: object) -> dict[str, object]:
    """One colour, line style and marker per method, the same in every panel and figure.

    A grid runs up to 13 methods; matplotlib's default cycle has 10 colours, so two methods
    would share one. CLAIR is drawn thicker.
    """
    i = STRATEGY_ORDER.index(method) if method in STRATEGY_ORDER else len(STRATEGY_ORDER) + len(str(method)) % 7
    return {"color": _pyplot().get_cmap("tab20")(i % 20), "ls": LINESTYLES[i % len(LINESTYLES)],
            "marker": MARKERS[i % len(MARKERS)], "lw": 2.5 if method == "clair" else 1.4}


def _method_legend(fig, axes) -> None:  # noqa: ANN001
    """One legend for the figure with every line drawn in any panel (a panel's own legend would
    miss the methods that did not run against its attack)."""
    handles: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(1.0, 0.5),
                   fontsize=8, frameon=False)


def _per_round(rows: Sequence[Mapping[str, object]], key: str) -> tuple[list[int], list[float]]:
    """Seed-mean of ``key`` per round."""
    by_round: dict[int, list[float]] = {}
    for r in rows:
        for rec in r.get("rounds") or []:  # type: ignore[union-attr]
            if rec.get(key) is not None:
                by_round.setdefault(int(rec["round"]), []).append(float(rec[key]))
    xs = sorted(by_round)
    return xs, [float(np.mean(by_round[x])) for x in xs]


def _save(plt, fig, path: Path) -> Path:  # noqa: ANN001
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight": the method legend sits outside the panels
    plt.close(fig)
    return path


def plot_accuracy_per_round(rows: Sequence[Mapping[str, object]], path: Path) -> Path | None:
    """Benign token accuracy per round of every method of the grid on one figure (a panel per
    attack, one line per method, seed means), each method in its own style, one legend."""
    attacks = ordered(r["attack"] for r in rows)
    if not attacks:
        return None
    plt, fig, axes = _panels(len(attacks))
    for ax, attack in zip(axes, attacks):
        for strat in ordered((r["strategy"] for r in rows if r["attack"] == attack), STRATEGY_ORDER):
            xs, ys = _per_round(select_rows(rows, attack=attack, strategy=strat), "benign-token-acc")
            ax.plot(xs, ys, ms=4, label=str(strat), **method_style(strat))  # type: ignore[arg-type]
        ax.set(title=str(attack), xlabel="round", ylabel="benign token accuracy")
        integer_round_ticks(ax)
        ax.grid(alpha=0.3)
    _method_legend(fig, axes)
    return _save(plt, fig, path)


def plot_detection_per_round(rows: Sequence[Mapping[str, object]], path: Path) -> Path | None:
    """TPR (solid) and FPR (dashed) per round for the flagging methods, one panel per attack."""
    rows = [r for r in rows if is_flagging(r) and r["attack"] != "none"]
    attacks = ordered(r["attack"] for r in rows)
    if not attacks:
        return None
    plt, fig, axes = _panels(len(attacks))
    for ax, attack in zip(axes, attacks):
        for i, strat in enumerate(ordered((r["strategy"] for r in rows if r["attack"] == attack), STRATEGY_ORDER)):
            sel = select_rows(rows, attack=attack, strategy=strat)
            color = method_style(strat)["color"]
            ax.plot(*_per_round(sel, "tpr"), marker="o", ms=3, color=color, label=f"{strat} TPR")
            ax.plot(*_per_round(sel, "fpr"), marker="s", ms=3, ls="--", color=color, label=f"{strat} FPR")
        ax.set(title=str(attack), xlabel="round", ylim=(-0.05, 1.05))
        integer_round_ticks(ax)
        ax.grid(alpha=0.3)
    _method_legend(fig, axes)
    return _save(plt, fig, path)


def plot_score_heatmaps(rows: Sequence[Mapping[str, object]], path: Path) -> Path | None:
    """Clients x rounds heatmap of the per-client score, one panel per flagging cell (lowest
    seed), contaminated clients marked and the flag threshold on each colour bar."""
    rows = [r for r in rows if is_flagging(r)
            and any(isinstance(rec.get("client-scores"), Mapping) for rec in r.get("rounds") or [])]  # type: ignore[union-attr]
    if not rows:
        return None
    first = seeds_of(rows)[0]
    rows = sorted((r for r in rows if int(r["seed"]) == first),  # type: ignore[call-overload]
                  key=lambda r: (str(r["attack"]), _order(r["strategy"])))
    plt, fig, axes = _panels(len(rows))
    for ax, row in zip(axes, rows):
        draw_score_heatmap(ax, row["rounds"], f"{row['strategy']}, {row['attack']} (seed {first})")  # type: ignore[arg-type]
    fig.suptitle("per-client score: x flagged, red * contaminated, bar line: flag threshold", fontsize=9)
    return _save(plt, fig, path)


def _order(strategy: object) -> tuple[int, str]:
    """Sort key: the STRATEGY_ORDER position of a strategy (or of the one a variant is of)."""
    base = str(strategy).split(" ")[0]
    return (STRATEGY_ORDER.index(base) if base in STRATEGY_ORDER else len(STRATEGY_ORDER), str(strategy))


def _ci_bar(interval: Interval | None) -> tuple[float, float]:
    """(mean, half-width) for an error bar; NaN mean where no cell ran, 0 width for one seed."""
    if interval is None:
        return np.nan, 0.0
    return interval.mean, interval.half_width or 0.0


def plot_accuracy_by_attack(rows: Sequence[Mapping[str, object]], path: Path) -> Path | None:
    """Final benign token accuracy per method, grouped by attack, with 95% CI bars over seeds."""
    attacks = ordered(r["attack"] for r in rows)
    methods = ordered((r["strategy"] for r in rows), STRATEGY_ORDER)
    if not attacks or not methods:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(attacks) * (1 + len(methods) / 6)), 4))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        bars = [_ci_bar(mean_ci(r.get("final-benign-token-acc") for r in rows
                                if r["strategy"] == m and r["attack"] == a)) for a in attacks]
        ax.bar(np.arange(len(attacks)) + (j - (len(methods) - 1) / 2) * width, [b[0] for b in bars], width,
               yerr=[b[1] for b in bars], capsize=2, label=str(m))
    ax.set_xticks(np.arange(len(attacks)), [str(a) for a in attacks])
    ax.set(ylabel="final benign token accuracy", title="accuracy per attack (95% CI over seeds)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, ncol=2)
    return _save(plt, fig, path)


def plot_accuracy_vs_fraction(rows: Sequence[Mapping[str, object]], path: Path) -> Path | None:
    """Final benign token accuracy vs contaminated fraction, one panel per attack, 95% CI bars."""
    attacks = ordered(r["attack"] for r in rows)
    if not attacks:
        return None
    plt, fig, axes = _panels(len(attacks))
    for ax, attack in zip(axes, attacks):
        sel = [r for r in rows if r["attack"] == attack]
        fracs = ordered(r["attack-fraction"] for r in sel)
        for strat in ordered((r["strategy"] for r in sel), STRATEGY_ORDER):
            bars = [_ci_bar(mean_ci(r.get("final-benign-token-acc") for r in sel
                                    if r["strategy"] == strat and r["attack-fraction"] == f)) for f in fracs]
            ax.errorbar(fracs, [b[0] for b in bars], yerr=[b[1] for b in bars], marker="o", capsize=2,
                        label=str(strat))
        ax.set(title=str(attack), xlabel="contaminated fraction", ylabel="final benign token accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(plt, fig, path)


def plot_gain_vs_rank(rows: Sequence[Mapping[str, object]], path: Path) -> Path | None:
    """Each method's gain over local-only vs r/p (p = model width), paired 95% CI bars over
    seeds, one line per (method, attack)."""
    methods = [m for m in ordered((r["strategy"] for r in rows), STRATEGY_ORDER) if m != "local"]
    curves = {}
    for m in methods:
        for a in ordered(r["attack"] for r in rows):
            pts = []
            for rank in sorted({int(r["lora-rank"]) for r in rows if r["attack"] == a}):  # type: ignore[call-overload]
                sel = [r for r in rows if r["attack"] == a and r["lora-rank"] == rank]
                seeds = {s: {int(r["seed"]): r.get("final-benign-token-acc") for r in sel  # type: ignore[call-overload]
                             if r["strategy"] == s} for s in (m, "local")}
                gain = paired_ci(seeds[m], seeds["local"])
                if gain is not None:
                    pts.append((rank / int(sel[0]["model-width"]), *_ci_bar(gain)))  # type: ignore[call-overload]
            if pts:
                curves[(m, a)] = pts
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for (method, attack), pts in curves.items():
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=2,
                    label=f"{method} ({attack})", lw=2.5 if method == "clair" else 1.2)
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="r / p (LoRA rank / model width)", ylabel="final benign token acc - local (paired)",
           title="gain over local-only vs r/p (95% CI over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)
