"""Best-of-n over-optimization (Gao, Schulman & Hilton 2022, Fig. 1a) on the simulated world.

    python -m experiments.gao_bon [--config=configs/gao_bon.py[:tiny]] [--config.workers=2]

Proxy RMs are trained on the simulated annotators' labels (one per label count and RM size,
sweep trials shared with the other figures); the SFT policy draws N samples for each held-out
prompt once, and for every n <= N the unbiased estimator (Nakano et al. 2021, `rlhf_jax.bon`)
gives the gold and proxy score of best-of-n by each proxy, against
d = sqrt(KL_bon) = sqrt(log n - (n - 1)/n). Per RM it fits Gao et al.'s
R_bon(d) = d (alpha - beta d) to the gold gain over n = 1 (and to the proxy's), and tests the
claims: the proxy rises monotonically; the gold rises, peaks and falls; RMs with fewer labels
(or smaller RMs) peak earlier.

Writes `<workdir>/gao_bon.png`, `gao_bon.csv` (every RM x judge x n point), `gao_bon.json`
(fits, peaks, verdicts), and prints the fit table and the verdicts.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from experiments import lib
from rlhf_jax import rng

CLAIMS = ("the proxy score rises monotonically with n",
          "the gold score rises, peaks and falls",
          "proxies with fewer labels (or smaller RMs) peak earlier")


def rm_models(config) -> list[str]:
    return [m.strip() for m in str(config.rm_models).split(",") if m.strip()] or [config.model]


def train_rms(config, st: lib.FigureStages) -> dict[str, dict]:
    """{name: {"dir", "model", "labels", "accuracy", "ceiling"}} for every proxy RM."""
    out = {}
    for model in rm_models(config):
        rows = [{"data.source.num_train": int(n), "data.source.judge": config.judge}
                for n in config.label_counts]
        for n, d in zip(config.label_counts, st.rms(rows, model)):
            s = lib.trial_summary({"workdir": d})
            out[f"{model}/{int(n)}"] = {"dir": str(d), "model": model, "labels": int(n),
                                        "accuracy": s["held_out_accuracy"],
                                        "ceiling": s.get("gold_ceiling_accuracy")}
    return out


def verdicts(results: dict) -> list[lib.Verdict]:
    mono = [n for n, r in results.items() if r["proxy_monotone"]]
    v1 = lib.Verdict(CLAIMS[0], len(mono) == len(results),
                     f"monotone for {len(mono)} of {len(results)} proxies")
    fell = [n for n, r in results.items() if lib.bon_falls(r)]
    v2 = lib.Verdict(CLAIMS[1], bool(fell), "; ".join(
        f"{n}: +{r['rise']:.3f} to n={r['peak_n']}, then -{r['drop']:.3f} ± {r['drop_se']:.3f}"
        f" by n={r['n_max']}" for n, r in results.items()))
    # Order of the fitted peaks along label counts (per model) and sizes (per label count).
    chains = {}
    for n, r in results.items():
        chains.setdefault(("labels", r["model"]), []).append((r["labels"], r))
        chains.setdefault(("size", r["labels"]), []).append((r["params"], r))
    ordered, tested, text = True, False, []
    for key, chain in chains.items():
        if len(chain) < 2:
            continue
        tested = True
        peaks = [r["gold_fit"]["peak_d"] for _, r in sorted(chain, key=lambda t: t[0])]
        ok = all(a <= b for a, b in zip(peaks, peaks[1:])) and peaks[0] < peaks[-1]
        ordered &= ok
        text.append(f"{key[0]} ({key[1]}): fitted peak d " + " -> ".join(
            "never" if not np.isfinite(p) else f"{p:.2f}" for p in peaks))
    v3 = lib.Verdict(CLAIMS[2], ordered if tested else None,
                     "; ".join(text) or "one RM only")
    return [v1, v2, v3]


def run(config) -> dict:
    from rlhf_jax import models

    t0 = time.perf_counter()
    out = Path(config.workdir)
    out.mkdir(parents=True, exist_ok=True)
    st = lib.FigureStages(config)
    rms = train_rms(config, st)
    for r in rms.values():
        r["params"] = models.param_count(models.preset(r["model"]), ("score",))
    t_stages = time.perf_counter() - t0
    judges = (config.gold, *[j for j in config.also_judges if j != config.gold])
    samples = lib.bon_samples(st.sft(), {n: Path(r["dir"]) for n, r in rms.items()},
                              lib.held_out_prompts(config, int(config.bon.prompts)),
                              int(config.bon.n), config.bon, judges,
                              rng.key(config.seed, rng.Purpose.BEST_OF_N_CURVES))
    ns = lib.powers_of_two(int(config.bon.n))
    points, results = lib.bon_analysis(samples, rms, config.gold, judges, ns,
                                       int(config.bon.n_boot))
    vs = verdicts(results)
    png = lib.plot_bon(results, points, config.gold, out / "gao_bon.png",
                       "Best-of-n against proxy RMs (Gao et al. 2022, Fig. 1a)",
                       lambda name, r: f"{r['model']}, {r['labels']} labels "
                                       f"(acc {r['accuracy']:.2f})")
    seconds = {"stages": round(t_stages, 1), "total": round(time.perf_counter() - t0, 1)}
    summary = {"gold": config.gold, "label_judge": config.judge, "ns": ns,
               "prompts": int(config.bon.prompts), "samples_per_prompt": int(config.bon.n),
               "rms": results, "verdicts": [v.to_dict() for v in vs], "seconds": seconds,
               "files": {"png": str(png), "csv": str(out / "gao_bon.csv")}}
    lib.write_points(points, out / "gao_bon.csv")
    lib.write_json(summary, out / "gao_bon.json")
    lib.print_bon_table(results)
    lib.print_verdicts(f"Gao et al. 2022 Fig. 1a, best-of-n (gold: {config.gold}; "
                       f"{seconds['total']:.0f} s):", vs)
    return summary


DEFAULT_CONFIG = lib.ROOT / "configs" / "gao_bon.py"

if __name__ == "__main__":
    lib.main(run, DEFAULT_CONFIG)
