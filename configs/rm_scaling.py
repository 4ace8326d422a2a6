"""RM accuracy against the number of comparisons (Stiennon et al. 2020 Fig. 6; Gao et al. 2022
Fig. 6): `experiments.rm_scaling`.

    python -m experiments.rm_scaling                                   # the default
    python -m experiments.rm_scaling --config=configs/rm_scaling.py:tiny   # CI-sized
    python -m experiments.rm_scaling --config.rm_models=sim-0.1m,sim-0.4m,sim-1.6m

One RM per (base-model size in `rm_models`, count in `label_counts`), each trained for one
epoch on that many K-wise rankings of the simulated annotators (the main world: labels of
`judge`), from the SFT policy of its size; held-out accuracy on the same 1,000 held-out
rankings, against the ceiling the annotators' noise allows. Preset keys: tiny, model.
"""

from __future__ import annotations

from configs import figures


def get_config(arg: str | None = None):
    from rlhf_jax import config_utils

    preset = config_utils.parse_preset(arg)
    figures.check_keys(preset, (), __file__)
    tiny = figures.is_tiny(preset)
    c = figures.common("rm_scaling", preset)
    c.judge = "vader"  # the main world's annotators
    c.rm_models = "sim-0.1m" if tiny else "sim-0.1m,sim-0.4m"
    # Rankings of K = 4 (each gives 6 pairs). Gao et al.: below ~2,000 comparisons RMs sit
    # near chance.
    c.label_counts = (100, 400) if tiny else (250, 500, 1000, 2000, 4000, 8000)
    c.lock()
    return c
