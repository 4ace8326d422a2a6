"""Critic-free policy gradients (RLOO, GRPO, Dr. GRPO, REINFORCE) on the simulated world.

    python -m rlhf_jax.pg --config=configs/pg_sim.py:method=rloo \
        --config.init_from=runs/sft_sim --config.reward_from=runs/rm_sim
    python -m rlhf_jax.pg --config=configs/pg_sim.py:method=grpo,steps=60
    python -m rlhf_jax.pg --config=configs/pg_sim.py:smoke,method=dr_grpo   # two updates (tests)

Preset keys: method (rloo | grpo | dr_grpo | reinforce; default rloo; a bare `:grpo` works
too), steps, smoke (a bare first word: `:smoke,method=grpo`), world (a world variant: with
`failure_modes` the evaluations also judge by the `spec` and run the failure-mode probes).

`train.batch_size` counts PROMPTS per update; each prompt is sampled `pg.group_size` times, so
an update trains on batch_size x group_size episodes (16 x 4 = 64, PPO's 64 episodes per
update in configs/ppo_sim.py). Sampling settings are PPO's (20 new tokens at T = 0.7): the RM's
reference normalisation was fit at them.

Each method's loss follows its paper; what the papers leave open is set for this world:

| method    | advantage                  | KL to SFT               | aggregation          |
| rloo      | r - mean of the other K-1  | k1 in the reward        | token mean           |
| grpo      | (r - mean) / (std + eps)   | beta k3 in the loss     | seq mean of tok means|
| dr_grpo   | r - mean                   | none (beta = 0)         | constant (B x T_max) |
| reinforce | r - batch mean             | k1 in the reward        | token mean           |

RLOO: Ahmadian et al. 2024 (KL as a k1 penalty in the sequence reward). GRPO: Shao et al. 2024
(k3 in the loss, std normalisation, per-sequence token mean). Dr. GRPO: Liu et al. 2025 (no std,
constant normaliser, no KL term). Clip 0.2 / 0.2 for all; DAPO's clip-higher is
`--config.pg.clip_high=0.28` (Yu et al. 2025).

The KL coefficients are sized for this world, not taken from the papers' math/chat settings:
the RM score is normalised to std 1 over SFT samples and responses are <= 20 tokens, and the
gold score (VADER) keeps rising with the RM score up to a KL of ~4-5 nats (PPO's target in
configs/ppo_sim.py). See README "Critic-free methods" for the runs these defaults come from.
"""

import ml_collections

from rlhf_jax import config_utils

ENTRY = "rlhf_jax.pg"  # the program `python -m rlhf_jax.sweep` runs for each trial

# Each method's estimator, KL placement, aggregation and KL coefficient as its paper gives them
# (configs/pg_hf.py uses these as they are).
PAPER = {
    "rloo": dict(estimator="rloo", kl_mode="reward", beta=0.05, aggregation="token_mean"),
    "grpo": dict(estimator="grpo", kl_mode="loss", beta=0.04,
                 aggregation="seq_mean_token_mean"),
    "dr_grpo": dict(estimator="dr_grpo", kl_mode="loss", beta=0.0, aggregation="constant"),
    "reinforce": dict(estimator="reinforce", kl_mode="reward", beta=0.05,
                      aggregation="token_mean"),
}
# What this world changes (see the module docstring).
SIM = {}


def method_name(preset: dict) -> str:
    """`method=<name>`, or a bare `:<name>`; rloo by default."""
    bare = preset.get("preset")
    if bare is not None and bare not in PAPER and bare != "smoke":
        raise ValueError(f"{__file__}: {bare!r} is not a preset; use smoke or a method "
                         f"{tuple(PAPER)}, or method=<name>")
    return str(preset.get("method", bare if bare in PAPER else "rloo"))


def _method(name: str) -> dict:
    if name not in PAPER:
        raise ValueError(f"{__file__}: method {name!r} is not a method; use one of "
                         f"{tuple(PAPER)}")
    return {**PAPER[name], **SIM.get(name, {})}


def get_config(arg: str | None = None):
    preset = config_utils.parse_preset(arg)
    config_utils.check_preset_keys(preset, ("method", "steps", "smoke", "world", "preset"),
                                   __file__)
    smoke = config_utils.is_smoke(preset)
    world = config_utils.world_preset(preset)
    method = _method(method_name(preset))

    c = config_utils.base_config()
    c.workdir = f"runs/{method['estimator']}_sim"
    c.init_from = ""  # SFT work dir: the initial policy and the frozen reference
    c.reward_from = ""  # RM work dir (its metadata's reward_norm normalises the score)
    c.data = ml_collections.ConfigDict(dict(
        source=config_utils.sim_source(seed=0, num_train=64 if smoke else 8192,
                                       num_eval=16 if smoke else 256, world=world),
        max_prompt_len=8,  # world openings are 2-6 words (+ commas)
    ))
    c.rollout = ml_collections.ConfigDict(dict(
        max_new_tokens=20,  # as configs/ppo_sim.py (the RM's normalisation settings)
        temperature=0.7,  # log-probs are computed from logits / T
        eos_trick=True,  # responses with no EOS get no_eos_score instead of the RM's score
        no_eos_score=-1.0,
    ))
    c.pg = ml_collections.ConfigDict(dict(
        estimator=method["estimator"],  # rloo | grpo | dr_grpo | reinforce
        group_size=2 if smoke else 4,  # K samples per prompt (RLOO's k = 4, Ahmadian et al.)
        std_eps=1e-6,  # GRPO: A = (r - mean) / (std + eps)
        # token_mean | seq_mean_token_mean | constant: different gradients on ragged lengths
        # (rlhf_jax.pg.AGGREGATIONS).
        aggregation=method["aggregation"],
        loss_normalizer=0.0,  # "constant" only; 0 = episodes per minibatch x max_new_tokens
        clip_low=0.2,
        clip_high=0.2,  # DAPO's clip-higher: 0.28
        epochs=2,  # passes over each rollout batch
        minibatches=2,  # optimizer steps per pass
    ))
    c.kl = ml_collections.ConfigDict(dict(
        mode=method["kl_mode"],  # "reward": -beta * sum_t k1 in the sequence reward; "loss"
        loss_estimator="k3",  # used when mode == "loss" (GRPO; see the bias note in rlhf_jax.pg)
        beta=method["beta"],
    ))
    c.eval = config_utils.policy_eval_config(
        num_prompts=16 if smoke else 256, batch_size=16 if smoke else 128,
        judges=("vader", "vader_trap"),  # logged, never in the reward
        gold="vader")
    c.eval.temperature = c.rollout.get_ref("temperature")
    c.eval.max_new_tokens = c.rollout.get_ref("max_new_tokens")
    c.eval.max_prompt_len = c.data.get_ref("max_prompt_len")
    if world:
        config_utils.failure_mode_eval(c.eval, smoke)

    c.optim.lr = 1e-4
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 0
    c.optim.b2 = 0.999
    c.optim.eps = 1e-5
    c.optim.grad_clip = 1.0
    c.train.steps = int(preset.get("steps", 2 if smoke else 100))
    # PROMPTS per update (x group_size episodes); a multiple of the mesh's batch shards.
    c.train.batch_size = 8 if smoke else 16
    c.train.log_every = 1  # every update: the pipeline plots gold / proxy vs KL from these
    c.train.eval_every = 0 if smoke else 50
    c.train.ckpt_every = 50
    c.lock()
    return c
