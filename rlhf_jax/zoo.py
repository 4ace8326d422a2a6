"""The simulated world's base models: pretrained once per config, then reused from the cache.

`init_from="zoo:sim-0.4m"` in any stage resolves here (through the `rlhf_jax.init_schemes` entry
point that `handoff` reads; see setup.cfg): the work dir of a finished pretraining run of that
preset, trained first if the cache has none for this exact config (`rlhf_jax.runcache`). The cache
key hashes the resolved config (minus the work dir and the fields that cannot change the trained
parameters: evaluation and cadence) and the world's fingerprint, so a change to either retrains
instead of silently reusing a stale model.

This module trains a model (it runs `sft.run`), so it sits above the methods; the methods reach
it only through the scheme registry, never by import.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import ml_collections

from rlhf_jax import config_utils, runcache, sft
from rlhf_jax.errors import UserError
from rlhf_jax.paths import cache_dir

log = logging.getLogger(__name__)

# Pretraining steps per base-model preset (batch 64 packed rows of 64 tokens).
PRETRAIN_STEPS = {"sim-0.1m": 600, "sim-0.4m": 800, "sim-1.6m": 1200, "sim-4m": 1600}


def stage_config(objective: str, model: str, smoke: bool,
                 world: str = "") -> ml_collections.ConfigDict:
    """Config of an LM-loss stage (pretraining or SFT) on the simulated world (unlocked);
    `world` names its variant ("" = the default world)."""
    c = config_utils.base_config()
    c.objective = objective  # "pretrain": every token a target; "sft": response tokens only
    c.tokenizer = ""  # "" = from init_from's metadata, else the simulated world's tokenizer
    # Used only when init_from is "" (training from scratch).
    c.model = ml_collections.ConfigDict(dict(preset=model, dropout=0.0, remat="none",
                                             scan_layers=True))
    pretrain = objective == "pretrain"
    c.data = ml_collections.ConfigDict(dict(
        source=config_utils.sim_source(
            seed=0, num_train=200 if smoke else (60_000 if pretrain else 20_000),
            num_eval=64 if smoke else 512),
        max_len=64 if pretrain else 32,
        pack=pretrain,  # packed rows with segment ids: no attention across documents
    ))
    c.optim.lr = 3e-3 if pretrain else 5e-4
    c.optim.warmup_steps = 0 if smoke else 50
    c.optim.schedule = "cosine"
    c.optim.end_lr_ratio = 0.1
    c.optim.weight_decay = 0.01 if pretrain else 0.0
    c.train.batch_size = 8 if smoke else 64
    c.train.eval_every = 0 if smoke else 200
    c.train.eval_batches = 2 if smoke else 8
    c.train.ckpt_every = 200
    c.train.log_every = 1 if smoke else 20
    # Samples of the policy at T = 1 on held-out prompts, judged by the gold (VADER).
    c.eval = config_utils.policy_eval_config(
        num_prompts=16 if smoke else 256, temperature=1.0, batch_size=16 if smoke else 128,
        judges=("vader",), gold="vader")
    c.data.source.world = world
    return c


def pretrain_config(model: str = "sim-0.4m", *, smoke: bool = False, steps: int | None = None,
                    world: str = ""):
    """The config that defines base model `model` of world variant `world` ("" = the default
    world; `configs/pretrain_sim.py` returns it)."""
    if model not in PRETRAIN_STEPS:
        raise UserError("model", f"{model!r} has no base model in the zoo",
                        f"use one of {sorted(PRETRAIN_STEPS)}")
    c = stage_config(objective="pretrain", model=model, smoke=smoke, world=world)
    c.workdir = f"runs/pretrain_{model}" + (f"_{world}" if world else "")
    c.init_from = ""  # from scratch
    c.train.steps = int(steps if steps is not None else (2 if smoke else PRETRAIN_STEPS[model]))
    return c


def config_key(config) -> str:
    """Hash of a base model's config: `runcache.key` without the fields that cannot change
    the trained parameters (`runcache.PARAMS_ONLY`: the eval block and the logging, eval and
    checkpoint cadence) and without fields at their `provenance.KEY_NEUTRAL` values."""
    return runcache.key(config, ignore=runcache.PARAMS_ONLY)


def _legacy_key(config, world: str) -> str:
    """The key base models were cached under before `config_key` left out PARAMS_ONLY (the
    whole config): a model cached under it is still found."""
    inner = runcache.digest(runcache.key_dict(config))
    return hashlib.sha256(f"{inner}-{world}".encode()).hexdigest()[:12]


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
    import jax

    from rlhf_jax.sim.world import get_world, world_spec

    config = config.copy_and_resolve_references()
    world = get_world(*world_spec(config.data.source)).fingerprint()
    root = cache_dir() / "zoo"
    key = runcache.key(config, world, ignore=runcache.PARAMS_ONLY)
    workdir = root / f"{config.model.preset}-{key}"
    legacy = root / f"{config.model.preset}-{_legacy_key(config, world)}"

    def pretrain():
        log.info("pretraining base model %s into %s", config.model.preset, workdir)
        with config.unlocked():
            config.workdir = str(workdir)
        sft.run(config)

    # Finished = its final checkpoint (no marker). The processes of a multi-process run
    # pretrain together: no lock.
    out, _ = runcache.ensure(workdir, pretrain, legacy=[legacy], mark=False,
                             locked=jax.process_count() == 1)
    return out


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


__all__ = ["PRETRAIN_STEPS", "base_model", "ensure_pretrained", "pretrain_config", "resolve",
           "stage_config"]
