"""Ordinary least squares of score on log2(rank), with a 95% confidence interval on the slope."""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist


def t_quantile(p: float, dof: int) -> float:
    """Student-t quantile by the Cornish-Fisher expansion (scipy-free; within 1e-3 of exact for dof >= 3)."""
    z = NormalDist().inv_cdf(p)
    if dof <= 0:
        return float("inf")
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / dof + g2 / dof**2 + g3 / dof**3


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and its 95% t-interval (runs with other seeds as the samples); needs at least 2 values."""
    n = len(values)
    if n < 2:
        raise ValueError(f"a 95% interval of a mean needs at least 2 values, got {n}")
    mean = sum(values) / n
    half = t_quantile(0.975, n - 1) * (sum((x - mean) ** 2 for x in values) / (n - 1)) ** 0.5 / n**0.5
    return mean, mean - half, mean + half


@dataclass
class Fit:
    slope: float
    intercept: float
    slope_lo: float
    slope_hi: float
    n: int
    r2: float
    se: float  # standard error of the slope


def fit_log2(ranks: list[float], scores: list[float]) -> Fit:
    if len(ranks) != len(scores) or len(ranks) < 3:
        raise ValueError(f"need at least 3 (rank, score) pairs, got {len(ranks)}")
    if any(r <= 0 for r in ranks):
        raise ValueError("ranks must be > 0 for log2")
    x = [math.log2(r) for r in ranks]
    n = len(x)
    mx, my = sum(x) / n, sum(scores) / n
    sxx = sum((a - mx) ** 2 for a in x)
    if sxx == 0:
        raise ValueError("all ranks are equal: no slope to fit")
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, scores))
    b = sxy / sxx
    a = my - b * mx
    sse = sum((s - (a + b * xi)) ** 2 for xi, s in zip(x, scores))
    sst = sum((s - my) ** 2 for s in scores)
    se = math.sqrt(sse / (n - 2) / sxx) if n > 2 else float("inf")
    t = t_quantile(0.975, n - 2)
    return Fit(b, a, b - t * se, b + t * se, n, 1 - sse / sst if sst > 0 else float("nan"), se)  # no variance: no R²
