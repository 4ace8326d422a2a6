"""Over-optimization under one noiseless annotator vs a varied, noisy pool (Dubois et al. 2023,
AlpacaFarm): `experiments.annotator_pool`.

    python -m experiments.annotator_pool [--config=configs/annotator_pool.py[:tiny]]

Two proxy RMs on the same number of rankings of the same candidates: one labelled by a single
unbiased annotator that almost always follows the gold (agreement `single.target_agreement`),
one by AlpacaFarm's kind of pool (six annotators with length, keyword, position and noise
biases) with 25% label flips. Best-of-n of the SFT policy against each (the estimator of
`experiments.gao_bon`, the same samples for both). Preset keys: tiny, model.
"""

from __future__ import annotations

import ml_collections

from configs import figures


def get_config(arg: str | None = None):
    from rlhf_jax import config_utils

    preset = config_utils.parse_preset(arg)
    figures.check_keys(preset, (), __file__)
    tiny = figures.is_tiny(preset)
    c = figures.common("annotator_pool", preset)
    c.judge = "vader_measured"  # the over-optimization world (configs/gao_bon.py)
    c.gold = "vader_measured"
    c.label_count = 400 if tiny else 10_000
    # Dotted overrides of rm.data.source for each labelling regime.
    c.single = ml_collections.ConfigDict(dict(pool="unbiased", flip_prob=0.0,
                                              target_agreement=0.99))
    # AlpacaFarm's simulated pool: varied annotators and 25% label flips; 65% agreement with
    # the gold (their simulated annotators agreed with humans about 65% of the time).
    c.pool = ml_collections.ConfigDict(dict(pool="default", flip_prob=0.25,
                                            target_agreement=0.65))
    c.bon = ml_collections.ConfigDict(dict(
        n=16 if tiny else 256, prompts=16 if tiny else 256, temperature=1.0, max_prompt_len=8,
        max_new_tokens=c.ppo.rollout.max_new_tokens, batch_size=256 if tiny else 512,
        n_boot=100 if tiny else 1000))
    c.lock()
    return c
