"""DPO on the simulated world: the SFT policy learns from the annotators' rankings directly.

    python -m rlhf_jax.dpo --config=configs/dpo_sim.py --config.init_from=runs/sft_sim
    python -m rlhf_jax.dpo --config=configs/dpo_sim.py:loss=ipo,beta=0.5
    python -m rlhf_jax.dpo --config=configs/dpo_sim.py:candidates=policy   # on-policy pairs
    python -m rlhf_jax.dpo --config=configs/dpo_sim.py:smoke               # two steps, for tests

Preset keys: smoke, loss (sigmoid | ipo), beta, candidates (dataset | policy | mixed),
pairs (all_pairs | best_vs_rest), reference (precompute | on_the_fly), world (a world variant:
with `failure_modes` the annotators follow the `spec` judge and evaluations run its probes).

The comparisons are the RM stage's (configs/rm_sim.py: K = 4 candidates per prompt ranked by
the simulated annotator pool against VADER); the pipeline gives DPO exactly the RM's source.
"""

import ml_collections

from rlhf_jax import config_utils

ENTRY = "rlhf_jax.dpo"


def get_config(arg: str | None = None):
    preset = config_utils.parse_preset(arg)
    config_utils.check_preset_keys(
        preset, ("smoke", "loss", "beta", "candidates", "pairs", "reference", "world", "preset"),
        __file__)
    smoke = config_utils.is_smoke(preset)
    world = config_utils.world_preset(preset)

    c = config_utils.base_config()
    c.workdir = "runs/dpo_sim"
    c.init_from = "runs/sft_sim"  # the SFT policy: initial params and the frozen reference
    c.tokenizer = ""  # "" = the one recorded in init_from's metadata
    c.data = ml_collections.ConfigDict(dict(
        source=config_utils.sim_comparison_source(
            seed=0, num_train=64 if smoke else 10_000, num_eval=32 if smoke else 1000, k=4,
            judge="spec" if world else "vader", target_agreement=0.73, flip_prob=0.0,
            pool="default", num_buckets=4),
        candidates=preset.get("candidates", "dataset"),  # dataset | policy | mixed
        # K-wise rankings -> pairs: every pair with different ranks, or the best vs the rest.
        # best_vs_rest: K - 1 pairs per ranking; at half the steps of all_pairs it reached the
        # same gold (README, DPO).
        pairs=preset.get("pairs", "best_vs_rest"),
        max_len=32,  # prompt + response + EOS (the world's 99th percentile is 30 tokens)
    ))
    # Sampling settings for candidates=policy / mixed (on-policy pairs).
    c.policy_data = ml_collections.ConfigDict(dict(
        max_prompt_len=8, max_new_tokens=20, temperature=1.0, batch_size=16 if smoke else 512))
    c.dpo = ml_collections.ConfigDict(dict(
        loss=preset.get("loss", "sigmoid"),  # sigmoid (Rafailov et al. 2023) | ipo (Azar et al.)
        beta=float(preset.get("beta", 0.1)),
        label_smoothing=0.0,  # conservative DPO's epsilon (sigmoid loss only)
        # precompute: reference log-probs once over the data; on_the_fly: every step.
        reference=preset.get("reference", "precompute"),
    ))
    # Held-out samples at PPO's sampling settings, KL from the SFT policy, and the pairs'
    # implicit-reward accuracy.
    c.eval = config_utils.policy_eval_config(num_prompts=16 if smoke else 256,
                                             batch_size=16 if smoke else 128)
    c.data.source.world = world
    if world:
        config_utils.failure_mode_eval(c.eval, smoke)

    c.optim.lr = 1e-3 if smoke else 1e-4
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 0 if smoke else 20
    c.optim.end_lr_ratio = 0.1
    c.train.epochs = 0.0 if smoke else 1.0  # > 0: train.steps = epochs over the pairs
    c.train.steps = 2
    c.train.batch_size = 8 if smoke else 64  # pairs per step
    c.train.eval_every = 0 if smoke else 200
    c.train.ckpt_every = 200
    c.train.log_every = 1 if smoke else 20
    c.lock()
    return c
