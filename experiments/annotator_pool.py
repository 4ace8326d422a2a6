"""Over-optimization only with a varied annotator pool (Dubois et al. 2023, AlpacaFarm).

    python -m experiments.annotator_pool [--config=configs/annotator_pool.py[:tiny]]

AlpacaFarm found that reward over-optimization, which human feedback shows, appears in
simulation only when the simulated annotators vary (a pool with per-annotator biases and 25%
label flips), not with a single consistent annotator. Here two proxy RMs learn from the same
number of rankings — one labelled by a single near-noiseless annotator, one by the pool with
flips — and best-of-n of the SFT policy is scored by the gold for every n <= N (one shared set
of samples, the unbiased estimator). Claim: the gold falls after its peak with the pool's RM
and not with the single annotator's.

Writes `<workdir>/annotator_pool.png`, `.csv` (every RM x judge x n point), `.json`.
"""

from __future__ import annotations

import time
from pathlib import Path

from experiments import lib
from rlhf_jax import rng

CLAIM = "over-optimization (gold falling after its peak) shows only with the varied pool"


def run(config) -> dict:
    t0 = time.perf_counter()
    out = Path(config.workdir)
    out.mkdir(parents=True, exist_ok=True)
    st = lib.FigureStages(config)
    regimes = {"single": config.single, "pool": config.pool}
    rows = [{"data.source.num_train": int(config.label_count), "data.source.judge": config.judge,
             **{f"data.source.{k}": v for k, v in r.items()}} for r in regimes.values()]
    rms = {}
    for name, d in zip(regimes, st.rms(rows)):
        s = lib.trial_summary({"workdir": d})
        rms[name] = {"dir": str(d), "labels": int(config.label_count),
                     "accuracy": s["held_out_accuracy"],
                     "ceiling": s.get("gold_ceiling_accuracy"), **regimes[name].to_dict()}
    samples = lib.bon_samples(st.sft(), {n: Path(r["dir"]) for n, r in rms.items()},
                              lib.held_out_prompts(config, int(config.bon.prompts)),
                              int(config.bon.n), config.bon, (config.gold,),
                              rng.key(config.seed, rng.Purpose.BEST_OF_N_CURVES))
    ns = lib.powers_of_two(int(config.bon.n))
    points, results = lib.bon_analysis(samples, rms, config.gold, (config.gold,), ns,
                                       int(config.bon.n_boot))
    fell = {n: lib.bon_falls(r) for n, r in results.items()}
    v = lib.Verdict(CLAIM, fell["pool"] and not fell["single"], "; ".join(
        f"{n}: gold {r['gold_n1']:+.3f} → peak {r['gold_peak']:+.3f} at n={r['peak_n']} → "
        f"{r['gold_last']:+.3f} at n={r['n_max']} (drop {r['drop']:.3f} ± {r['drop_se']:.3f}: "
        f"{'falls' if fell[n] else 'no significant fall'})" for n, r in results.items()))
    png = lib.plot_bon(results, points, config.gold, out / "annotator_pool.png",
                       "Best-of-n: one annotator vs a noisy pool (AlpacaFarm)",
                       lambda n, r: f"{n}: {r['pool']} pool, flips {r['flip_prob']:.2f} "
                                    f"(RM acc {r['accuracy']:.2f})")
    seconds = round(time.perf_counter() - t0, 1)
    lib.write_points(points, out / "annotator_pool.csv")
    summary = {"gold": config.gold, "ns": ns, "rms": results, "verdicts": [v.to_dict()],
               "seconds": seconds, "png": str(png)}
    lib.write_json(summary, out / "annotator_pool.json")
    lib.print_bon_table(results)
    lib.print_verdicts(f"Dubois et al. 2023 (AlpacaFarm), gold {config.gold} ({seconds:.0f} s):",
                       [v])
    return summary


DEFAULT_CONFIG = lib.ROOT / "configs" / "annotator_pool.py"

if __name__ == "__main__":
    lib.main(run, DEFAULT_CONFIG)
