"""What every figure module's config shares (`configs/gao_bon.py`, `gao_rl.py`, ...).

Not a config file itself: `common(name, preset)` returns the shared part, unlocked, and each
figure's `get_config(arg)` adds its own fields and locks it. The stage blocks (`pretrain`,
`sft`, `rm`, `ppo`, `dpo`, `rloo`, `grpo`) are the main job's (`configs/pipeline_sim.py`), so a
figure's base
model and SFT policy are the pipeline's, and take the same dotted overrides
(`--config.rm.train.batch_size=64`). The figures share their stages in `stages_dir`: a proxy RM
or a PPO run that two figures need is trained once.

Preset keys every figure takes: `tiny` (CI-sized: every stage a few steps; numbers mean
nothing), `model` (the base-model preset of the SFT policy and the RMs).
"""

from __future__ import annotations

import ml_collections

from configs import pipeline_sim
from rlhf_jax import config_utils

PRESET_KEYS = ("tiny", "model", "preset")


def is_tiny(preset: dict) -> bool:
    return bool(preset.get("tiny")) or preset.get("preset") == "tiny"


def common(name: str, preset: dict) -> ml_collections.ConfigDict:
    tiny = is_tiny(preset)
    model = preset.get("model", "sim-0.1m" if tiny else "sim-0.4m")
    p = pipeline_sim.get_config(f"model={model}" + (",tiny=1" if tiny else ""))
    p = p.copy_and_resolve_references()
    p.unlock()

    c = ml_collections.ConfigDict()
    c.workdir = f"runs/experiments/{name}"  # the figure's PNG, CSV and JSON
    c.stages_dir = "runs/experiments/stages"  # SFT, RMs and method runs, shared by the figures
    c.seed = 0
    c.reuse = True  # reuse a finished SFT stage (trials are always reused when finished)
    # Sweep workers, each pinned to its share of the cores (rlhf_jax.sweep); 0 runs the trials
    # one after another in this process.
    c.workers = 0 if tiny else 2
    c.model = model
    c.tiny = tiny
    c.pretrain, c.sft, c.rm, c.ppo, c.dpo = p.pretrain, p.sft, p.rm, p.ppo, p.dpo
    c.rloo, c.grpo = p.rloo, p.grpo  # critic-free methods (configs/pg_sim.py), sampled as PPO
    # Held-out prompts every policy of a figure is compared on (one sample each), at PPO's
    # rollout settings.
    c.eval = p.eval
    if tiny:
        _shrink(c)
    return c


def _shrink(c) -> None:
    """CI sizes: seconds per stage. The pipeline's tiny preset, smaller still."""
    c.pretrain.train.steps = 30
    c.pretrain.data.source.num_train = 1500
    c.pretrain.data.source.num_eval = 256  # packed: ~2 texts per row, >= one batch of rows
    c.pretrain.eval.num_prompts = 16
    c.pretrain.train.eval_every = 0
    c.pretrain.optim.warmup_steps = 5
    c.sft.train.steps = 15
    c.sft.optim.warmup_steps = 5
    c.sft.data.source.num_train = 600
    c.sft.data.source.num_eval = 64
    c.sft.eval.num_prompts = 16
    c.rm.data.source.num_train = 400
    c.rm.data.source.num_eval = 64
    c.rm.train.epochs = 1.0
    c.rm.norm.num_samples = 64
    c.rm.eval.fresh_world_pairs = 32
    c.rm.eval.fresh_policy_pairs = 16
    c.rm.eval.batch_size = 64
    c.rm.policy_data.batch_size = 64
    c.ppo.train.steps = 6
    c.ppo.train.batch_size = 32  # 4 minibatches of 8 rows (divisible by up to 8 devices)
    c.ppo.train.eval_every = 3
    c.ppo.data.source.num_train = 256
    c.ppo.data.source.num_eval = 32
    c.ppo.eval.num_prompts = 16
    c.ppo.eval.batch_size = 16
    c.ppo.ptx.source.num_train = 256
    for name in ("rloo", "grpo"):
        c[name].train.steps = 6
        c[name].train.batch_size = 8  # prompts per update (x group_size 4 = PPO's 32 rows)
        c[name].train.eval_every = 0
        c[name].data.source.num_train = 256
        c[name].data.source.num_eval = 32
        c[name].eval.num_prompts = 16
        c[name].eval.batch_size = 16
    c.dpo.data.source.num_eval = 64
    c.dpo.eval.num_prompts = 16
    c.dpo.eval.batch_size = 16
    c.dpo.train.eval_every = 0
    c.eval.num_prompts = 32
    c.eval.prompts.num_eval = 32
    c.eval.batch_size = 32


def check_keys(preset: dict, extra: tuple[str, ...], config_file: str) -> None:
    config_utils.check_preset_keys(preset, PRESET_KEYS + extra, config_file)
