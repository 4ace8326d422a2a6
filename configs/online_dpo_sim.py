"""Online DPO (Guo et al. 2024) on the simulated world: two samples per prompt from the current
policy, the RM picks the chosen one, the DPO loss against the frozen SFT policy.

    python -m rlhf_jax.online_dpo --config=configs/online_dpo_sim.py \
        --config.init_from=runs/sft_sim --config.reward_from=runs/rm_sim
    python -m rlhf_jax.online_dpo --config=configs/online_dpo_sim.py:judge=gold   # gold labels
    python -m rlhf_jax.online_dpo --config=configs/online_dpo_sim.py:smoke        # two updates

Preset keys: smoke, steps, loss (sigmoid | ipo), judge (rm | gold), beta, world (a world
variant: with `failure_modes` the evaluations also judge by the `spec` and run the probes).

`train.batch_size` counts PROMPTS (= pairs) per update; each is sampled twice. Sampling settings
are PPO's (20 new tokens at T = 0.7): the RM's reference normalisation was fit at them.
"""

import ml_collections

from rlhf_jax import config_utils

ENTRY = "rlhf_jax.online_dpo"  # the program `python -m rlhf_jax.sweep` runs for each trial


def get_config(arg: str | None = None):
    preset = config_utils.parse_preset(arg)
    config_utils.check_preset_keys(
        preset, ("smoke", "steps", "loss", "judge", "beta", "world", "preset"), __file__)
    smoke = config_utils.is_smoke(preset)
    world = config_utils.world_preset(preset)

    c = config_utils.base_config()
    c.workdir = "runs/online_dpo_sim"
    c.init_from = ""  # SFT work dir: the initial policy and the frozen reference
    c.reward_from = ""  # RM work dir: the judge (judge="rm") and the proxy score of evaluations
    c.data = ml_collections.ConfigDict(dict(
        source=config_utils.sim_source(seed=0, num_train=64 if smoke else 8192,
                                       num_eval=16 if smoke else 256, world=world),
        max_prompt_len=8,  # world openings are 2-6 words (+ commas)
    ))
    c.rollout = ml_collections.ConfigDict(dict(
        max_new_tokens=20,  # as configs/ppo_sim.py (the RM's normalisation settings)
        temperature=0.7,  # log-probs are computed from logits / T
        eos_trick=True,  # responses with no EOS are scored no_eos_score
        no_eos_score=-1.0,
    ))
    c.online_dpo = ml_collections.ConfigDict(dict(
        loss=preset.get("loss", "sigmoid"),  # sigmoid (Rafailov et al. 2023) | ipo (Azar et al.)
        beta=float(preset.get("beta", 0.1)),
        judge=preset.get("judge", "rm"),  # rm | gold (config.eval.gold labels the pairs)
        epochs=2,  # passes over each update's pairs
        minibatches=2,  # optimizer steps per pass
    ))
    c.eval = config_utils.policy_eval_config(
        num_prompts=16 if smoke else 256, batch_size=16 if smoke else 128,
        judges=("vader", "vader_trap"), gold="vader")
    c.eval.temperature = c.rollout.get_ref("temperature")
    c.eval.max_new_tokens = c.rollout.get_ref("max_new_tokens")
    c.eval.max_prompt_len = c.data.get_ref("max_prompt_len")
    if world:
        config_utils.failure_mode_eval(c.eval, smoke)

    c.optim.lr = 1e-3 if smoke else 1e-4
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 0
    c.optim.b2 = 0.999
    c.optim.eps = 1e-5
    c.optim.grad_clip = 1.0
    # 100 updates x 32 pairs reach PPO's KL (~5 nats, gold 0.63 on the stage's eval prompts,
    # seed 0); at 200 the KL is ~29 nats (gold 0.90, responses longer and repetitive).
    c.train.steps = int(preset.get("steps", 2 if smoke else 100))
    c.train.batch_size = 8 if smoke else 32  # PROMPTS (pairs) per update
    c.train.log_every = 1
    c.train.eval_every = 0 if smoke else 50
    c.train.ckpt_every = 50
    c.lock()
    return c
