"""The simulated world's base models: pretrained once per config, then reused from the cache.

`init_from="zoo:sim-0.4m"` in any stage resolves here (through the `rlhf_jax.init_schemes` entry
point that `handoff` reads; see setup.cfg): the work dir of a finished pretraining run of that
preset, trained first if the cache has none for this exact config. The cache key hashes the whole
resolved config (minus the work dir) and the world's fingerprint, so a change to either retrains
instead of silently reusing a stale model.

This module trains a model (it runs `sft.run`), so it sits above the methods; the methods reach
it only through the scheme registry, never by import.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from rlhf_jax import checkpoint, config_utils, provenance, sft
from rlhf_jax.errors import UserError
from rlhf_jax.paths import cache_dir

log = logging.getLogger(__name__)

# Pretraining steps per base-model preset (batch 64 packed rows of 64 tokens).
PRETRAIN_STEPS = {"sim-0.1m": 600, "sim-0.4m": 800, "sim-1.6m": 1200, "sim-4m": 1600}


def pretrain_config(model: str = "sim-0.4m", *, smoke: bool = False, steps: int | None = None,
                    world: str = ""):
    """The config that defines base model `model` of world variant `world` ("" = the default
    world; `configs/pretrain_sim.py` returns it)."""
    if model not in PRETRAIN_STEPS:
        raise UserError("model", f"{model!r} has no base model in the zoo",
                        f"use one of {sorted(PRETRAIN_STEPS)}")
    c = sft.stage_config(objective="pretrain", model=model, smoke=smoke, world=world)
    c.workdir = f"runs/pretrain_{model}" + (f"_{world}" if world else "")
    c.init_from = ""  # from scratch
    c.train.steps = int(steps if steps is not None else (2 if smoke else PRETRAIN_STEPS[model]))
    return c


def config_key(config) -> str:
    """Hash of a stage config without its work dir (what makes two runs interchangeable);
    fields at their `provenance.KEY_NEUTRAL` values are left out, so adding one kept the key."""
    d = provenance.key_dict(config)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def base_model(preset: str, world: str = "", **overrides) -> Path:
    """Work dir of the pretrained base model `preset` of world variant `world` (trains it if not
    cached)."""
    config = pretrain_config(preset, world=world)
    for key, value in overrides.items():
        config_utils.set_dotted(config, key, value)
    config.lock()
    return ensure_pretrained(config)


def ensure_pretrained(config) -> Path:
    """Work dir of a finished pretraining run of `config` (a `pretrain_config` config)."""
    from rlhf_jax.sim.world import get_world, world_spec

    config = config.copy_and_resolve_references()
    world = get_world(*world_spec(config.data.source)).fingerprint()
    key = hashlib.sha256(f"{config_key(config)}-{world}".encode()).hexdigest()[:12]
    workdir = cache_dir() / "zoo" / f"{config.model.preset}-{key}"
    if not checkpoint.stage_is_complete(workdir):
        log.info("pretraining base model %s into %s", config.model.preset, workdir)
        with config.unlocked():
            config.workdir = str(workdir)
        sft.run(config)
    return workdir


def resolve(name: str) -> str:
    """The `zoo:` init scheme: `zoo:<preset>` (the default world) or `zoo:<preset>@<variant>`
    (a world variant, e.g. `zoo:sim-0.4m@failure_modes`) -> the cached base model's work dir."""
    from rlhf_jax.sim.world import WORLD_VARIANTS

    preset, _, world = name.partition("@")
    if preset not in PRETRAIN_STEPS:
        raise UserError("config.init_from", f"zoo:{name} is not a base model of the zoo",
                        f"use zoo:<one of {', '.join(sorted(PRETRAIN_STEPS))}>[@<world>]")
    if world and world not in WORLD_VARIANTS:
        raise UserError("config.init_from", f"zoo:{name} names an unknown world {world!r}",
                        f"use one of {sorted(WORLD_VARIANTS)} after '@'")
    return str(base_model(preset, "" if world == "default" else world))


__all__ = ["PRETRAIN_STEPS", "base_model", "ensure_pretrained", "pretrain_config", "resolve"]
