"""Best-of-n over-optimization (Gao, Schulman & Hilton 2022, Fig. 1a): `experiments.gao_bon`.

    python -m experiments.gao_bon                                  # the default (3 label counts)
    python -m experiments.gao_bon --config=configs/gao_bon.py:tiny     # CI-sized
    python -m experiments.gao_bon --config.rm_models=sim-0.1m,sim-0.4m,sim-1.6m  # RM sizes too

Proxy RMs are trained on the simulated annotators' labels of `judge` (one per label count in
`label_counts` and base model in `rm_models`); the SFT policy samples `bon.n` responses for
each of `bon.prompts` held-out prompts once, and every proxy picks its best of n from them.
The gold is `gold`. Preset keys: tiny, model.
"""

from __future__ import annotations

import ml_collections

from configs import figures


def get_config(arg: str | None = None):
    from rlhf_jax import config_utils

    preset = config_utils.parse_preset(arg)
    figures.check_keys(preset, (), __file__)
    tiny = figures.is_tiny(preset)
    c = figures.common("gao_bon", preset)
    # The over-optimization world (README): annotators label with `vader_measured`, whose score
    # turns down above a measured positive tone, and it is also the gold.
    c.judge = "vader_measured"
    c.gold = "vader_measured"
    c.also_judges = ("vader",)  # other gold judges reported in the CSV (never fitted)
    c.label_counts = (200, 800) if tiny else (1000, 3000, 10000)
    c.rm_models = ""  # comma list of base-model presets for the RMs ("" = `model`)
    c.bon = ml_collections.ConfigDict(dict(
        # Samples per prompt: the estimates cover every n <= this. At n <= 256 (d <= 2.1) the
        # gold of the best proxy had only flattened (measured 2026-12-02); 1024 reaches d 2.5.
        n=16 if tiny else 1024,
        prompts=16 if tiny else 64,  # held-out prompts (64 x 1024 samples: the cost of 256 x 256)
        temperature=1.0,  # the initial policy's own distribution (Gao et al. sample at T = 1)
        max_prompt_len=8,
        max_new_tokens=c.ppo.rollout.max_new_tokens,
        batch_size=256 if tiny else 512,
        n_boot=100 if tiny else 1000,  # bootstrap resamples of the prompts for SEs
    ))
    c.lock()
    return c
