"""Pretraining a base model on the simulated world's corpus (what `zoo:<preset>` runs).

    python -m rlhf_jax.sft --config=configs/pretrain_sim.py:model=sim-0.4m
    python -m rlhf_jax.sft --config=configs/pretrain_sim.py:world=failure_modes

Preset keys: model (rlhf_jax.models.PRESETS), steps, smoke, world (a world variant,
`rlhf_jax.sim.world.WORLD_VARIANTS`; its base model is `zoo:<model>@<world>`). The config itself
lives in `rlhf_jax.zoo.pretrain_config`, because it defines the zoo's base models.
"""

from rlhf_jax import config_utils, zoo


def get_config(arg: str | None = None):
    preset = config_utils.parse_preset(arg)
    config_utils.check_preset_keys(preset, ("model", "steps", "smoke", "world", "preset"),
                                   __file__)
    c = zoo.pretrain_config(preset.get("model", "sim-0.4m"),
                            smoke=config_utils.is_smoke(preset), steps=preset.get("steps"),
                            world=config_utils.world_preset(preset))
    c.lock()
    return c
