"""The reward–KL frontier of each method (Rafailov et al. 2023, DPO, Fig. 2) on the simulated
world.

    python -m experiments.frontier [--config=configs/frontier.py[:tiny]]

DPO's Figure 2 plots, for controlled sentiment generation, the gold reward of each trained
policy against its sequence KL from the reference over each method's hyper-parameter grid, and
finds DPO's frontier above PPO's. Here every method starts from one SFT policy and learns from
one set of comparisons: PPO, RLOO and GRPO over fixed KL coefficients and DPO over its β (sweep
trials, shared with the other figures), best-of-N over n (one set of N samples per prompt, the
unbiased estimator). All trained policies are evaluated on the
same held-out prompts (`lib.compare_policies`: k1 KL from SFT on the policy's own samples).

The frontier of a method is the best gold it reached at KL <= k. On a grid over the KL range
every method covers, the module reports which frontier is highest where, and tests DPO's claim
that its frontier lies above PPO's. It also fits Gao et al.'s forms to each method's points
(d(α − β log d) for trained policies, d(α − βd) for best-of-n) as a compact summary.

Writes `<workdir>/frontier.png`, `.csv` (one row per policy / n), `.json`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from experiments import lib
from rlhf_jax import registry, rng
from rlhf_jax.errors import UserError

CLAIM = "DPO's reward-KL frontier lies above PPO's"


def methods(config) -> list[registry.Method]:
    """The entries of `config.methods`: trained methods whose block the config holds, swept over
    the figure config's `<method>_<knob>s` values (`ppo_betas`), and best-of-n over n."""
    return registry.parse(config.methods, among=[
        n for n, m in registry.METHODS.items() if n in config and (
            not m.trains or values_field(m) in config)])


def values_field(m: registry.Method) -> str:
    """The figure config's field holding the values of a method's knob (`ppo_betas`)."""
    return f"{m.name}_{m.knob.split('.')[-1]}s"


def floats(text: str, field: str) -> list[float]:
    try:
        return [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError as e:
        raise UserError(f"config.{field}", f"{text!r} is not a comma list of numbers", "") from e


def train(config, st: lib.FigureStages, sft_dir: Path, rm_dir: Path) -> dict[str, dict]:
    """{policy name: {"method", "knob", "value", "dir"}} of every trained policy."""
    out = {}
    for m in methods(config):
        if not m.trains:
            continue
        cfg = m.stage_config(config[m.block], sft=sft_dir, rm=rm_dir, rm_config=config.rm,
                             seed=config.seed)
        values = floats(config[values_field(m)], values_field(m))
        for v, row in zip(values, st.trials(m.name, cfg, m.config_file,
                                            [{m.knob: v} for v in values], arg=m.arg)):
            out[f"{m.name} {m.knob.split('.')[-1]}={v:g}"] = {
                "method": m.name, "knob": m.knob, "value": v, "dir": row["workdir"]}
    return out


def envelope(kl: np.ndarray, gold: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Best gold reached at KL <= k for each k of `grid` (NaN below the smallest KL)."""
    out = np.full(grid.shape, np.nan)
    for i, k in enumerate(grid):
        ok = kl <= k
        if ok.any():
            out[i] = gold[ok].max()
    return out


def dominance(points: list[dict], names: list[str]) -> dict:
    """Each method's frontier on a grid over the KL range all methods cover."""
    by = {n: [p for p in points if p["method"] in (n, "sft")] for n in names}
    lo = max(min(p["kl"] for p in by[n] if p["method"] != "sft") for n in names)
    hi = min(max(p["kl"] for p in by[n]) for n in names)
    if not hi > lo > 0:
        return {"grid": [], "note": f"the methods' KL ranges do not overlap ({lo:.2f}, {hi:.2f})"}
    grid = np.geomspace(lo, hi, 40)
    env = {n: envelope(np.array([p["kl"] for p in by[n]]), np.array([p["gold"] for p in by[n]]),
                       grid) for n in names}
    stack = np.stack([env[n] for n in names])
    best = np.argmax(stack, axis=0)
    return {"grid": grid.tolist(), "envelopes": {n: env[n].tolist() for n in names},
            "best_share": {n: float(np.mean(best == i)) for i, n in enumerate(names)},
            "mean_gold": {n: float(np.mean(env[n])) for n in names},
            "kl_range": [float(lo), float(hi)]}


def run(config) -> dict:
    t0 = time.perf_counter()
    out = Path(config.workdir)
    out.mkdir(parents=True, exist_ok=True)
    names = [m.name for m in methods(config)]
    st = lib.FigureStages(config)
    sft_dir = st.sft()
    (rm_dir,) = st.rms([{}])  # the main world's RM (config.rm as it is)
    trained = train(config, st, sft_dir, rm_dir)
    results = lib.compare_policies(config.eval, {n: Path(t["dir"]) for n, t in trained.items()},
                                   sft_dir, rm_dir, config.seed)
    points = []
    for name, r in results.items():
        info = trained.get(name, {"method": "sft", "knob": "", "value": 0.0, "dir": str(sft_dir)})
        points.append({"policy": name, **info, "kl": r["kl"], "gold": r["gold"],
                       "gold_sem": r["gold_sem"], "rm_score": r["rm_score"],
                       "win_rate_vs_sft": r["win_rate_vs_sft"], "eos_rate": r["eos_rate"],
                       "response_length": r["response_length"]})
    bon = next((m for m in methods(config) if not m.trains), None)
    if bon is not None:
        samples = lib.bon_samples(sft_dir, {"rm": rm_dir},
                                  lib.held_out_prompts(config, int(config.eval.num_prompts)),
                                  int(config[bon.block].n), config[bon.block], (config.gold,),
                                  rng.key(config.seed, rng.Purpose.BEST_OF_N_CURVES))
        for r in samples.curves("rm", config.gold, lib.powers_of_two(int(config[bon.block].n)),
                                int(config[bon.block].n_boot)):
            points.append({"policy": f"{bon.name} n={r['n']}", "method": bon.name, "knob": "n",
                           "value": float(r["n"]), "kl": r["kl_bon"], "gold": r["gold"],
                           "gold_sem": r["gold_se"], "rm_score": r["proxy"],
                           "kl_empirical": r["kl_empirical"]})
    gold_sft = next(p["gold"] for p in points if p["method"] == "sft")
    fits = {}
    for n in names:
        pts = [p for p in points if p["method"] in (n, "sft")]
        d = np.sqrt(np.maximum([p["kl"] for p in pts], 0.0))
        form = "rl" if registry.get(n).trains else "bon"  # best-of-n: d (α − βd)
        fits[n] = lib.fit_gao(form, d,
                              np.array([p["gold"] for p in pts]) - gold_sft).to_dict()
    dom = dominance(points, names)
    verdicts = [claim_verdict(dom, names)]
    if dom.get("best_share"):
        top = max(dom["best_share"], key=dom["best_share"].get)
        verdicts.append(lib.Verdict(
            "which frontier dominates (finding, no prior claim)", None,
            f"{top} is highest on {100 * dom['best_share'][top]:.0f}% of the common KL range "
            f"[{dom['kl_range'][0]:.2f}, {dom['kl_range'][1]:.2f}] nats; mean frontier gold " +
            ", ".join(f"{n} {g:+.3f}" for n, g in dom["mean_gold"].items())))
    png = plot(points, names, out / "frontier.png", config.gold)
    seconds = round(time.perf_counter() - t0, 1)
    lib.write_points(points, out / "frontier.csv")
    summary = {"gold": config.gold, "methods": names, "fits": fits, "dominance": dom,
               "verdicts": [v.to_dict() for v in verdicts], "seconds": seconds,
               "png": str(png)}
    lib.write_json(summary, out / "frontier.json")
    print("\n  policy              KL      gold")
    for p in sorted(points, key=lambda p: (p["method"], p["kl"])):
        print(f"  {p['policy']:<18} {p['kl']:6.2f}  {p['gold']:+.3f} ± {p['gold_sem']:.3f}")
    for n, f in fits.items():
        print(f"  fit {n}: α {f['alpha']:+.3f}  β {f['beta']:+.3f}  R² {f['r2']:.2f}")
    lib.print_verdicts(f"Rafailov et al. 2023 Fig. 2, frontier (gold: {config.gold}; "
                       f"{seconds:.0f} s):", verdicts)
    return summary


def claim_verdict(dom: dict, names: list[str]) -> lib.Verdict:
    if not {"ppo", "dpo"} <= set(names) or not dom.get("grid"):
        return lib.Verdict(CLAIM, None, dom.get("note", "needs both ppo and dpo"))
    pair = dominance_pair(dom, "dpo", "ppo")
    return lib.Verdict(CLAIM, pair["above_share"] > 0.5 and pair["mean_gap"] > 0,
                       f"DPO's frontier is above PPO's on {100 * pair['above_share']:.0f}% of "
                       f"the common KL range, by {pair['mean_gap']:+.3f} gold on average")


def dominance_pair(dom: dict, a: str, b: str) -> dict:
    ea, eb = np.array(dom["envelopes"][a]), np.array(dom["envelopes"][b])
    return {"above_share": float(np.mean(ea > eb)), "mean_gap": float(np.mean(ea - eb))}


def plot(points: list[dict], names: list[str], out: Path, gold: str) -> Path:
    fig, (ax,) = lib.figure(1, 5.8, 4.0)
    sft = next(p for p in points if p["method"] == "sft")
    for i, n in enumerate(names):
        pts = sorted((p for p in points if p["method"] == n), key=lambda p: p["kl"])
        kl = np.array([sft["kl"]] + [p["kl"] for p in pts])
        g = np.array([sft["gold"]] + [p["gold"] for p in pts])
        ax.errorbar(kl[1:], g[1:], yerr=[p["gold_sem"] for p in pts],
                    fmt="o" if registry.get(n).trains else "s", ms=4, capsize=2, color=f"C{i}",
                    label=n.upper())
        ax.plot(kl, np.maximum.accumulate(g), color=f"C{i}", lw=1, alpha=0.7)  # the frontier
    ax.plot([sft["kl"]], [sft["gold"]], "k*", ms=9, label="SFT")
    ax.set_xlabel("KL(π || π_SFT) per response [nats]")
    ax.set_ylabel(f"gold ({gold})")
    ax.set_title("Reward–KL frontiers (Rafailov et al. 2023, Fig. 2)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return lib.save_figure(fig, out)


DEFAULT_CONFIG = lib.ROOT / "configs" / "frontier.py"

if __name__ == "__main__":
    lib.main(run, DEFAULT_CONFIG)
