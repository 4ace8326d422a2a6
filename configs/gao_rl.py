"""RL over-optimization (Gao, Schulman & Hilton 2022, Fig. 1b): `experiments.gao_rl`.

    python -m experiments.gao_rl [--config=configs/gao_rl.py[:tiny]] [--config.workers=2]

PPO from the SFT policy against each proxy RM of `experiments.gao_bon` (the same trials: the
same label counts and judge), with a small fixed KL penalty (no controller) and long enough for
the policy to run far from SFT; the gold and proxy of its held-out samples are measured every
`ppo.train.eval_every` updates. Preset keys: tiny, model.
"""

from __future__ import annotations

from configs import figures, gao_bon


def get_config(arg: str | None = None):
    from rlhf_jax import config_utils

    preset = config_utils.parse_preset(arg)
    figures.check_keys(preset, (), __file__)
    tiny = figures.is_tiny(preset)
    c = figures.common("gao_rl", preset)
    bon = gao_bon.get_config(arg)
    c.judge, c.gold = bon.judge, bon.gold  # the proxies of gao_bon (shared trials)
    c.label_counts = bon.label_counts
    c.rm_models = bon.rm_models
    # Gao et al. ran RL with a small KL penalty so that it would over-optimize; no controller.
    c.ppo.kl.adaptive = False
    c.ppo.kl.beta = 0.01
    c.ppo.train.steps = 6 if tiny else 200
    c.ppo.train.eval_every = 3 if tiny else 10  # points of the curve (held-out prompts)
    c.ppo.train.ckpt_every = 50
    c.ppo.eval.judges = (c.gold, "vader")
    c.ppo.eval.gold = c.gold
    c.lock()
    return c
