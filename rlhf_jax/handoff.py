"""Stage hand-off: loading a stage's inputs (policy, reward model, tokenizer) onto the mesh.

Every stage's `init_from` (and PPO's `reward_from`) names one of:

* a finished stage's work dir (its `final/` params and metadata);
* `hf:<dir>`: a local Hugging Face checkpoint;
* `scratch:<preset>`: fresh random weights of a model preset (`scratch`), with the data
  source's tokenizer;
* `<scheme>:<rest>` for a registered scheme, e.g. `zoo:<preset>` (the simulated world's cached
  base model, `rlhf_jax.zoo`). Schemes come from the `rlhf_jax.init_schemes` entry-point group
  (setup.cfg) or `register_scheme`, so code that trains models (the zoo) sits above the methods
  that load them and no import runs upward.

Parameters land straight on their mesh shardings (`shardings=trainer.model_shardings`): Orbax
restores each shard onto its devices and the Hugging Face reader places tensor by tensor, so a
model never passes through one device or host memory whole (DESIGN.md pitfall 20). Head
remapping (LM trunk -> RM, RM -> value) is dict surgery on the returned params.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping
from importlib import metadata as importlib_metadata
from typing import Any

import jax
import numpy as np

from rlhf_jax import checkpoint, models
from rlhf_jax.data import sources
from rlhf_jax.errors import UserError

log = logging.getLogger(__name__)

SCHEME_GROUP = "rlhf_jax.init_schemes"
_SCHEMES: dict[str, Callable[[str], str]] = {}


def register_scheme(name: str, resolve: Callable[[str], str]) -> None:
    """`init_from="<name>:<rest>"` -> `resolve(rest)`, a work dir or an `hf:<dir>` string."""
    _SCHEMES[name] = resolve


def _resolver(name: str) -> Callable[[str], str] | None:
    if name not in _SCHEMES:
        for ep in importlib_metadata.entry_points(group=SCHEME_GROUP):
            if ep.name == name:
                _SCHEMES[name] = ep.load()
    return _SCHEMES.get(name)


def resolve_path(init_from: str, field: str = "config.init_from") -> str:
    """Follow registered schemes until `init_from` is a work dir or `hf:<dir>`."""
    seen = set()
    while ":" in init_from and not init_from.startswith("hf:"):
        scheme, rest = init_from.split(":", 1)
        if len(scheme) == 1 or "/" in scheme:  # a Windows drive or a path holding ':'
            break
        resolve = _resolver(scheme)
        if resolve is None:
            known = sorted(set(_SCHEMES) | {ep.name for ep in
                                            importlib_metadata.entry_points(group=SCHEME_GROUP)})
            raise UserError(field, f"{init_from!r} uses the unknown scheme {scheme!r}",
                            f"use a stage work dir, hf:<dir>, or one of the schemes {known} "
                            "(pip install -e . registers the package's own)")
        if init_from in seen:
            raise UserError(field, f"scheme {scheme!r} resolves {init_from!r} to itself", "")
        seen.add(init_from)
        init_from = resolve(rest)
    return init_from


@dataclasses.dataclass
class Loaded:
    """A stage's input model: config, params (on the mesh, or host numpy), metadata."""

    cfg: models.ModelConfig
    params: dict
    meta: dict
    source: str  # what the config said (for messages)

    @property
    def tokenizer_dir(self) -> str | None:
        return self.meta.get("tokenizer_dir")

    @property
    def reward_norm(self) -> dict | None:
        return self.meta.get("reward_norm")


def _hf_shardings(shardings):
    if shardings is None:
        return None
    return lambda cfg, heads: shardings(cfg)(models.abstract_params(cfg, heads))


SCRATCH = "scratch:"


def scratch(name: str, *, shardings: Callable | None = None, seed: int = 0, source=None,
            field: str = "config.init_from") -> Loaded:
    """`scratch:<preset>`: fresh random LM weights of a `models.PRESETS` size (key
    `rng.key(seed, INIT)`), with the data source's tokenizer (default: the simulated world's)
    fixing the vocabulary: a baseline with no pretraining, and tiny tests."""
    from rlhf_jax import rng

    if name not in models.PRESETS:
        raise UserError(field, f"{SCRATCH}{name}: unknown preset",
                        f"choose from {sorted(models.PRESETS)}")
    src = sources.from_config(source if source is not None else {"kind": "sim", "seed": 0})
    found = src.tokenizer()
    if found is None:
        raise UserError(field, f"{SCRATCH}{name} needs a tokenizer and the data source has none",
                        "train from a base model (zoo:<preset>, hf:<dir>) instead")
    tok, tok_dir = found
    cfg = models.preset(name, vocab_size=len(tok))
    if shardings is None:
        params = jax.tree.map(np.asarray, _init_jit(cfg)(rng.key(seed, rng.Purpose.INIT)))
    else:  # straight onto the mesh
        out = shardings(cfg)(models.abstract_params(cfg, ("lm",)))
        params = jax.jit(lambda k: models.init_params(cfg, k, ("lm",)),
                         out_shardings=out)(rng.key(seed, rng.Purpose.INIT))
    meta = {"tokenizer_dir": str(tok_dir), "model_config": cfg.to_dict()}
    return Loaded(cfg, params, meta, SCRATCH + name)


@functools.lru_cache(maxsize=8)
def _init_jit(cfg: models.ModelConfig):
    """Jitted fresh LM params of `cfg` (one compile per size)."""
    return jax.jit(lambda k: models.init_params(cfg, k, ("lm",)))


def resolve_init(init_from: str, *, shardings: Callable | None = None,
                 field: str = "config.init_from", seed: int = 0, source=None) -> Loaded:
    """Load what `init_from` names (see the module docstring).

    `shardings(cfg)` -> `abstract params -> shardings` (`Trainer.model_shardings`) places the
    params on the mesh as they are read; None gives host numpy arrays. `seed` and `source` (a
    `data.source` spec) are read by `scratch:<preset>` only.
    """
    from rlhf_jax.models import hf

    if not init_from:
        raise UserError(field, "is empty", "give a stage work dir, hf:<dir> or zoo:<preset>")
    if init_from.startswith(SCRATCH):
        return scratch(init_from[len(SCRATCH):], shardings=shardings, seed=seed, source=source,
                       field=field)
    path = resolve_path(init_from, field)
    if path.startswith("hf:"):
        src = path[3:]
        cfg, params = hf.load_hf(src, dtype="float32", shardings=_hf_shardings(shardings))
        if shardings is None:
            params = jax.tree.map(np.asarray, params)
        meta = {"tokenizer_dir": src, "model_config": cfg.to_dict()}
        return Loaded(cfg, params, meta, init_from)
    meta = checkpoint.load_stage_metadata(path, field=field)
    if "model_config" not in meta:
        raise UserError(field, f"{init_from!r} has no model_config in its metadata",
                        "is this the work dir of an rlhf_jax stage or a convert hf-to-orbax?")
    cfg = models.ModelConfig.from_dict(dict(meta["model_config"]))
    if meta.get("lora"):
        return _load_lora_stage(path, cfg, meta, init_from, shardings, field)
    params, meta = checkpoint.load_stage_params(path, None if shardings is None
                                                else shardings(cfg))
    return Loaded(cfg, params, meta, init_from)


def _load_lora_stage(path: str, cfg, meta: dict, init_from: str, shardings, field: str) -> Loaded:
    """A LoRA stage's output: its base (`meta["lora"]["base"]`, loaded the same way, so chains
    of LoRA stages work) with the stage's adapter merged in (W + alpha/r * A . B) and its score
    head, if it trained one. One full tree results: the next stage's base."""
    from rlhf_jax.models import lora

    base = resolve_init(str(meta["lora"]["base"]), shardings=shardings,
                        field=f"{field} (the base of LoRA stage {init_from})")
    adapter, meta = checkpoint.load_stage_params(path)  # small: host numpy
    # A score head the stage trained replaces the base's (an RM's LoRA stage on an RM base).
    full = lora.join({k: v for k, v in base.params.items()
                      if not (k in lora.TRAINED_HEADS and k in adapter)}, adapter)
    full = lora.with_scales(full, float(meta["lora"]["alpha"]))
    merged = jax.jit(lora.merge)(full)
    if shardings is None:
        merged = jax.tree.map(np.asarray, merged)
    else:
        merged = jax.device_put(merged, shardings(cfg)(jax.eval_shape(lambda: merged)))
    meta = dict(meta)
    meta.setdefault("tokenizer_dir", base.meta.get("tokenizer_dir"))
    return Loaded(cfg, merged, meta, init_from)


def _check_tree(loaded: Loaded, heads: tuple[str, ...], field: str) -> None:
    want = jax.tree.map(lambda x: tuple(x.shape), models.abstract_params(loaded.cfg, heads))
    got = jax.tree.map(lambda x: tuple(np.shape(x)), loaded.params)
    if want != got:
        raise UserError(field, f"the params of {loaded.source!r} do not match its model_config "
                        f"with heads {heads} (different tree or shapes)",
                        "the checkpoint is damaged or was written by other code")


def load_policy(init_from: str, *, shardings: Callable | None = None,
                field: str = "config.init_from") -> Loaded:
    """A language-model policy: the LM params (a score head, if any, dropped), dropout off.

    Dropout is off in every stage that loads a policy (Huang et al. 2023): ratios, KLs and
    reference log-probs assume a deterministic model, and the sampler never applies dropout.
    """
    loaded = resolve_init(init_from, shardings=shardings, field=field)
    loaded.params = {k: v for k, v in loaded.params.items() if k != "score_head"}
    loaded.cfg = loaded.cfg.replace(dropout=0.0)
    if not loaded.cfg.tie_embeddings and "lm_head" not in loaded.params:
        raise UserError(field, f"{init_from!r} holds no LM head (is it a reward model?)",
                        "give the work dir of an SFT stage or a base model")
    _check_tree(loaded, ("lm",), field)
    return loaded


def load_reward_model(reward_from: str, *, shardings: Callable | None = None,
                      field: str = "config.reward_from") -> Loaded:
    """A reward model: trunk + score head (an LM head, if any, dropped), dropout off, and its
    `reward_norm` (a warning when it has none: raw scores are then used)."""
    loaded = resolve_init(reward_from, shardings=shardings, field=field)
    if "score_head" not in loaded.params:
        raise UserError(field, f"{reward_from!r} has no score head", "give an RM stage's work dir")
    loaded.params = {k: v for k, v in loaded.params.items() if k != "lm_head"}
    loaded.cfg = loaded.cfg.replace(dropout=0.0)
    _check_tree(loaded, ("score",), field)
    if loaded.reward_norm is None:
        log.warning("%s=%s has no reward_norm metadata: using raw RM scores", field, reward_from)
    return loaded


def check_norm_sampling(norm: Mapping[str, Any] | None, temperature: float,
                        max_new_tokens: int, field: str) -> None:
    """Warn when a policy stage samples at settings other than the RM's normalisation was fit at.

    `reference` normalisation (Ziegler et al. 2019) gives mean 0, std 1 on reference samples
    drawn at one temperature and length; sampled elsewhere the scale silently drifts.
    """
    if not norm or norm.get("method") != "reference":
        return
    fit = {"temperature": norm.get("temperature"), "max_new_tokens": norm.get("max_new_tokens")}
    now = {"temperature": float(temperature), "max_new_tokens": int(max_new_tokens)}
    off = [k for k in fit if fit[k] is not None and float(fit[k]) != float(now[k])]
    if off:
        log.warning("%s: the RM's reward_norm was fit on reference samples at %s, but this stage "
                    "samples at %s; rewards of SFT samples will not have mean 0 / std 1",
                    field, {k: fit[k] for k in off}, {k: now[k] for k in off})


def tokenizer_for(tokenizer_field: str, meta: Mapping, source=None,
                  field: str = "config.tokenizer"):
    """(tokenizer, directory): `config.tokenizer` if set, else the one `init_from` recorded,
    else the data source's own (`DataSource.tokenizer()`: the simulated world has one).
    `source`: a `data.source` spec or a `DataSource`."""
    from rlhf_jax.data.tokenize import load_tokenizer

    path = tokenizer_field or meta.get("tokenizer_dir")
    if path:
        where = field if tokenizer_field else "config.init_from (its recorded tokenizer_dir)"
        return load_tokenizer(str(path), where), str(path)
    if source is not None and not isinstance(source, sources.DataSource):
        source = sources.from_config(source)
    found = None if source is None else source.tokenizer()
    if found is None:
        raise UserError(field, "is empty and init_from records no tokenizer",
                        "set --config.tokenizer=<a Hugging Face tokenizer directory>")
    tok, tok_dir = found
    return tok, str(tok_dir)


def load_policy_and_tokenizer(config, place, source: Mapping | None = None):
    """(policy, tokenizer, tokenizer dir) of a stage that starts from `config.init_from` (with an
    optional `config.tokenizer` override), the policy on `place`'s mesh; the tokenizer must fit
    the model's vocabulary."""
    policy = load_policy(config.init_from, shardings=place.model_shardings)
    tokenizer, tok_dir = tokenizer_for(config.get("tokenizer", ""), policy.meta, source)
    check_vocab(tokenizer, policy.cfg, "config.tokenizer")
    return policy, tokenizer, tok_dir


def check_vocab(tokenizer, cfg: models.ModelConfig, where: str) -> None:
    if len(tokenizer) > cfg.vocab_size:
        raise UserError(where, f"the tokenizer has {len(tokenizer)} tokens but the model's "
                        f"vocab_size is {cfg.vocab_size}", "use the model's own tokenizer")
