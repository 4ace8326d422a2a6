"""SFT on the simulated world's demonstrations, from the world's pretrained base model.

    python -m rlhf_jax.sft --config=configs/sft_sim.py
    python -m rlhf_jax.sft --config=configs/sft_sim.py:model=sim-1.6m,steps=600
    python -m rlhf_jax.sft --config=configs/sft_sim.py:smoke      # two steps, for tests
    python -m rlhf_jax.sft --config=configs/sft_sim.py:world=failure_modes

Preset keys: model (a base-model preset, see rlhf_jax.models.PRESETS), steps, smoke, world (a
world variant: its demonstrations, from its own base model `zoo:<model>@<world>`).
"""

from rlhf_jax import config_utils, zoo


def get_config(arg: str | None = None):
    preset = config_utils.parse_preset(arg)
    config_utils.check_preset_keys(preset, ("model", "steps", "smoke", "world", "preset"),
                                   __file__)
    smoke = config_utils.is_smoke(preset)
    model = preset.get("model", "sim-0.4m")
    world = config_utils.world_preset(preset)

    c = zoo.stage_config(objective="sft", model=model, smoke=smoke, world=world)
    c.workdir = "runs/sft_sim"
    # The world's pretrained base model of this size (trained once, then cached); the smoke
    # preset starts from scratch so a test never pretrains.
    c.init_from = "" if smoke else f"zoo:{model}" + (f"@{world}" if world else "")
    c.train.steps = int(preset.get("steps", 2 if smoke else 400))
    c.lock()
    return c
