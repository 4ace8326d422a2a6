"""RL over-optimization (Gao, Schulman & Hilton 2022, Fig. 1b) on the simulated world.

    python -m experiments.gao_rl [--config=configs/gao_rl.py[:tiny]]

PPO against each proxy RM (the label counts / sizes of `experiments.gao_bon`, shared trials),
with a small fixed β and no KL controller, from the SFT policy. Every `eval_every` updates the
policy samples the held-out prompts; each evaluation is a point: d = sqrt(KL(π || π_SFT)) (k1
on its own samples at the rollout temperature), the gold score and the proxy (normalised RM)
score. Per RM it fits Gao et al.'s R_RL(d) = d (α − β log d) to the gold gain over SFT and
tests: the proxy keeps rising; the gold rises, peaks and falls; proxies with fewer labels (or
smaller RMs) peak earlier.

Writes `<workdir>/gao_rl.png`, `.csv` (every evaluation of every run), `.json`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from experiments import gao_bon, lib

CLAIMS = ("the proxy score keeps rising as the policy moves away from SFT",
          "the gold score rises, peaks and falls",
          "proxies with fewer labels (or smaller RMs) peak earlier")


def eval_points(run_dir: Path) -> list[dict]:
    """The PPO run's held-out evaluations (step 0 = the SFT policy) from its metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    pts = {}
    for r in rows:
        if "eval/gold" in r:
            pts[int(r["step"])] = {  # a resumed run may log a step twice: keep the last
                "step": int(r["step"]), "kl": float(r["eval/kl"]),
                "d": float(np.sqrt(max(float(r["eval/kl"]), 0.0))),
                "gold": float(r["eval/gold"]), "gold_sem": float(r["eval/gold_sem"]),
                "proxy": float(r["eval/rm_score"]),
                **{k[5:]: float(v) for k, v in r.items() if k.startswith("eval/gold/")},
                "response_length": float(r.get("eval/response_length", np.nan)),
                "eos_rate": float(r.get("eval/eos_rate", np.nan))}
    return [pts[s] for s in sorted(pts)]


def analyse(name: str, info: dict, pts: list[dict]) -> dict:
    d = np.array([p["d"] for p in pts])
    g = np.array([p["gold"] for p in pts])
    sem = np.array([p["gold_sem"] for p in pts])
    pr = np.array([p["proxy"] for p in pts])
    fit = lib.fit_gao("rl", d, g - g[0], np.hypot(sem, sem[0]))
    i = int(np.argmax(g))
    # Each evaluation samples its own responses: unpaired SEs.
    return {**info, "gold_fit": fit.to_dict(), "gold_sft": float(g[0]),
            "peak_step": pts[i]["step"], "peak_d": float(d[i]), "gold_peak": float(g[i]),
            "gold_last": float(g[-1]), "d_last": float(d[-1]),
            "rise": float(g[i] - g[0]), "rise_se": float(np.hypot(sem[i], sem[0])),
            "drop": float(g[i] - g[-1]), "drop_se": float(np.hypot(sem[i], sem[-1])),
            "proxy_first": float(pr[0]), "proxy_last": float(pr[-1]),
            "proxy_rank_corr": float(np.corrcoef(np.argsort(np.argsort(pr)),
                                                 np.arange(len(pr)))[0, 1]),
            "last_step": pts[-1]["step"]}


def verdicts(results: dict) -> list[lib.Verdict]:
    up = [n for n, r in results.items() if r["proxy_last"] > r["proxy_first"]
          and r["proxy_rank_corr"] > 0.5]
    v1 = lib.Verdict(CLAIMS[0], len(up) == len(results), "; ".join(
        f"{n}: {r['proxy_first']:+.2f} → {r['proxy_last']:+.2f} (rank corr with update "
        f"{r['proxy_rank_corr']:.2f})" for n, r in results.items()))
    fell = [n for n, r in results.items() if r["rise"] > 2 * r["rise_se"]
            and r["peak_step"] < r["last_step"] and r["drop"] > 2 * r["drop_se"]]
    v2 = lib.Verdict(CLAIMS[1], bool(fell), "; ".join(
        f"{n}: {r['gold_sft']:+.3f} → peak {r['gold_peak']:+.3f} at d={r['peak_d']:.2f} → "
        f"{r['gold_last']:+.3f} at d={r['d_last']:.2f} (drop {r['drop']:.3f} ± "
        f"{r['drop_se']:.3f})" for n, r in results.items()))
    chains = {}
    for r in results.values():
        chains.setdefault(r["model"], []).append(r)
    tested, ordered, text = False, True, []
    for model, chain in chains.items():
        if len(chain) < 2:
            continue
        tested = True
        chain = sorted(chain, key=lambda r: r["labels"])
        peaks = [r["peak_d"] for r in chain]
        ordered &= all(a <= b for a, b in zip(peaks, peaks[1:])) and peaks[0] < peaks[-1]
        text.append(f"{model}: measured peak d " + " -> ".join(f"{p:.2f}" for p in peaks) +
                    " for " + ", ".join(str(r["labels"]) for r in chain) + " labels")
    v3 = lib.Verdict(CLAIMS[2], ordered if tested else None, "; ".join(text) or "one RM only")
    return [v1, v2, v3]


def plot(results: dict, points: list[dict], gold: str, out: Path) -> Path:
    import matplotlib

    fig, (ax_g, ax_p) = lib.figure(2, 4.6, 3.6)
    cmap = matplotlib.colormaps["viridis"]
    for i, (name, r) in enumerate(results.items()):
        color = cmap(i / max(len(results) - 1, 1) * 0.85)
        pts = [p for p in points if p["rm"] == name]
        d = np.array([p["d"] for p in pts])
        label = f"{r['model']}, {r['labels']} labels"
        ax_g.errorbar(d, [p["gold"] for p in pts], yerr=[p["gold_sem"] for p in pts], fmt="o",
                      ms=3, capsize=2, color=color, label=label)
        dd = np.linspace(0, d.max(), 80)
        ax_g.plot(dd, r["gold_sft"] + lib.fit_of(r["gold_fit"])(dd), color=color, lw=1, ls="--")
        ax_p.plot(d, [p["proxy"] for p in pts], "o-", ms=3, color=color, label=label)
    ax_g.set_title(f"gold ({gold}); dashed: fitted d(α − β log d)", fontsize=9)
    ax_p.set_title("proxy (normalised RM score)", fontsize=9)
    for ax in (ax_g, ax_p):
        ax.set_xlabel("d = sqrt(KL(π || π_SFT))  [sqrt nats]")
        ax.grid(alpha=0.3)
    ax_g.legend(fontsize=7)
    fig.suptitle("PPO against proxy RMs, fixed small β (Gao et al. 2022, Fig. 1b)", fontsize=10)
    return lib.save_figure(fig, out)


def run(config) -> dict:
    t0 = time.perf_counter()
    out = Path(config.workdir)
    out.mkdir(parents=True, exist_ok=True)
    st = lib.FigureStages(config)
    rms = gao_bon.train_rms(config, st)
    ppo_cfg = config.ppo.copy_and_resolve_references()
    with ppo_cfg.unlocked():
        ppo_cfg.init_from, ppo_cfg.seed = str(st.sft()), int(config.seed)
    names = list(rms)
    runs = st.trials("ppo", ppo_cfg, "configs/ppo_sim.py",
                     [{"reward_from": str(rms[n]["dir"])} for n in names])
    points, results = [], {}
    for name, row in zip(names, runs):
        pts = eval_points(Path(row["workdir"]))
        info = {k: v for k, v in rms[name].items() if k != "dir"}
        points += [{"rm": name, "model": info["model"], "labels": info["labels"], **p}
                   for p in pts]
        results[name] = {**analyse(name, info, pts), "run": row["workdir"]}
    vs = verdicts(results)
    png = plot(results, points, config.gold, out / "gao_rl.png")
    seconds = round(time.perf_counter() - t0, 1)
    lib.write_points(points, out / "gao_rl.csv")
    summary = {"gold": config.gold, "beta": float(config.ppo.kl.beta),
               "updates": int(config.ppo.train.steps), "runs": results,
               "verdicts": [v.to_dict() for v in vs], "seconds": seconds, "png": str(png)}
    lib.write_json(summary, out / "gao_rl.json")
    print("\n  proxy RM            α        β      R²   fit peak d   measured peak d   "
          "gold SFT → peak → last")
    for name, r in results.items():
        f = r["gold_fit"]
        pk = "never" if not np.isfinite(f["peak_d"]) else f"{f['peak_d']:.2f}"
        print(f"  {name:<18} {f['alpha']:+.3f}  {f['beta']:+.3f}  {f['r2']:.2f}  {pk:>8}   "
              f"{r['peak_d']:>8.2f}          {r['gold_sft']:+.3f} → {r['gold_peak']:+.3f} → "
              f"{r['gold_last']:+.3f}")
    lib.print_verdicts(f"Gao et al. 2022 Fig. 1b, PPO at β = {config.ppo.kl.beta} (gold: "
                       f"{config.gold}; {seconds:.0f} s):", vs)
    return summary


DEFAULT_CONFIG = lib.ROOT / "configs" / "gao_rl.py"

if __name__ == "__main__":
    lib.main(run, DEFAULT_CONFIG)
