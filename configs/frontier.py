"""Gold reward against KL for each method over its strength knob (Rafailov et al. 2023, Fig. 2):
`experiments.frontier`.

    python -m experiments.frontier [--config=configs/frontier.py[:tiny]]
    python -m experiments.frontier --config.methods=ppo,dpo,bon --config.ppo_betas=0.02,0.1

Methods: ppo, dpo, rloo, grpo (critic-free, configs/pg_sim.py), bon. Every method starts
from the same SFT policy and learns from the same comparisons (PPO and the
critic-free methods through the RM trained on them, DPO directly); best-of-N picks by that RM
from the SFT policy's samples. Each trained policy samples the same held-out prompts at the
rollout temperature; KL is k1 from the SFT policy on its own samples, best-of-n's the analytic
log n - (n - 1)/n. Preset keys: tiny, model.
"""

from __future__ import annotations

import ml_collections

from configs import figures


def get_config(arg: str | None = None):
    from rlhf_jax import config_utils

    preset = config_utils.parse_preset(arg)
    figures.check_keys(preset, (), __file__)
    tiny = figures.is_tiny(preset)
    c = figures.common("frontier", preset)
    c.gold = c.eval.get("gold")  # the main world's gold (VADER), as in DPO's IMDb sentiment task
    c.methods = "ppo,dpo,rloo,grpo,bon"  # comma list of rlhf_jax.registry.METHODS
    # The knob each method is swept over (one trial per value).
    c.ppo_betas = "0.02,0.2" if tiny else "0.02,0.05,0.1,0.2,0.5"  # fixed KL coefficient
    c.dpo_betas = "0.1,1.0" if tiny else "0.03,0.1,0.3,1.0"  # DPO's beta
    # RLOO (k1 in the reward, like PPO) and GRPO (k3 in the loss): fixed KL coefficients.
    c.rloo_betas = "0.02" if tiny else "0.01,0.03,0.1,0.3"
    c.grpo_betas = "0.04" if tiny else "0.01,0.04,0.1,0.3"
    c.ppo.kl.adaptive = False
    c.ppo.train.steps = 6 if tiny else 100
    c.rloo.train.steps = 6 if tiny else 100
    c.grpo.train.steps = 6 if tiny else 100
    # DPO: one epoch over the RM's rankings as best-vs-rest pairs (3 per ranking of 4).
    c.dpo.data.pairs = "best_vs_rest"
    c.dpo.train.eval_every = 0
    c.bon = ml_collections.ConfigDict(dict(
        n=16 if tiny else 64, max_prompt_len=c.eval.get("max_prompt_len"),
        max_new_tokens=c.eval.get("max_new_tokens"), temperature=c.eval.get("temperature"),
        batch_size=256 if tiny else 512, n_boot=100 if tiny else 500))
    c.lock()
    return c
