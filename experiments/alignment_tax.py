"""The alignment tax and PPO-ptx (Ouyang et al. 2022, InstructGPT, Sec. 3.5 and Fig. 28-29).

    python -m experiments.alignment_tax [--config=configs/alignment_tax.py[:tiny]]

RLHF can lower a model's performance on the pretraining distribution (the "alignment tax");
InstructGPT's PPO-ptx mixes the pretraining next-token loss into PPO (coefficient γ) and reports
that it removes most of the regression at a similar preference score. Here: PPO runs over
`ptx_coefs` (sweep trials), each final policy's gold gain over the SFT policy (held-out
prompts, the PPO stage's own evaluation) against its tax, the rise of its LM loss on held-out
pretraining text over the SFT policy's (`evaluation.lm_loss`). Claim: a ptx run pays a smaller
tax than plain PPO (ptx = 0) with a similar gold gain — within two standard errors, or within
a fifth of plain PPO's gain.

Writes `<workdir>/alignment_tax.png`, `.csv` (one row per policy), `.json`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from experiments import lib

CLAIM = "PPO-ptx pays a smaller alignment tax than PPO at a similar gold gain"


def lm_losses(dirs: dict[str, str], config) -> dict[str, dict]:
    """Held-out pretraining LM loss of each policy (a stage work dir) on the same texts."""
    from rlhf_jax import evaluation, handoff
    from rlhf_jax.data import sources

    texts, _ = sources.from_config(config.tax.source, "config.tax.source").pretrain_texts("eval")
    out = {}
    for name, d in dirs.items():
        policy = handoff.load_policy(d)
        tokenizer, _ = handoff.tokenizer_for("", policy.meta)
        out[name] = evaluation.lm_loss(policy.cfg, policy.params, tokenizer, texts,
                                       seq_len=int(config.tax.seq_len),
                                       batch_size=int(config.tax.batch_size))
    return out


def verdict(points: list[dict]) -> lib.Verdict:
    plain = next(p for p in points if p["ptx_coef"] == 0.0)
    text = [f"ptx {p['ptx_coef']:g}: gold {p['gold_gain']:+.3f} ± {p['gold_sem']:.3f}, tax "
            f"{p['tax']:+.4f} nats/token" for p in points]
    similar = [p for p in points if p["ptx_coef"] > 0 and (
        abs(p["gold_gain"] - plain["gold_gain"]) <= max(
            2 * np.hypot(p["gold_sem"], plain["gold_sem"]), 0.2 * abs(plain["gold_gain"])))]
    lower = [p for p in similar if p["tax"] < plain["tax"]]
    held = bool(lower) if plain["tax"] > 0 else None
    note = "" if plain["tax"] > 0 else " (plain PPO paid no tax: nothing to lower)"
    return lib.Verdict(CLAIM, held, "; ".join(text) + f"; similar gold: "
                       f"{[p['ptx_coef'] for p in similar]}, of those with a lower tax: "
                       f"{[p['ptx_coef'] for p in lower]}" + note)


def plot(points: list[dict], out: Path) -> Path:
    fig, (ax,) = lib.figure(1, 5.4, 3.9)
    ax.errorbar([p["tax"] for p in points], [p["gold_gain"] for p in points],
                yerr=[p["gold_sem"] for p in points], fmt="o", capsize=3)
    for p in points:
        ax.annotate(f"ptx {p['ptx_coef']:g}", (p["tax"], p["gold_gain"]),
                    textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.axvline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("alignment tax: Δ LM loss on held-out pretraining text vs SFT [nats/token]")
    ax.set_ylabel("gold gain over SFT")
    ax.set_title("PPO-ptx: gold gain vs alignment tax (Ouyang et al. 2022)", fontsize=10)
    ax.grid(alpha=0.3)
    return lib.save_figure(fig, out)


def run(config) -> dict:
    t0 = time.perf_counter()
    out = Path(config.workdir)
    out.mkdir(parents=True, exist_ok=True)
    st = lib.FigureStages(config)
    sft_dir = st.sft()
    (rm_dir,) = st.rms([{}])  # the main world's RM (config.rm as it is)
    ppo_cfg = config.ppo.copy_and_resolve_references()
    with ppo_cfg.unlocked():
        ppo_cfg.init_from, ppo_cfg.reward_from = str(sft_dir), str(rm_dir)
        ppo_cfg.seed = int(config.seed)
    coefs = [float(x) for x in config.ptx_coefs]
    if 0.0 not in coefs:
        from rlhf_jax.errors import UserError

        raise UserError("config.ptx_coefs", f"{coefs} has no 0.0", "plain PPO is the baseline")
    runs = st.trials("ppo", ppo_cfg, "configs/ppo_sim.py", [{"ptx.coef": c} for c in coefs])
    losses = lm_losses({"sft": str(sft_dir), **{str(c): r["workdir"]
                                                  for c, r in zip(coefs, runs)}}, config)
    points = []
    for c, r in zip(coefs, runs):
        s = lib.trial_summary(r)
        points.append({
            "ptx_coef": c, "gold": s["ppo"]["gold"], "gold_sem": s["ppo"]["gold_sem"],
            "gold_gain": s["ppo"]["gold"] - s["sft"]["gold"], "kl": s["ppo"]["kl"],
            "rm_score": s["ppo"]["rm_score"], "lm_loss": losses[str(c)]["loss"],
            "lm_loss_sft": losses["sft"]["loss"],
            "tax": losses[str(c)]["loss"] - losses["sft"]["loss"],
            "tax_tokens": losses["sft"]["tokens"], "run": r["workdir"]})
    v = verdict(points)
    png = plot(points, out / "alignment_tax.png")
    seconds = round(time.perf_counter() - t0, 1)
    lib.write_points(points, out / "alignment_tax.csv")
    summary = {"beta": float(config.ppo.kl.beta), "updates": int(config.ppo.train.steps),
               "sft_lm_loss": losses["sft"], "points": points,
               "tax_per_gold_gain": {str(p["ptx_coef"]): p["tax"] / p["gold_gain"]
                                     if p["gold_gain"] else None for p in points},
               "verdicts": [v.to_dict()], "seconds": seconds, "png": str(png)}
    lib.write_json(summary, out / "alignment_tax.json")
    print(f"\n  SFT LM loss on held-out pretraining text: {losses['sft']['loss']:.4f} nats/token "
          f"({losses['sft']['tokens']} tokens)")
    print("  ptx coef   gold gain        KL     LM loss    tax")
    for p in points:
        print(f"  {p['ptx_coef']:>8g}   {p['gold_gain']:+.3f} ± {p['gold_sem']:.3f}  "
              f"{p['kl']:6.2f}   {p['lm_loss']:.4f}   {p['tax']:+.4f}")
    lib.print_verdicts(f"Ouyang et al. 2022, PPO-ptx ({seconds:.0f} s):", [v])
    return summary


DEFAULT_CONFIG = lib.ROOT / "configs" / "alignment_tax.py"

if __name__ == "__main__":
    lib.main(run, DEFAULT_CONFIG)
