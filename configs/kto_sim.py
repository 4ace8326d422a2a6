"""KTO on the simulated world: the SFT policy learns from desirable / undesirable examples.

    python -m rlhf_jax.kto --config=configs/kto_sim.py --config.init_from=runs/sft_sim
    python -m rlhf_jax.kto --config=configs/kto_sim.py:beta=0.2
    python -m rlhf_jax.kto --config=configs/kto_sim.py:candidates=policy   # labelled SFT samples
    python -m rlhf_jax.kto --config=configs/kto_sim.py:smoke               # two steps, for tests

Preset keys: smoke, beta, candidates (dataset | policy | mixed), reference (precompute |
on_the_fly), world (a world variant: with `failure_modes` the annotators follow the `spec` judge
and evaluations run its probes).

The examples come from the RM stage's comparisons (configs/rm_sim.py: K = 4 candidates per
prompt ranked by the simulated annotator pool against VADER): each ranking's best response is
desirable, its worst undesirable; the pipeline gives KTO exactly the RM's source. Binary-feedback
JSONL files instead: `--config.data.source="{'kind': 'feedback_jsonl', 'train': ('a.jsonl',),
'eval': ('b.jsonl',)}"` (rows `{"prompt", "completion", "label": true|false}`).
"""

import ml_collections

from rlhf_jax import config_utils

ENTRY = "rlhf_jax.kto"


def get_config(arg: str | None = None):
    preset = config_utils.parse_preset(arg)
    config_utils.check_preset_keys(
        preset, ("smoke", "beta", "candidates", "reference", "world", "preset"),
        __file__)
    smoke = config_utils.is_smoke(preset)
    world = config_utils.world_preset(preset)

    c = config_utils.base_config()
    c.workdir = "runs/kto_sim"
    c.init_from = "runs/sft_sim"  # the SFT policy: initial params and the frozen reference
    c.tokenizer = ""  # "" = the one recorded in init_from's metadata
    c.data = ml_collections.ConfigDict(dict(
        source=config_utils.sim_comparison_source(
            seed=0, num_train=64 if smoke else 10_000, num_eval=32 if smoke else 1000, k=4,
            judge="spec" if world else "vader", target_agreement=0.73, flip_prob=0.0,
            pool="default", num_buckets=4),
        candidates=preset.get("candidates", "dataset"),  # dataset | policy | mixed
        max_len=32,  # prompt + response + EOS (the world's 99th percentile is 30 tokens)
    ))
    # Sampling settings for candidates=policy / mixed (labelled SFT samples).
    c.policy_data = ml_collections.ConfigDict(dict(
        max_prompt_len=8, max_new_tokens=20, temperature=1.0, batch_size=16 if smoke else 512))
    c.kto = ml_collections.ConfigDict(dict(
        beta=float(preset.get("beta", 0.1)),
        # lambda_D, lambda_U: the paper keeps lambda_D n_D / (lambda_U n_U) in [1, 4/3]; the
        # comparisons give one desirable and one undesirable example each (n_D = n_U).
        desirable_weight=1.0,
        undesirable_weight=1.0,
        # precompute: reference log-probs once over the data; on_the_fly: every step.
        reference=preset.get("reference", "precompute"),
    ))
    # Held-out samples at PPO's sampling settings, KL from the SFT policy, and the held-out
    # examples' accuracy against the reference point.
    c.eval = config_utils.policy_eval_config(num_prompts=16 if smoke else 256,
                                             batch_size=16 if smoke else 128)
    c.data.source.world = world
    if world:
        config_utils.failure_mode_eval(c.eval, smoke)

    c.optim.lr = 1e-3 if smoke else 1e-4
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 0 if smoke else 20
    c.optim.end_lr_ratio = 0.1
    c.train.epochs = 0.0 if smoke else 1.0  # > 0: train.steps = epochs over the examples
    c.train.steps = 2
    c.train.batch_size = 8 if smoke else 64  # examples per step
    c.train.eval_every = 0 if smoke else 200
    c.train.ckpt_every = 200
    c.train.log_every = 1 if smoke else 20
    c.lock()
    return c
