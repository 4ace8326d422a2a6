"""The alignment tax and PPO-ptx (Ouyang et al. 2022): `experiments.alignment_tax`.

    python -m experiments.alignment_tax [--config=configs/alignment_tax.py[:tiny]]

PPO from the SFT policy against the main world's RM, with a fixed KL penalty (no controller, so
every run gets the same pull toward SFT) and one run per PPO-ptx coefficient in `ptx_coefs`
(`ppo.ptx.coef`, the weight of the next-token loss on pretraining text mixed into each
minibatch). Each final policy's gold gain over SFT is set against its alignment tax: the rise
of its LM loss on held-out pretraining text (`tax_texts` documents of the world's corpus).
Preset keys: tiny, model.
"""

from __future__ import annotations

import ml_collections

from configs import figures


def get_config(arg: str | None = None):
    from rlhf_jax import config_utils

    preset = config_utils.parse_preset(arg)
    figures.check_keys(preset, (), __file__)
    tiny = figures.is_tiny(preset)
    c = figures.common("alignment_tax", preset)
    c.ptx_coefs = (0.0, 1.0) if tiny else (0.0, 0.3, 1.0, 3.0)
    c.ppo.kl.adaptive = False
    c.ppo.kl.beta = 0.02  # InstructGPT's beta; small enough for the policy to drift far
    c.ppo.train.steps = 6 if tiny else 150
    # Held-out pretraining text for the tax (the corpus' eval split, never trained on).
    c.tax = ml_collections.ConfigDict(dict(
        source=dict(kind="sim", seed=0, num_train=0, num_eval=64 if tiny else 2000),
        seq_len=64, batch_size=64))
    c.lock()
    return c
