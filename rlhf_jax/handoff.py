"""Stage hand-off: where a stage's starting parameters come from.

Every stage's `config.init_from` goes through `resolve_init`, so SFT, RM and PPO accept the same
forms: a finished stage's work dir, `zoo:<preset>` (the simulated world's cached base model) or
`hf:<dir>` (a local Hugging Face checkpoint). Head remapping (LM trunk -> RM, RM -> value) is the
receiving stage's dict surgery on the returned params.
"""

from __future__ import annotations

import jax

from rlhf_jax import models
from rlhf_jax.errors import UserError


def resolve_init(init_from: str, *, model_cfg_fallback=None):
    """Where a stage's starting params come from → (ModelConfig, host params or None, metadata).

    "" : fresh params of `model_cfg_fallback` (returns params None: the trainer inits sharded);
    "zoo:<preset>": the simulated world's pretrained base model of that preset (trained once,
    then cached); "hf:<dir>": a local Hugging Face checkpoint; anything else: the work dir of a
    finished stage (its `final/` params and metadata).
    """
    from rlhf_jax import checkpoint
    from rlhf_jax.models import hf

    if not init_from:
        if model_cfg_fallback is None:
            raise UserError("config.init_from", "is empty and no model config was given",
                            "give a finished stage's work dir, zoo:<preset> or hf:<dir>")
        return model_cfg_fallback, None, {}
    if init_from.startswith("zoo:"):
        from rlhf_jax.sim import zoo

        init_from = str(zoo.base_model(init_from[4:]))
    if init_from.startswith("hf:"):
        path = init_from[3:]
        cfg, params = hf.load_hf(path, dtype="float32")
        params = jax.device_get(params)
        return cfg, params, {"tokenizer_dir": path, "model_config": cfg.to_dict()}
    params, meta = checkpoint.load_stage_params(init_from)
    if "model_config" not in meta:
        raise UserError("config.init_from", f"{init_from}: its metadata has no model_config",
                        "give the work dir of an rlhf_jax stage or of convert hf-to-orbax")
    return models.ModelConfig.from_dict(meta["model_config"]), params, meta
