"""The network layer: one decoder family, scalar heads, Hugging Face import/export.

Functional interface used by every stage (parameters are pure nested dicts):

    params = init_params(cfg, rng, heads=("lm",))
    axes = param_axes(cfg, heads=("lm",))       # same tree, leaves = logical axis names
    out = forward(cfg, params, tokens, positions, mask)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models.config import PRESETS, ModelConfig, preset
from rlhf_jax.models.transformer import (
    Transformer, cache_axes, decode_params, forward, grow_cache, init_cache, lm_head_weight,
    lm_logits,
)

__all__ = [
    "PRESETS", "ModelConfig", "Transformer", "axes_like", "cache_axes", "decode_params", "forward", "grow_cache",
    "init_cache", "init_params", "lm_head_weight", "lm_logits", "param_axes", "param_count", "positions_from_mask", "preset",
    "trunk", "TRUNK_EXCLUDES",
]

# Top-level entries that are heads, not trunk.
TRUNK_EXCLUDES = ("lm_head", "score_head")


def init_params(cfg: ModelConfig, rng: jax.Array, heads: tuple[str, ...] = ("lm",)) -> dict:
    """Fresh parameters as a pure dict. Jittable (pass `out_shardings` to place them)."""
    model = Transformer(cfg, tuple(heads), rngs=nnx.Rngs(params=rng))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@functools.lru_cache(maxsize=64)
def _abstract_state(cfg: ModelConfig, heads: tuple[str, ...]):
    return nnx.state(nnx.eval_shape(lambda: Transformer(cfg, heads, rngs=nnx.Rngs(0))), nnx.Param)


def param_axes(cfg: ModelConfig, heads: tuple[str, ...] = ("lm",)) -> dict:
    """Logical axis names of every parameter, as a tree parallel to `init_params`' output."""
    state = _abstract_state(cfg, tuple(heads))
    return nnx.to_pure_dict(state, extract_fn=lambda v: tuple(v.get_metadata().get("out_sharding") or ()))


def axes_like(cfg: ModelConfig, params: dict) -> dict:
    """Logical axes of a params tree of `cfg` holding any subset of the heads (e.g. a checkpoint
    whose heads were remapped): the matching entries of the all-heads axes tree."""
    full = param_axes(cfg, ("lm", "score"))
    unknown = sorted(set(params) - set(full))
    if unknown:
        raise ValueError(f"params hold entries {unknown} that model config {cfg} does not have")
    return {k: full[k] for k in params}


def abstract_params(cfg: ModelConfig, heads: tuple[str, ...] = ("lm",)) -> dict:
    """ShapeDtypeStructs of the parameters (no memory)."""
    return nnx.to_pure_dict(_abstract_state(cfg, tuple(heads)))


def param_count(params_or_cfg, heads: tuple[str, ...] = ("lm",)) -> int:
    tree = abstract_params(params_or_cfg, heads) if isinstance(params_or_cfg, ModelConfig) else params_or_cfg
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def trunk(params: dict) -> dict:
    """The parameters shared by every head (embeddings, blocks, final norm)."""
    return {k: v for k, v in params.items() if k not in TRUNK_EXCLUDES}


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Position ids for left- or right-padded rows: `cumsum(mask) - 1`, clipped at 0."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)
