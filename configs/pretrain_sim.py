"""Pretraining a base model on the simulated world's corpus (what `zoo:<preset>` runs).

    python -m rlhf_jax.sft --config=configs/pretrain_sim.py:model=sim-0.4m

Preset keys: model (rlhf_jax.models.PRESETS), steps, smoke.
"""

from rlhf_jax import config_utils
from configs import common


def get_config(arg: str | None = None):
    preset = config_utils.parse_preset(arg)
    config_utils.check_preset_keys(preset, ("model", "steps", "smoke", "preset"), __file__)
    smoke = config_utils.is_smoke(preset)
    model = preset.get("model", "sim-0.4m")

    c = common.lm_stage_config(objective="pretrain", model=model, smoke=smoke)
    c.workdir = f"runs/pretrain_{model}"
    c.init_from = ""  # from scratch
    c.train.steps = int(preset.get("steps", 2 if smoke else common.PRETRAIN_STEPS[model]))
    c.lock()
    return c
