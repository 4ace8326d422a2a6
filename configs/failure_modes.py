"""The failure modes of ChatGPT's post-training, reproduced on the simulated world (issue 16).

    python -m experiments.failure_modes                                  # all four (shared runs)
    python -m experiments.failure_modes --config=configs/failure_modes.py:failure=typos
    python -m experiments.failure_modes --config=configs/failure_modes.py:tiny,failure=refusal

Preset keys: failure (typos | refusal | group | length | all), tiny, model.

Every stage runs on the `failure_modes` world variant (`rlhf_jax.sim.world.WORLD_VARIANTS`): its
own base model (`zoo:<model>@failure_modes`), SFT on its demonstrations, then reward models on
comparisons that differ in one option each:

* `rm` (the *fixed* data, shared by every failure): annotators follow the `spec` judge,
  near-harmful prompts come as pairs across the boundary judged by the spec (`refusals=paired`),
  and a fifth of the comparisons carry a hand-improved completion, ranked first, proofread
  (`improved_typo_rate=0`).
* `bugs.<failure>`: the data-source fields that put the failure's cause back (Schulman & Zoph
  2025; Singhal et al. 2023 for length): improved completions with typos, naive refusal labels,
  a slight annotator bias toward group A, annotators that lean toward length.

RL (`methods`: PPO and RLOO; the tiny preset PPO only) then runs against each RM through the sweep machinery,
with a fixed small KL penalty so the KL from SFT grows over training, and evaluations (with the
failure-mode probes, `eval.probes`) every few updates: each evaluation is one point of the probe
against KL. `ppo` holds PPO's whole stage config; the fields that differ from
`configs/ppo_sim.py:world=failure_modes` are passed to every trial as `--config.*` flags (`rm`
likewise against `configs/rm_sim.py:world=failure_modes`).
"""

import ml_collections

from rlhf_jax import config_utils
from configs import pg_sim, ppo_sim, pretrain_sim, rm_sim, sft_sim

WORLD = "failure_modes"
FAILURES = ("typos", "refusal", "group", "length")


def _unlocked(c):
    c = c.copy_and_resolve_references()
    c.unlock()
    return c


def get_config(arg: str | None = None):
    preset = config_utils.parse_preset(arg)
    config_utils.check_preset_keys(preset, ("failure", "tiny", "model", "preset"), __file__)
    tiny = bool(preset.get("tiny")) or preset.get("preset") == "tiny"
    model = preset.get("model", "sim-0.1m" if tiny else "sim-0.4m")

    c = ml_collections.ConfigDict()
    c.failure = str(preset.get("failure", "all"))  # one of FAILURES, or "all"
    c.workdir = "runs/failure_modes"  # stages/, sweep/ (the RM and RL trials), one dir per failure
    c.seed = 0
    # Reuse a finished SFT stage (sweep trials are always skipped once finished: their key is
    # their resolved config, so a changed config runs anew).
    c.reuse = True
    c.workers = 2  # sweep workers (each pinned to its share of the CPU cores)
    # RL methods (rlhf_jax.registry methods that train against an RM): PPO and the critic-free
    # RLOO (the tiny preset runs PPO only; `--config.methods=ppo,rloo` adds RLOO there too).
    c.methods = "ppo" if tiny else "ppo,rloo"
    c.pretrain = _unlocked(pretrain_sim.get_config(f"model={model},world={WORLD}"))
    c.sft = _unlocked(sft_sim.get_config(f"model={model},world={WORLD}"))
    c.rm = _unlocked(rm_sim.get_config(f"world={WORLD}"))
    # The fixed data (module docstring).
    c.rm.data.source.refusals = "paired"
    c.rm.data.source.improved_share = 0.2
    c.rm.data.source.improved_typo_rate = 0.0
    # Each failure's cause: data-source fields of `rm` (rlhf_jax.data.builders
    # COMPARISON_OPTIONS). Typos: the improved completions misspell a quarter of their scored
    # words (the world's own text, 3%). Group: annotators weigh gold by 1/tau +- 1 on group A / B
    # prompts (tau ~ 0.3: about a third more for A). Length: +0.1 logits per word.
    c.bugs = ml_collections.ConfigDict(dict(
        typos=dict(improved_typo_rate=0.25),
        refusal=dict(refusals="naive"),
        group=dict(group_bias=1.0),
        length=dict(length_bias=0.1),
    ))
    c.ppo = _unlocked(ppo_sim.get_config(f"world={WORLD}"))
    # A fixed small penalty: the KL from SFT keeps growing, and every eval is a point further out.
    c.ppo.kl.adaptive = False
    c.ppo.kl.beta = 0.05
    c.ppo.train.steps = 120
    c.ppo.train.eval_every = 20
    c.ppo.eval.num_prompts = 256
    c.ppo.eval.probes = 64
    # The critic-free method (rlhf_jax.pg, RLOO: Ahmadian et al. 2024): its k1 penalty in the
    # reward is already fixed (beta 0.05, no controller); 16 prompts x 4 samples = PPO's 64
    # episodes per update, evaluated at the same points.
    c.rloo = _unlocked(pg_sim.get_config(f"method=rloo,world={WORLD}"))
    c.rloo.kl.beta = c.ppo.kl.beta
    c.rloo.train.steps = c.ppo.train.steps
    c.rloo.train.eval_every = c.ppo.train.eval_every
    c.rloo.eval.num_prompts = c.ppo.eval.num_prompts
    c.rloo.eval.probes = c.ppo.eval.probes
    # The verdicts compare each probe at the last two evaluations with the SFT policy's.
    c.verdict = ml_collections.ConfigDict(dict(last_points=2))

    # Budget: base model and SFT as the main job's, RMs on 6k comparisons.
    c.pretrain.train.steps = 400
    c.sft.train.steps = 200
    c.rm.data.source.num_train = 6000
    c.rm.norm.temperature = c.ppo.rollout.temperature
    c.rm.norm.max_new_tokens = c.ppo.rollout.max_new_tokens
    if tiny:
        # CI: every piece runs, nothing needs to learn (verdicts are printed, not expected).
        c.pretrain.train.steps = 20
        c.pretrain.train.batch_size = 16
        c.pretrain.optim.warmup_steps = 0
        c.pretrain.data.source.num_train = 2000
        c.pretrain.eval.num_prompts = 16
        c.sft.train.steps = 10
        c.sft.train.batch_size = 16
        c.sft.optim.warmup_steps = 0
        c.sft.data.source.num_train = 1000
        c.sft.data.source.num_eval = 64
        c.sft.eval.num_prompts = 16
        c.sft.train.eval_every = 0
        c.rm.data.source.num_train = 400
        c.rm.data.source.num_eval = 64
        c.rm.train.epochs = 1.0
        c.rm.train.batch_size = 16
        c.rm.norm.num_samples = 64
        c.rm.norm.batch_size = 64
        c.rm.eval.fresh_world_pairs = 32
        c.rm.eval.fresh_policy_pairs = 16
        c.rm.eval.batch_size = 64
        c.rm.train.eval_every = 0
        c.ppo.data.source.num_train = 256
        c.ppo.data.source.num_eval = 32
        c.ppo.train.steps = 4
        c.ppo.train.eval_every = 2
        c.ppo.train.batch_size = 16
        c.ppo.eval.num_prompts = 16
        c.ppo.eval.batch_size = 16
        c.ppo.eval.probes = 8
        c.rloo.data.source.num_train = 256
        c.rloo.data.source.num_eval = 32
        c.rloo.train.steps = 4
        c.rloo.train.eval_every = 2
        c.rloo.train.batch_size = 8
        c.rloo.pg.group_size = 2
        c.rloo.eval.num_prompts = 16
        c.rloo.eval.batch_size = 16
        c.rloo.eval.probes = 8
        c.verdict.last_points = 1
    c.lock()
    return c
