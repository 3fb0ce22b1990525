"""Seed statistics: means with 95% t-intervals, and paired per-seed differences.

Seeds change the data, the initialisation and the contaminated partitions, so a cell's seeds
are independent draws of the same experiment; the interval is Student's t over them. Two
methods run on the same seed see the same data and attackers, so their comparison is paired:
the interval is over the per-seed differences, which is much tighter than comparing the two
means' intervals.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` seeds with its two-sided ``LEVEL`` t-interval (``lo``/``hi`` are None
    for a single seed, where no spread can be estimated)."""

    mean: float
    lo: float | None
    hi: float | None
    n: int
    sd: float | None = None
    """The seeds' standard deviation (None for one seed, and for a Welch difference)."""

    @property
    def half_width(self) -> float | None:
        return None if self.lo is None or self.hi is None else (self.hi - self.lo) / 2

    def excludes_zero(self) -> bool:
        """The interval lies on one side of 0: a difference larger than the seed spread."""
        return self.lo is not None and self.hi is not None and (self.lo > 0 or self.hi < 0)

    def text(self, digits: int = 3) -> str:
        """``0.512 ± 0.031`` (``n=1``: the value alone)."""
        if self.half_width is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def mean_ci(values: Iterable[float | None], level: float = LEVEL) -> Interval | None:
    """Mean and t-interval of the finite values; None when there are none."""
    x = np.array([float(v) for v in values if v is not None and math.isfinite(float(v))])
    if x.size == 0:
        return None
    mean = float(x.mean())
    if x.size < 2:
        return Interval(mean, None, None, 1)
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, x.size - 1) * sd / math.sqrt(x.size))
    return Interval(mean, mean - half, mean + half, int(x.size), sd)


def welch_ci(a: Interval, b: Interval, level: float = LEVEL) -> Interval | None:
    """``a - b`` for independent samples (different federations cannot be paired): Welch's
    interval with the Welch-Satterthwaite degrees of freedom; None without two seeds each."""
    if a.sd is None or b.sd is None or a.n < 2 or b.n < 2:
        return None
    va, vb = a.sd**2 / a.n, b.sd**2 / b.n
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (a.n - 1) + vb**2 / (b.n - 1)) if se > 0 else 1.0
    half = float(stats.t.ppf(0.5 + level / 2, df)) * se
    d = a.mean - b.mean
    return Interval(d, d - half, d + half, min(a.n, b.n))


def paired_ci(a: Mapping[int, float | None], b: Mapping[int, float | None],
              level: float = LEVEL) -> Interval | None:
    """``a - b`` over the seeds both have: the paired comparison of two methods."""
    return mean_ci((float(a[s]) - float(b[s]) for s in sorted(set(a) & set(b))  # type: ignore[arg-type]
                    if a[s] is not None and b[s] is not None), level)
