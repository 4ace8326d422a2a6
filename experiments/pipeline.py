"""The main job: base model → SFT → RM → PPO on the simulated world, then PPO vs SFT.

    python -m experiments.pipeline [--config=configs/pipeline_sim.py[:tiny]] [--config.seed=1]

Each stage runs through its own module (`rlhf_jax.sft`, `rlhf_jax.rm`, `rlhf_jax.ppo`) in a work
dir named by a hash of its config and of its inputs' hashes, under `<workdir>/stages/`; a stage
whose output is already there is reused, an interrupted one resumes from its checkpoint. The
base model comes from the world's model zoo cache (`rlhf_jax.sim.zoo`).

Writes `<workdir>/summary.json` — for the SFT and the PPO policy: mean gold score, mean proxy
(RM) score, KL from SFT; PPO's gold win rate against SFT on the same prompts — and
`<workdir>/gold_proxy_vs_kl.png` (gold and proxy score against KL over PPO training), then prints
a short table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import jax
import numpy as np

log = logging.getLogger(__name__)


def _key(config, *upstream: str) -> str:
    d = config.to_dict()
    d.pop("workdir", None)
    blob = json.dumps([d, upstream], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _run_stage(name: str, module, config, workdir: Path, reuse: bool) -> Path:
    from rlhf_jax import checkpoint

    if reuse and checkpoint.stage_is_complete(workdir):
        print(f"[pipeline] {name}: reusing {workdir}", flush=True)
        return workdir
    print(f"[pipeline] {name}: running in {workdir}", flush=True)
    with config.unlocked():
        config.workdir = str(workdir)
    config.lock()
    t0 = time.perf_counter()
    module.run(config)
    print(f"[pipeline] {name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    return workdir


def run_stages(config) -> dict[str, Path]:
    """Run (or reuse) every stage; returns their work dirs."""
    from rlhf_jax import ppo, rm, sft
    from rlhf_jax.sim import zoo

    root = Path(config.workdir)
    stages = root / "stages"
    t0 = time.perf_counter()
    base = zoo.ensure_pretrained(config.pretrain)
    print(f"[pipeline] base model: {base} ({time.perf_counter() - t0:.0f} s)", flush=True)

    sft_cfg = config.sft.copy_and_resolve_references()
    with sft_cfg.unlocked():
        sft_cfg.init_from, sft_cfg.seed = str(base), config.seed
    sft_dir = _run_stage("sft", sft, sft_cfg, stages / f"sft-{_key(sft_cfg)}", config.reuse)

    rm_cfg = config.rm.copy_and_resolve_references()
    with rm_cfg.unlocked():
        rm_cfg.init_from, rm_cfg.seed = str(sft_dir), config.seed
    rm_dir = _run_stage("rm", rm, rm_cfg, stages / f"rm-{_key(rm_cfg)}", config.reuse)

    ppo_cfg = config.ppo.copy_and_resolve_references()
    with ppo_cfg.unlocked():
        ppo_cfg.init_from, ppo_cfg.reward_from, ppo_cfg.seed = str(sft_dir), str(rm_dir), config.seed
    ppo_dir = _run_stage("ppo", ppo, ppo_cfg, stages / f"ppo-{_key(ppo_cfg)}", config.reuse)
    return {"base": base, "sft": sft_dir, "rm": rm_dir, "ppo": ppo_dir}


def compare_policies(config, dirs: dict[str, Path]) -> dict:
    """SFT vs PPO on the same held-out prompts: gold, proxy, KL from SFT, gold win rate."""
    from transformers import AutoTokenizer

    from rlhf_jax import checkpoint, models, rewards
    from rlhf_jax.data import builders
    from rlhf_jax.evaluation import sample_texts, sequence_kl
    from rlhf_jax.sim.judges import get_judge

    sft_params, sft_meta = checkpoint.load_stage_params(dirs["sft"])
    policy_cfg = models.ModelConfig.from_dict(sft_meta["model_config"])
    ppo_params, _ = checkpoint.load_stage_params(dirs["ppo"])  # PPO hands off the policy
    rm_params, rm_meta = checkpoint.load_stage_params(dirs["rm"])
    rm_cfg = models.ModelConfig.from_dict(rm_meta["model_config"])
    norm = rm_meta.get("reward_norm")
    tokenizer = AutoTokenizer.from_pretrained(sft_meta["tokenizer_dir"])

    pc = config.ppo
    prompts, _ = builders.load_prompts(pc.data.source, "eval")
    prompts = (prompts * (config.eval.num_prompts // max(len(prompts), 1) + 1))[: config.eval.num_prompts]
    temperature = float(pc.rollout.temperature)
    rng = jax.random.fold_in(jax.random.key(config.seed), 1234)
    gold_judge = get_judge(config.eval.judge)
    results, per_sample = {}, {}
    for i, (name, params) in enumerate((("sft", sft_params), ("ppo", ppo_params))):
        s = sample_texts(policy_cfg, params, tokenizer, prompts, jax.random.fold_in(rng, i),
                         max_prompt_len=pc.data.max_prompt_len,
                         max_new_tokens=pc.rollout.max_new_tokens, temperature=temperature,
                         batch_size=config.eval.batch_size)
        seq_tokens = np.concatenate([s["prompt_tokens"], s["tokens"]], axis=1)
        seq_mask = np.concatenate([s["prompt_mask"], s["mask"]], axis=1)
        proxy = rewards.score_batches(rm_cfg, rm_params, seq_tokens, seq_mask, norm,
                                 batch_size=config.eval.batch_size)
        gold = np.asarray(gold_judge.score(prompts, s["responses"]), np.float64)
        # Sequence KL(policy || SFT), k1 on the policy's own samples (unbiased), with both
        # policies' log-probs at the sampling temperature, as PPO's KL penalty sees them.
        kl = sequence_kl(policy_cfg, params, sft_params, seq_tokens, seq_mask,
                             s["prompt_tokens"].shape[1], temperature,
                             batch_size=config.eval.batch_size)
        per_sample[name] = gold
        results[name] = {
            "gold_mean": float(gold.mean()), "gold_sem": float(gold.std() / np.sqrt(len(gold))),
            "proxy_mean": float(proxy.mean()), "kl_from_sft": float(kl.mean()),
            "eos_rate": float(np.mean(s["ended"])), "response_length": float(np.mean(s["lengths"])),
        }
        results[name]["_samples"] = list(zip(prompts[:6], s["responses"][:6], gold[:6]))
    wins = per_sample["ppo"] > per_sample["sft"]
    ties = per_sample["ppo"] == per_sample["sft"]
    results["ppo_win_rate_vs_sft"] = float(np.mean(wins) + 0.5 * np.mean(ties))
    results["num_prompts"] = len(prompts)
    results["judge"] = config.eval.judge
    return results


def plot_training(ppo_dir: Path, out: Path) -> Path | None:
    """Gold and proxy score against KL over PPO training, from the PPO run's metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (ppo_dir / "metrics.jsonl").read_text().splitlines() if line]
    rows = [r for r in rows if "kl" in r and "rm_score" in r]
    if not rows:
        return None
    kl = np.array([r["kl"] for r in rows])
    steps = np.array([r.get("step", i) for i, r in enumerate(rows)])
    fig, ax = plt.subplots(figsize=(6, 4))
    # KL does not grow monotonically, so points (shaded by update) read better than a line.
    series = [("rm_score", "proxy (RM) score", "Blues", "o")]
    if "gold" in rows[0]:
        series.append(("gold", "gold score (VADER)", "Oranges", "s"))
    for key, label, cmap, marker in series:
        ax.scatter(kl, [r[key] for r in rows], c=steps, cmap=cmap, vmin=-0.3 * steps.max(),
                   marker=marker, s=14, label=label)
    ax.set_xlabel("KL(π || π_SFT) per episode [nats]")
    ax.set_ylabel("mean score of rollouts")
    ax.set_title("PPO on the simulated world (darker = later update)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def run(config) -> dict:
    t0 = time.perf_counter()
    root = Path(config.workdir)
    root.mkdir(parents=True, exist_ok=True)
    dirs = run_stages(config)
    t_stages = time.perf_counter() - t0
    results = compare_policies(config, dirs)
    plot = plot_training(dirs["ppo"], root / "gold_proxy_vs_kl.png")
    samples = {k: results[k].pop("_samples") for k in ("sft", "ppo")}
    summary = {
        **results,
        "stage_dirs": {k: str(v) for k, v in dirs.items()},
        "plot": str(plot) if plot else None,
        "seconds": {"stages": round(t_stages, 1), "total": round(time.perf_counter() - t0, 1)},
        "seed": config.seed,
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    (root / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    _print_table(summary, samples, root)
    return summary


def _print_table(summary: dict, samples: dict, root: Path) -> None:
    print("\n              gold (VADER)   proxy (RM)   KL from SFT   EOS rate")
    for name in ("sft", "ppo"):
        r = summary[name]
        print(f"  {name.upper():<10}  {r['gold_mean']:+.3f}±{r['gold_sem']:.3f}   {r['proxy_mean']:+8.3f}"
              f"   {r['kl_from_sft']:10.2f}   {r['eos_rate']:8.2f}")
    print(f"\n  PPO gold win rate vs SFT: {summary['ppo_win_rate_vs_sft']:.1%} "
          f"({summary['num_prompts']} prompts)   time: {summary['seconds']['total']:.0f} s")
    for name in ("sft", "ppo"):
        print(f"\n  {name.upper()} samples:")
        for p, r, g in samples[name][:3]:
            print(f"    [{g:+.2f}] {p} | {r}")
    print(f"\n  summary: {root / 'summary.json'}\n  plot:    {summary['plot']}\n")


DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pipeline_sim.py"


if __name__ == "__main__":
    import sys

    from rlhf_jax import config_utils

    if not any(a == "--config" or a.startswith("--config=") for a in sys.argv[1:]):
        sys.argv.insert(1, f"--config={DEFAULT_CONFIG}")
    config_utils.run_with_config(run)
