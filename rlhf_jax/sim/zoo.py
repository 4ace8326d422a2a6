"""The simulated world's base models: pretrained once per config, then reused from the cache.

`zoo.base_model("sim-0.4m")` returns the work dir of a finished pretraining run of that preset
(`configs/pretrain_sim.py`), training it first if the cache has none for this exact config. The
cache key hashes the whole resolved config (minus the work dir) and the world's fingerprint, so a
change to either retrains instead of silently reusing a stale model.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from rlhf_jax.paths import cache_dir

log = logging.getLogger(__name__)


def config_key(config) -> str:
    """Hash of a stage config without its work dir (what makes two runs interchangeable)."""
    d = config.to_dict()
    d.pop("workdir", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def base_model_config(preset: str, **overrides):
    from configs import pretrain_sim

    config = pretrain_sim.get_config(f"model={preset}")
    with config.unlocked():
        for key, value in overrides.items():
            node = config
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
    return config


def base_model(preset: str, **overrides) -> Path:
    """Work dir of the pretrained base model `preset` (trains it if not cached)."""
    from rlhf_jax.models import PRESETS

    if preset not in PRESETS:
        from rlhf_jax.errors import UserError

        raise UserError("config.init_from", f"zoo:{preset} is not in the model zoo",
                        f"choose one of {', '.join('zoo:' + p for p in sorted(PRESETS))}")
    return ensure_pretrained(base_model_config(preset, **overrides))


def ensure_pretrained(config) -> Path:
    """Work dir of a finished pretraining run of `config` (a `configs/pretrain_sim.py` config)."""
    from rlhf_jax import checkpoint, sft
    from rlhf_jax.sim.world import get_world

    config = config.copy_and_resolve_references()
    world = get_world(int(config.data.source.seed)).fingerprint()
    key = hashlib.sha256(f"{config_key(config)}-{world}".encode()).hexdigest()[:12]
    workdir = cache_dir() / "zoo" / f"{config.model.preset}-{key}"
    if not checkpoint.stage_is_complete(workdir):
        log.info("pretraining base model %s into %s", config.model.preset, workdir)
        with config.unlocked():
            config.workdir = str(workdir)
        sft.run(config)
    return workdir
