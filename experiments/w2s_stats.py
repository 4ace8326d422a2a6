"""Statistics of weak-to-strong trials over seeds (Burns et al. 2023): PGR with its confidence
interval, means with Student-t intervals. What `experiments.weak_to_strong` reports; one trial's
PGR is `rlhf_jax.w2s.pgr`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from rlhf_jax.w2s import pgr


def student_t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t with `df` degrees of freedom (numpy only: the density is
    integrated with Simpson's rule and the CDF inverted by bisection; error < 1e-6)."""
    if not 0.5 <= p < 1 or df < 1:
        raise ValueError(f"student_t_quantile needs 0.5 <= p < 1 and df >= 1, got {p}, {df}")
    logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:  # P(T <= x) for x >= 0, via t = tan(u) to keep the range finite
        u = np.linspace(0.0, math.atan(x), 4001)
        t = np.tan(u)
        f = np.exp(logc - (df + 1) / 2 * np.log1p(t * t / df)) / np.cos(u) ** 2
        h = u[1] - u[0]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def pgr_ci(acc_weak: Sequence[float], acc_w2s: Sequence[float], acc_ceiling: Sequence[float],
           level: float = 0.95) -> dict[str, Any]:
    """PGR over seeds (paired: one weak, w2s and ceiling accuracy per seed) with a CI.

    The estimate is the ratio of the mean gains, R = mean(w2s - weak) / mean(ceiling - weak)
    (stable when one seed's gap is small, unlike the mean of per-seed ratios). Its CI is the
    delta-method (linearised ratio estimator) interval R +- t_{n-1} * se, with
    se = std(d, ddof=1) / sqrt(n) / |mean(ceiling - weak)| and d_i = gain_i - R * gap_i, using
    Student's t with n - 1 degrees of freedom. Needs n >= 2 seeds for an interval.
    """
    w, s, c = (np.asarray(x, np.float64) for x in (acc_weak, acc_w2s, acc_ceiling))
    if not (w.shape == s.shape == c.shape) or w.ndim != 1 or w.size == 0:
        raise ValueError(f"pgr_ci: need three equal-length 1-D sequences, got shapes "
                         f"{w.shape}, {s.shape}, {c.shape}")
    n = w.size
    gain, gap = s - w, c - w
    mean_gap = float(gap.mean())
    out: dict[str, Any] = {
        "n": n, "level": level, "per_seed": [pgr(*t) for t in zip(w, s, c)],
        "mean_gap": mean_gap, "mean_gain": float(gain.mean()),
        "method": "ratio of mean gains; delta-method CI with Student t (n - 1 df)"}
    if mean_gap == 0:
        out.update(pgr=float("nan"), lo=float("nan"), hi=float("nan"), se=float("nan"),
                   gap_resolved=False)
        return out
    r = float(gain.mean() / mean_gap)
    out["pgr"] = r
    if n < 2:
        out.update(lo=float("nan"), hi=float("nan"), se=float("nan"))
        return out
    se = float(np.std(gain - r * gap, ddof=1) / math.sqrt(n) / abs(mean_gap))
    t = student_t_quantile(0.5 + level / 2, n - 1)
    out.update(se=se, lo=r - t * se, hi=r + t * se, t=t)
    # A gap within noise makes the ratio meaningless: say so rather than print a wild number.
    gap_se = float(np.std(gap, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    out["gap_resolved"] = bool(mean_gap > 2 * gap_se) if n > 1 else None
    return out


def mean_ci(x: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Mean and Student-t interval over seeds."""
    x = np.asarray(x, np.float64)
    m = float(x.mean())
    if x.size < 2:
        return {"mean": m, "lo": float("nan"), "hi": float("nan"), "n": int(x.size)}
    h = student_t_quantile(0.5 + level / 2, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return {"mean": m, "lo": m - h, "hi": m + h, "n": int(x.size)}
