"""The main job: base model -> SFT -> RM -> each method on the simulated world, then compared.

    python -m experiments.pipeline [--config=configs/pipeline_sim.py[:tiny]] [--config.seed=1]
    python -m experiments.pipeline --config.methods=ppo,dpo,rloo,grpo,bon

Each stage runs through its own module (`rlhf_jax.sft`, `rlhf_jax.rm`, `rlhf_jax.ppo`, ...) in a
work dir named by a hash of its config and of its inputs' hashes, under `<workdir>/stages/`; a
stage whose output is already there is reused, an interrupted one resumes from its checkpoint.
The base model comes from the world's model zoo cache (`rlhf_jax.zoo`). Every method starts from
the same SFT policy; RM and DPO train on the same comparisons.

Writes `<workdir>/summary.json` (per method: gold ± SEM, proxy score, KL from SFT, gold win rate
vs SFT, on the same held-out prompts), `<workdir>/gold_vs_kl.png` (one point per method) and,
for PPO, `<workdir>/gold_proxy_vs_kl.png` (gold and proxy over its training), then prints a table.
"""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

from experiments import lib
from rlhf_jax import zoo
from rlhf_jax.errors import UserError
from rlhf_jax.trainer import Placement


# name -> (stage module, its config field, whether it trains against the RM). Best-of-n trains
# nothing: it is a policy made of the SFT policy and the RM at comparison time.
METHODS = {"ppo": ("rlhf_jax.ppo", "ppo", True), "dpo": ("rlhf_jax.dpo", "dpo", False),
           "rloo": ("rlhf_jax.pg", "rloo", True), "grpo": ("rlhf_jax.pg", "grpo", True),
           "dr_grpo": ("rlhf_jax.pg", "dr_grpo", True), "bon": (None, "bon", True)}
METHODS["online_dpo"] = ("rlhf_jax.online_dpo", "online_dpo", True)


def method_names(config) -> list[str]:
    names = [m.strip() for m in str(config.methods).split(",") if m.strip()]
    for m in names:
        if m not in METHODS:
            raise UserError("config.methods", f"{m!r} is not a method",
                            f"use a comma list of {sorted(METHODS)}")
    if not names:
        raise UserError("config.methods", "is empty", "e.g. --config.methods=ppo,dpo")
    return names


_child = lib.child_config


def validate(config) -> None:
    """Every stage's config, before the first stage starts (a typo in the last stage's config
    should not cost the minutes of the stages before it)."""
    import jax

    from rlhf_jax import config_utils, rm

    stages = {"sft": config.sft, "rm": config.rm}
    for name in method_names(config):
        module, field, _ = METHODS[name]
        if module is not None:
            stages[name] = config[field]
    for name, stage_cfg in stages.items():
        cfg = _child(stage_cfg, init_from="<sft>", reward_from="<rm>") \
            if "reward_from" in stage_cfg else _child(stage_cfg, init_from="<sft>")
        if cfg.train.get("epochs", 0) > 0:  # steps come from the data: any count >= warmup
            config_utils.set_dotted(cfg, "train.steps", max(cfg.train.steps,
                                                            cfg.optim.warmup_steps, 1))
        config_utils.validate(cfg, jax.device_count())
        module = rm if name == "rm" else (importlib.import_module(METHODS[name][0])
                                          if name in METHODS else None)
        if module is not None and hasattr(module, "validate_config"):
            module.validate_config(cfg)


def base_stages(config) -> tuple[dict[str, Path], object]:
    """Run (or reuse) the base model, SFT and RM stages every method starts from; returns their
    work dirs and the RM stage's config (DPO trains on its comparisons)."""
    from rlhf_jax import rm, sft

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
    names = method_names(config)
    dirs, rm_cfg = base_stages(config)
    for name in names:
        module, field, needs_rm = METHODS[name]
        if module is None:
            continue
        module = importlib.import_module(module)
        fields = dict(init_from=str(dirs["sft"]), seed=seed)
        if needs_rm:
            fields["reward_from"] = str(dirs["rm"])
        cfg = _child(config[field], **fields)
        if name == "dpo":  # DPO learns from exactly the comparisons the RM learned from
            with cfg.unlocked():
                cfg.data.source = rm_cfg.data.source
                cfg.data.candidates = rm_cfg.data.candidates
        dirs[name] = lib.run_stage(name, module, cfg,
                                   stages / f"{name}-{lib.stage_key(cfg)}", reuse)
    return dirs


def run(config) -> dict:
    t0 = time.perf_counter()
    root = Path(config.workdir)
    root.mkdir(parents=True, exist_ok=True)
    names = method_names(config)
    validate(config)
    dirs = run_stages(config)
    t_stages = time.perf_counter() - t0
    policies = {n: (lib.BestOfN(int(config.bon.n)) if n == "bon" else dirs[n]) for n in names}
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
