"""The main job: base model -> SFT -> RM -> PPO (and other methods) on the simulated world, then
each method vs SFT.

    python -m experiments.pipeline                                  # the default (~10 min, 2 CPUs)
    python -m experiments.pipeline --config.seed=1
    python -m experiments.pipeline --config=configs/pipeline_sim.py:tiny   # a test-sized run
    python -m experiments.pipeline --config.ppo.train.steps=300 --config.rm.loss.kind=pairwise
    python -m experiments.pipeline --config.methods=ppo,dpo,rloo,grpo,bon --config.bon.n=16

Each stage's own config sits under its name (`pretrain`, `sft`, `rm`, `ppo`, `dpo`, `kto`, the
critic-free `rloo`, `grpo`, `dr_grpo` from configs/pg_sim.py, `online_dpo` from
configs/online_dpo_sim.py) and takes the same
dotted overrides as when the stage runs alone; the pipeline sets their `workdir`, `init_from`,
`reward_from` and `seed`. Preset keys: model, tiny.
"""

import ml_collections

from rlhf_jax import config_utils
from configs import dpo_sim, kto_sim, online_dpo_sim, pg_sim, ppo_sim, pretrain_sim, rm_sim, sft_sim


def _unlocked(c):
    c = c.copy_and_resolve_references()
    c.unlock()
    return c


PG_METHODS = ("rloo", "grpo", "dr_grpo")
ON_POLICY = (*PG_METHODS, "online_dpo")  # sampled at PPO's settings


def get_config(arg: str | None = None):
    preset = config_utils.parse_preset(arg)
    config_utils.check_preset_keys(preset, ("model", "tiny", "preset"), __file__)
    tiny = bool(preset.get("tiny")) or preset.get("preset") == "tiny"
    model = preset.get("model", "sim-0.1m" if tiny else "sim-0.4m")

    c = ml_collections.ConfigDict()
    c.workdir = "runs/pipeline"
    c.seed = 0  # seeds SFT, RM and PPO; the base model is the world's cached pretrained one
    c.reuse = True  # reuse a stage's finished output when its config (and inputs) are unchanged
    c.pretrain = _unlocked(pretrain_sim.get_config(f"model={model}"))
    c.sft = _unlocked(sft_sim.get_config(f"model={model}"))
    c.rm = _unlocked(rm_sim.get_config())
    c.ppo = _unlocked(ppo_sim.get_config())
    c.dpo = _unlocked(dpo_sim.get_config())  # its data.source is the RM's (experiments.pipeline)
    c.kto = _unlocked(kto_sim.get_config())  # the same: the RM's comparisons, best / worst
    for name in PG_METHODS:  # critic-free policy gradients (rlhf_jax.pg)
        c[name] = _unlocked(pg_sim.get_config(f"method={name}"))
    c.online_dpo = _unlocked(online_dpo_sim.get_config())  # rlhf_jax.online_dpo
    for name in ON_POLICY:
        # Sampled like PPO: the RM's normalisation holds at these settings.
        c[name].rollout.temperature = c.ppo.rollout.get_ref("temperature")
        c[name].rollout.max_new_tokens = c.ppo.rollout.get_ref("max_new_tokens")
        c[name].eval.temperature = c.ppo.rollout.get_ref("temperature")
        c[name].eval.max_new_tokens = c.ppo.rollout.get_ref("max_new_tokens")
    # Methods trained from the same SFT policy and compared on the same held-out prompts.
    c.methods = "ppo"  # a comma list of rlhf_jax.registry.METHODS
    c.bon = ml_collections.ConfigDict(dict(n=16))  # best-of-n of the SFT policy, by the RM
    # The comparison: one sample per held-out prompt per method, at PPO's rollout settings.
    c.eval = config_utils.policy_eval_config(num_prompts=512, judges=("vader", "vader_trap"),
                                             gold="vader", batch_size=128)
    c.eval.prompts = config_utils.sim_source(seed=0, num_train=0, num_eval=512)
    c.eval.temperature = c.ppo.rollout.get_ref("temperature")
    c.eval.max_new_tokens = c.ppo.rollout.get_ref("max_new_tokens")
    c.eval.max_prompt_len = c.ppo.data.get_ref("max_prompt_len")
    # The RM's reference normalisation holds at the temperature and length PPO samples at
    # (Ziegler et al. 2019): tie them, so a sweep over one moves the other.
    c.rm.norm.temperature = c.ppo.rollout.get_ref("temperature")
    c.rm.norm.max_new_tokens = c.ppo.rollout.get_ref("max_new_tokens")
    # Budget for ~10 minutes on 2 CPU cores (measured; see README).
    c.pretrain.train.steps = 400
    c.sft.train.steps = 200
    c.ppo.train.steps = 100  # KL reaches its 4-nat target and gold plateaus within ~60 updates
    if tiny:
        # A test-sized run: every stage for a handful of steps; PPO long enough to move.
        c.pretrain.train.steps = 150
        c.pretrain.data.source.num_train = 4000
        c.pretrain.eval.num_prompts = 32
        c.sft.train.steps = 60
        c.sft.data.source.num_train = 2000
        c.sft.eval.num_prompts = 32
        c.sft.train.eval_every = 0
        # Below ~2k comparisons reward models sit near chance (Gao et al. 2022): two epochs of 4k.
        c.rm.data.source.num_train = 4000
        c.rm.train.epochs = 2.0
        c.rm.data.source.num_eval = 300
        c.rm.norm.num_samples = 256
        c.rm.eval.fresh_world_pairs = 200
        c.rm.eval.fresh_policy_pairs = 64
        c.rm.train.eval_every = 0
        c.ppo.train.steps = 40
        c.ppo.train.eval_every = 0
        c.ppo.eval.num_prompts = 64
        for name in ON_POLICY:
            c[name].train.steps = 40
            c[name].train.eval_every = 0
            c[name].eval.num_prompts = 64
        c.eval.num_prompts = 128
        c.eval.prompts.num_eval = 128
    c.lock()
    return c
