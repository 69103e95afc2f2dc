"""Mean and 95% confidence interval over clips (Student's t, so a handful of clips gets an honest width)."""
from __future__ import annotations

import math

import numpy as np

# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom; the normal 1.96 beyond
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t95(dof: int) -> float:
    if dof < 1:
        return math.nan
    return _T95[dof - 1] if dof <= len(_T95) else 1.96


def mean_ci95(values) -> tuple[float, float]:
    """(mean, half-width of the 95% interval) of the finite values; half-width NaN for fewer than two."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    if len(v) == 0:
        return math.nan, math.nan
    if len(v) == 1:
        return float(v[0]), math.nan
    return float(v.mean()), float(t95(len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


__all__ = ["mean_ci95", "t95"]
