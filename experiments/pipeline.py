"""The main job: base model -> SFT -> RM -> each method on the simulated world, then compared.

    python -m experiments.pipeline [--config=configs/pipeline_sim.py[:tiny]] [--config.seed=1]
    python -m experiments.pipeline --config.methods=ppo,dpo,rloo,grpo,bon

Each stage runs through its own module (`rlhf_jax.sft`, `rlhf_jax.rm`, `rlhf_jax.ppo`, ...) in a
work dir named by a hash of its config and of its inputs' hashes, under `<workdir>/stages/`; a
stage whose output is already there is reused, an interrupted one resumes from its checkpoint.
The base model comes from the world's model zoo cache (`rlhf_jax.zoo`). Every method starts from
the same SFT policy; the RM and the methods that learn from comparisons (DPO, KTO:
`data_from="rm"` in `rlhf_jax.registry`) train on the same comparisons.

Writes `<workdir>/summary.json` (per method: gold ± SEM, proxy score, KL from SFT, gold win rate
vs SFT, on the same held-out prompts), `<workdir>/gold_vs_kl.png` (one point per method) and,
for PPO, `<workdir>/gold_proxy_vs_kl.png` (gold and proxy over its training), then prints a table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from experiments import lib
from rlhf_jax import registry, validation, zoo
from rlhf_jax.trainer import Placement


def methods(config) -> list[registry.Method]:
    """The entries of `config.methods` (only methods whose block the config holds)."""
    return registry.parse(config.methods, among=[n for n in registry.METHODS if n in config])


_child = lib.child_config


def validate(config) -> None:
    """Every stage's config, before the first stage starts (a typo in the last stage's config
    should not cost the minutes of the stages before it)."""
    import jax

    from rlhf_jax import config_utils

    entries = [registry.STAGES["sft"], registry.STAGES["rm"], *methods(config)]
    for m in entries:
        if not m.trains:
            continue
        cfg = m.stage_config(config[m.block], sft="<sft>", rm="<rm>")
        if cfg.train.get("epochs", 0) > 0:  # steps come from the data: any count >= warmup
            config_utils.set_dotted(cfg, "train.steps", max(cfg.train.steps,
                                                            cfg.optim.warmup_steps, 1))
        config_utils.validate(cfg, jax.device_count())
        module = registry.load(m)
        if hasattr(module, "validate_config"):
            module.validate_config(cfg)
    # What only matters at the end (best-of-n sizes, the comparison's prompt count), checked now.
    validation.check_comparison(config, [m.name for m in methods(config)])


def base_stages(config) -> tuple[dict[str, Path], object]:
    """Run (or reuse) the base model, SFT and RM stages every method starts from; returns their
    work dirs and the RM stage's config (methods with `data_from="rm"` learn from its
    comparisons)."""
    sft, rm = registry.load("sft"), registry.load("rm")
    stages, reuse, seed = Path(config.workdir) / "stages", config.reuse, config.seed
    t0 = time.perf_counter()
    base = zoo.ensure_pretrained(config.pretrain)
    print(f"[pipeline] base model: {base} ({time.perf_counter() - t0:.0f} s)", flush=True)
    sft_cfg = _child(config.sft, init_from=str(base), seed=seed)
    dirs = {"base": base}
    dirs["sft"] = lib.run_stage("sft", sft, sft_cfg, stages / f"sft-{lib.stage_key(sft_cfg)}",
                                reuse)
    rm_cfg = _child(config.rm, init_from=str(dirs["sft"]), seed=seed)
    dirs["rm"] = lib.run_stage("rm", rm, rm_cfg, stages / f"rm-{lib.stage_key(rm_cfg)}", reuse)
    return dirs, rm_cfg


def run_stages(config) -> dict[str, Path]:
    """Run (or reuse) every stage; returns their work dirs."""
    stages, reuse, seed = Path(config.workdir) / "stages", config.reuse, config.seed
    entries = methods(config)
    dirs, rm_cfg = base_stages(config)
    for m in entries:
        if not m.trains:
            continue
        cfg = m.stage_config(config[m.block], sft=dirs["sft"], rm=dirs["rm"],
                             rm_config=rm_cfg, seed=seed)
        dirs[m.name] = lib.run_stage(m.name, registry.load(m), cfg,
                                     stages / f"{m.name}-{lib.stage_key(cfg)}", reuse)
    return dirs


def run(config) -> dict:
    t0 = time.perf_counter()
    names = [m.name for m in methods(config)]
    validate(config)  # before anything is written: a refused run leaves no work dir
    root = Path(config.workdir)
    root.mkdir(parents=True, exist_ok=True)
    dirs = run_stages(config)
    t_stages = time.perf_counter() - t0
    policies = {m.name: (dirs[m.name] if m.trains else lib.BestOfN(int(config[m.block].n)))
                for m in methods(config)}
    # The comparison runs on the SFT stage's mesh.
    results = lib.compare_policies(config.eval, policies, dirs["sft"], dirs["rm"], config.seed,
                                   Placement(config.sft))
    samples = {k: r.pop("_samples") for k, r in results.items()}
    plot = lib.plot_gold_vs_kl(results, root / "gold_vs_kl.png", config.eval.gold)
    training = lib.plot_training(dirs["ppo"], root / "gold_proxy_vs_kl.png") \
        if "ppo" in dirs else None
    summary = {
        **results,
        "methods": names, "num_prompts": int(config.eval.num_prompts), "judge": config.eval.gold,
        "stage_dirs": {k: str(v) for k, v in dirs.items()},
        "plots": {"gold_vs_kl": str(plot), "training": str(training) if training else None},
        "seconds": {"stages": round(t_stages, 1), "total": round(time.perf_counter() - t0, 1)},
        "seed": config.seed,
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    (root / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    _print_table(summary, samples, root)
    return summary


def _print_table(summary: dict, samples: dict, root: Path) -> None:
    print(f"\n  method     gold ({summary['judge']})     proxy (RM)   KL from SFT   "
          "win rate vs SFT   EOS rate")
    for name in ["sft", *summary["methods"]]:
        r = summary[name]
        print(f"  {name.upper():<8}  {r['gold']:+.3f} ± {r['gold_sem']:.3f}   {r['rm_score']:+8.3f}"
              f"   {r['kl']:10.2f}   {r['win_rate_vs_sft']:14.1%}   {r['eos_rate']:8.2f}")
    print(f"\n  {summary['num_prompts']} held-out prompts; "
          f"time: {summary['seconds']['total']:.0f} s")
    for name in ["sft", *summary["methods"]]:
        print(f"\n  {name.upper()} samples:")
        for p, r, g in samples[name][:3]:
            print(f"    [{g:+.2f}] {p} | {r}")
    print(f"\n  summary: {root / 'summary.json'}\n  plot:    {summary['plots']['gold_vs_kl']}\n")


DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pipeline_sim.py"


if __name__ == "__main__":
    import sys

    from rlhf_jax import config_utils

    if not any(a == "--config" or a.startswith("--config=") for a in sys.argv[1:]):
        sys.argv.insert(1, f"--config={DEFAULT_CONFIG}")
    config_utils.run_with_config(run)
