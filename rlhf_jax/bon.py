"""Best-of-n: unbiased gold / proxy estimates for every n <= N, its KL, and the curves' writer.

Best-of-n samples n responses from a policy and keeps the one the proxy (the reward model) scores
highest. Over-optimisation papers plot its gold score against sqrt(KL) first (Gao et al. 2022).

* Estimates (Nakano et al. 2021, WebGPT, App. I). From N >= n samples of one prompt sorted by
  proxy ascending, with values v_(1..N) (gold or proxy) in that order,
      E[v(best of n)] = sum_{i=n}^{N} C(i - 1, n - 1) / C(N, n) * v_(i),
  the average over all C(N, n) subsets of size n of the value of the subset's proxy-best
  member: the i-th lowest sample is the best of exactly C(i - 1, n - 1) subsets. One sorted set of
  N samples gives every n <= N, unbiased, with no fresh draws per n (DESIGN.md pitfall 18).
  Proxy ties: a subset whose best proxy is shared picks among the tied members uniformly at
  random, so each run of equal proxies is given its mean value before weighting. The result
  does not depend on the samples' order and equals brute-force enumeration of every subset
  with that tie rule; a policy that keeps the first best of n i.i.d. samples
  (`best_of_n_indices`) has exactly this distribution.
* Standard errors: bootstrap over prompts (seeded).
* KL(pi_bon || pi) = log n - (n - 1)/n for a continuous proxy with no ties (Stiennon et al.
  2020; Gao et al. 2022). For discrete outputs, which repeat, it is an upper bound.
  `bon_kl_discrete` gives the exact value for a categorical base distribution; applied to the
  empirical distribution of the N samples of a prompt (`bon_kl_empirical`) it is a plug-in
  estimate that shows where the formula and the data part.

Host-side numpy (float64): these run once on gathered scores, not inside a training step.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Hashable, Sequence

import numpy as np

from rlhf_jax.errors import UserError


def kl_bon(n) -> np.ndarray:
    """Analytic KL(best-of-n || base) = log n - (n - 1)/n in nats (an upper bound when outputs
    repeat)."""
    n = np.asarray(n, np.float64)
    return np.log(n) - (n - 1.0) / n


def _check_ns(ns: Sequence[int] | None, N: int) -> np.ndarray:
    ns = np.arange(1, N + 1) if ns is None else np.asarray(ns)
    if ns.ndim != 1 or ns.size == 0 or not np.issubdtype(ns.dtype, np.integer) or \
            ns.min() < 1 or ns.max() > N:
        raise UserError("config.bon.ns", f"{ns.tolist()} must be integers in [1, N={N}]",
                        "list the n to estimate, each at most the samples per prompt")
    return ns.astype(np.int64)


def bon_weights(N: int, ns: Sequence[int] | None = None) -> np.ndarray:
    """[len(ns), N]: row n weights the i-th lowest (1-based) of N sorted samples by
    C(i - 1, n - 1) / C(N, n) (zero for i < n); each row sums to 1 (hockey-stick identity)."""
    ns = _check_ns(ns, N)
    # Exact integer binomials, divided once: correct for any N (no float overflow).
    return np.array([[math.comb(i - 1, n - 1) / math.comb(N, n) for i in range(1, N + 1)]
                     for n in ns], np.float64)


def _sorted_tie_averaged(proxy: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Values [P, N] sorted by proxy ascending, each run of equal proxies replaced by its mean."""
    P, N = proxy.shape
    order = np.argsort(proxy, axis=1, kind="stable")
    s = np.take_along_axis(proxy, order, axis=1)
    v = np.take_along_axis(values, order, axis=1)
    new_run = np.concatenate([np.ones((P, 1), bool), s[:, 1:] != s[:, :-1]], axis=1)
    run = np.cumsum(new_run, axis=1) - 1 + (np.arange(P) * N)[:, None]  # global run ids
    sums = np.bincount(run.ravel(), weights=v.ravel(), minlength=P * N)
    counts = np.bincount(run.ravel(), minlength=P * N)
    return (sums / np.maximum(counts, 1))[run]


def expected_best_of_n(proxy, values, ns: Sequence[int] | None = None) -> np.ndarray:
    """Per-prompt unbiased estimates [P, len(ns)] of E[values of the proxy-best of n samples].

    proxy, values: [P, N] (N samples per prompt). `values` may be the gold score or the proxy
    itself. Ties in proxy share their mean value (see the module docstring).
    """
    proxy = np.asarray(proxy, np.float64)
    values = np.asarray(values, np.float64)
    if proxy.ndim != 2 or proxy.shape != values.shape:
        raise UserError("best-of-n scores", f"proxy {proxy.shape} and values {values.shape} must "
                        "both be [prompts, N]", "give one score per sample per prompt")
    if not (np.all(np.isfinite(proxy)) and np.all(np.isfinite(values))):
        raise UserError("best-of-n scores", "a score is NaN or infinite",
                        "check the reward model and gold judges")
    W = bon_weights(proxy.shape[1], ns)
    return _sorted_tie_averaged(proxy, values) @ W.T


def best_of_n_indices(proxy) -> np.ndarray:
    """Index [P] of the proxy-best of the n samples in each row of `proxy` [P, n]: the first
    best, which for i.i.d. samples is a uniform choice among the tied (the estimator's rule)."""
    return np.argmax(np.asarray(proxy), axis=1)


def bootstrap_se(per_prompt, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """Standard error of the mean over prompts (axis 0) by bootstrap: resample prompts with
    replacement `n_boot` times (numpy generator seeded with `seed`); NaN with fewer than 2."""
    x = np.asarray(per_prompt, np.float64)
    P = x.shape[0]
    if P < 2:
        return np.full(x.shape[1:], np.nan)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(P, np.full(P, 1.0 / P), size=n_boot)  # [n_boot, P]
    means = counts @ x.reshape(P, -1) / P
    return means.std(axis=0, ddof=1).reshape(x.shape[1:])


def paired_diff(per_prompt, i: int, j: int, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean over prompts of point i minus point j of per-prompt curves [P, points] (e.g. the
    `expected_best_of_n` of two n), with its bootstrap SE paired over prompts: the same prompts'
    samples give both points, so their per-prompt offsets cancel."""
    x = np.asarray(per_prompt, np.float64)
    diff = x[:, i] - x[:, j]
    return {"diff": float(diff.mean()), "se": float(bootstrap_se(diff[:, None], n_boot, seed)[0])}


def peak_drop(per_prompt, n_boot: int = 1000, seed: int = 0) -> dict:
    """Where the mean curve over prompts [P, points] peaks, and how far its last point lies below
    the peak, with the paired bootstrap SE of that drop (over-optimisation: Gao et al. 2022)."""
    x = np.asarray(per_prompt, np.float64)
    mean = x.mean(axis=0)
    i = int(np.argmax(mean))
    d = paired_diff(x, i, -1, n_boot, seed)
    return {"peak_index": i, "peak": float(mean[i]), "last": float(mean[-1]),
            "drop": d["diff"], "drop_se": d["se"]}


# ----------------------------------------------------------------------------------------------
# KL of best-of-n for discrete outputs.


def bon_kl_discrete(probs, proxy, ns: Sequence[int] | int) -> np.ndarray:
    """Exact KL(best-of-n || q) in nats for a categorical q over outputs with proxy scores.

    Group outputs into levels of equal proxy, with masses q_L and F_L = q(proxy <= level L). The
    best of n i.i.d. draws lands in level L with probability F_L^n - F_{L-1}^n and, with uniform
    tie-breaking, on output y of that level in proportion to q(y). So within a level the ratio
    bon / q is constant and KL = sum_L P_L log(P_L / q_L). With every q(y) -> 0 (no repeats) this
    tends to log n - (n - 1)/n from below.
    """
    ns_arr = np.atleast_1d(np.asarray(ns, np.int64))
    q = np.asarray(probs, np.float64)
    s = np.asarray(proxy, np.float64)
    order = np.argsort(s, kind="stable")
    q, s = q[order], s[order]
    level = np.cumsum(np.concatenate([[True], s[1:] != s[:-1]])) - 1
    q_level = np.bincount(level, weights=q)
    q_level = q_level / q_level.sum()
    F_hi = np.minimum(np.cumsum(q_level), 1.0)
    F_lo = F_hi - q_level
    P = F_hi[None, :] ** ns_arr[:, None] - F_lo[None, :] ** ns_arr[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(P > 0, P * np.log(P / q_level[None, :]), 0.0)
    kl = np.maximum(terms.sum(axis=1), 0.0)
    return kl if np.ndim(ns) else kl[0]


def bon_kl_empirical(output_ids: Sequence[Sequence[Hashable]], proxy,
                     ns: Sequence[int] | None = None) -> np.ndarray:
    """Per-prompt plug-in estimate [P, len(ns)] of KL(best-of-n || base) for discrete outputs.

    `output_ids[p][j]` identifies sample j of prompt p (any hashable: a token tuple, a string).
    The base distribution is the empirical one of the N samples (multiplicities as counts); an
    output's proxy is the mean over its copies (a deterministic RM gives them all the same).
    Returns `bon_kl_discrete` of that distribution. It cannot exceed what N samples can show:
    with N distinct outputs it is sum_i P_i log(N P_i), P_i = (i/N)^n - ((i-1)/N)^n, which
    approaches log n - (n - 1)/n as N grows; outputs that repeat pull it lower.
    """
    proxy = np.asarray(proxy, np.float64)
    P, N = proxy.shape
    if len(output_ids) != P or any(len(row) != N for row in output_ids):
        raise UserError("best-of-n outputs", f"output ids must be [prompts={P}, N={N}] like the "
                        "proxy scores", "give one id per sample per prompt")
    ns = _check_ns(ns, N)
    out = np.empty((P, len(ns)))
    for p in range(P):
        index: dict[Hashable, int] = {}
        inv = np.array([index.setdefault(y, len(index)) for y in output_ids[p]])
        counts = np.bincount(inv)
        proxy_y = np.bincount(inv, weights=proxy[p]) / counts
        out[p] = bon_kl_discrete(counts / N, proxy_y, ns)
    return out


# ----------------------------------------------------------------------------------------------
# Curves and their files.

CSV_FIELDS = ("n", "kl_bon", "sqrt_kl_bon", "kl_empirical", "sqrt_kl_empirical", "gold",
              "gold_se", "proxy", "proxy_se", "prompts", "samples_per_prompt")


def bon_curves(proxy, gold, ns: Sequence[int] | None = None, *,
               output_ids: Sequence[Sequence[Hashable]] | None = None, n_boot: int = 1000,
               seed: int = 0) -> list[dict]:
    """One row per n (default every n <= N): analytic and (with `output_ids`) empirical KL, and
    the mean over prompts of the best-of-n gold and proxy estimates with bootstrap SEs."""
    proxy = np.asarray(proxy, np.float64)
    P, N = proxy.shape
    ns = _check_ns(ns, N)
    gold_pp = expected_best_of_n(proxy, gold, ns)
    proxy_pp = expected_best_of_n(proxy, proxy, ns)
    gold_se = bootstrap_se(gold_pp, n_boot, seed)
    proxy_se = bootstrap_se(proxy_pp, n_boot, seed)
    kl_emp = (bon_kl_empirical(output_ids, proxy, ns).mean(axis=0) if output_ids is not None
              else np.full(len(ns), np.nan))
    kl = kl_bon(ns)
    return [{
        "n": int(n), "kl_bon": float(kl[j]), "sqrt_kl_bon": float(np.sqrt(kl[j])),
        "kl_empirical": float(kl_emp[j]), "sqrt_kl_empirical": float(np.sqrt(kl_emp[j])),
        "gold": float(gold_pp[:, j].mean()), "gold_se": float(gold_se[j]),
        "proxy": float(proxy_pp[:, j].mean()), "proxy_se": float(proxy_se[j]),
        "prompts": P, "samples_per_prompt": N,
    } for j, n in enumerate(ns)]


def _refuse_existing(path: str, overwrite: bool) -> None:
    if os.path.exists(path) and not overwrite:
        raise UserError(path, "already exists", "choose another output directory or pass "
                        "overwrite=True")


def write_curves(rows: Sequence[dict], out_dir: str, *, name: str = "bon",
                 title: str | None = None, overwrite: bool = False) -> dict[str, str]:
    """Write `<name>.csv` (every field of every row) and `<name>.png` (gold and proxy with SE
    bars against sqrt(KL_bon); dotted against the empirical KL where known) into `out_dir`.
    Refuses to replace existing files unless `overwrite`. Returns {"csv": path, "png": path}."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"csv": os.path.join(out_dir, f"{name}.csv"),
             "png": os.path.join(out_dir, f"{name}.png")}
    for path in paths.values():
        _refuse_existing(path, overwrite)
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in CSV_FIELDS})

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    col = {k: np.array([r[k] for r in rows], np.float64) for k in CSV_FIELDS}
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for key, color in (("gold", "tab:orange"), ("proxy", "tab:blue")):
        ax.errorbar(col["sqrt_kl_bon"], col[key], yerr=col[f"{key}_se"], color=color,
                    marker="o", ms=3, capsize=2, label=f"{key} (KL = log n - (n-1)/n)")
        if np.all(np.isfinite(col["sqrt_kl_empirical"])):
            ax.plot(col["sqrt_kl_empirical"], col[key], color=color, ls=":", lw=1.5,
                    marker="x", ms=4, alpha=0.8, label=f"{key} (empirical KL)")
    for x, y, n in zip(col["sqrt_kl_bon"], col["gold"], col["n"]):
        if int(n) & (int(n) - 1) == 0:  # label n = 1, 2, 4, 8, ...
            ax.annotate(f"n={int(n)}", (x, y), textcoords="offset points", xytext=(3, -10),
                        fontsize=7)
    ax.set_xlabel("sqrt(KL(best-of-n || policy))  [sqrt nats]")
    ax.set_ylabel("score")
    ax.set_title(title or f"best-of-n, {int(col['prompts'][0])} prompts x "
                 f"{int(col['samples_per_prompt'][0])} samples")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    return paths
