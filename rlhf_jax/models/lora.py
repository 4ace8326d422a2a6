"""LoRA (Hu et al. 2021) as entries of the pure-dict parameter tree.

A projection with an adapter holds, beside its `kernel` [L, in..., out...]:

    lora_a     [L, in..., r]   initialised like PEFT (Kaiming-uniform, bound 1/sqrt(fan_in))
    lora_b     [L, r, out...]  zeros, so a fresh adapter leaves the model unchanged
    lora_scale [L]             alpha / r (constant, never trained)

and `models.forward` adds `scale * (x . A) . B` to the projection (transformer `_project`). The
trained tree of a LoRA stage is `split(params)[0]`: every `lora_a` / `lora_b` leaf and any
`score_head` (a reward / value head is new, so it trains in full, as PEFT's `modules_to_save`);
everything else is the frozen base. `strip` switches the adapter off (the reference policy),
`merge` folds it into the kernels (W + scale * A . B, for the hand-off and Hugging Face export).

Why not Qwix: Qwix's LoRA intercepts `einsum` / `dot_general` inside Flax module methods and finds
the weight by matching the operand against the calling module's own attributes, creating
`nnx.LoRAParam`s on that module. Our math runs as plain functions over a pure dict (inside
`lax.scan` over stacked layers), so there is no calling module and the kernel operand is a slice
of a stacked array: nothing for it to match. Its QLoRA is the same interception, so it is not
offered here either.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.errors import UserError

# Projections that can carry an adapter, and how many leading kernel dims (after `layers`) are
# its input: o contracts (heads, head_dim).
TARGET_IN_DIMS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1,
                  "fc_in": 1, "fc_out": 1}
DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
ADAPTER_LEAVES = ("lora_a", "lora_b", "lora_scale")
TRAINED_LEAVES = ("lora_a", "lora_b")
TRAINED_HEADS = ("score_head",)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "targets": list(self.targets)}


def parse_targets(targets: Any, field: str = "config.lora.targets") -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    targets = tuple(targets)
    bad = [t for t in targets if t not in TARGET_IN_DIMS]
    if bad or not targets:
        raise UserError(field, f"{','.join(targets) or '(empty)'} names no known projection"
                        if not targets else f"unknown projection(s) {bad}",
                        f"use a comma-separated subset of {','.join(TARGET_IN_DIMS)}")
    return targets


def spec_from_config(config) -> LoraSpec | None:
    """The `config.lora` block as a LoraSpec, or None when LoRA is off (rank 0 / no block)."""
    block = config.get("lora") if hasattr(config, "get") else None
    if block is None:
        return None
    rank, alpha = int(block.get("rank", 0)), float(block.get("alpha", 16.0))
    dropout = float(block.get("dropout", 0.0))
    targets = block.get("targets", DEFAULT_TARGETS)
    if rank == 0:
        return None
    if rank < 0:
        raise UserError("config.lora.rank", f"{rank} is negative", "use 0 (off) or a rank >= 1")
    if alpha <= 0:
        raise UserError("config.lora.alpha", f"{alpha} must be > 0", "PEFT's default is 16")
    if dropout != 0.0:
        raise UserError("config.lora.dropout", f"{dropout}: LoRA dropout is not implemented "
                        "(the projection gets no random key)", "set config.lora.dropout=0")
    return LoraSpec(rank, alpha, dropout, parse_targets(targets))


# ------------------------------------------------------------------------------- tree helpers


def _models(tree: Mapping, path=()):
    """(path, model subtree) of every model inside `tree` (a dict with `layers`)."""
    if isinstance(tree, Mapping):
        if "layers" in tree and isinstance(tree["layers"], Mapping):
            yield path, tree
            return
        for k, v in tree.items():
            yield from _models(v, path + (k,))


def has_adapter(tree) -> bool:
    return any(getattr(k, "key", None) == "lora_a" for path, _ in
               jax.tree_util.tree_flatten_with_path(tree)[0] for k in path)


def _is_trained(path: tuple) -> bool:
    names = [getattr(k, "key", k) for k in path]
    return names[-1] in TRAINED_LEAVES or any(n in TRAINED_HEADS for n in names)


def _partition(tree: Mapping, keep: Callable[[tuple], bool], path=()) -> dict:
    out = {}
    for k, v in tree.items():
        p = path + (k,)
        if isinstance(v, Mapping):
            sub = _partition(v, keep, p)
            if sub:
                out[k] = sub
        elif keep(p):
            out[k] = v
    return out


def partition(tree: Mapping, trained: bool) -> dict:
    """The trained (or frozen) part of a tree that holds adapters, by leaf path (works on a
    params tree and on its tree of logical axes alike)."""
    return _partition(tree, (lambda p: _is_trained(p)) if trained
                      else (lambda p: not _is_trained(p)))


def split(tree: Mapping) -> tuple[dict, dict]:
    """(trained, frozen) parts of a params tree: with an adapter, the `lora_a`/`lora_b` leaves
    and score heads vs the rest; without one, (tree, {}) (full fine-tuning)."""
    if not has_adapter(tree):
        return tree, {}
    keep = lambda p: _is_trained(p)  # noqa: E731
    return _partition(tree, keep), _partition(tree, lambda p: not keep(p))


def join(a: Mapping, b: Mapping) -> dict:
    """Deep union of two disjoint dict trees (the inverse of `split`)."""
    out = dict(a)
    for k, v in b.items():
        if k in out and isinstance(out[k], Mapping) and isinstance(v, Mapping):
            out[k] = join(out[k], v)
        elif k in out:
            raise ValueError(f"lora.join: {k!r} is in both trees")
        else:
            out[k] = v
    return out


def strip(tree: Mapping) -> dict:
    """The tree with every adapter removed (the base model: a LoRA policy's reference)."""
    return _partition(tree, lambda p: p[-1] not in ADAPTER_LEAVES)


def adapter_axes(base_axes: Mapping, params: Mapping) -> dict:
    """Logical axes of `params` (base + adapters) from the base's axes: A takes the kernel's
    (layers, in...) axes and B its (layers, out...) axes, the rank axis unsharded, so adapters
    and their optimizer state shard like the projections they adapt."""
    out = jax.tree.map(lambda x: x, base_axes, is_leaf=lambda x: isinstance(x, tuple))
    out = dict(out)
    for path, model in _models(params):
        ax_model = out
        for k in path:
            ax_model = ax_model[k]
        for t, p in model["layers"].items():
            if not isinstance(p, Mapping) or "lora_a" not in p:
                continue
            k_axes = tuple(ax_model["layers"][t]["kernel"])
            n_in = TARGET_IN_DIMS[t]
            ax_model["layers"][t] = dict(
                ax_model["layers"][t],
                lora_a=(k_axes[0], *k_axes[1:1 + n_in], None),
                lora_b=(k_axes[0], None, *k_axes[1 + n_in:]),
                lora_scale=(k_axes[0],))
    return out


def _copy_dicts(tree):
    return {k: _copy_dicts(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def attach(params: Mapping, spec: LoraSpec, key: jax.Array,
           field: str = "config.lora.targets") -> dict:
    """`params` with a fresh adapter on `spec.targets` of every model in the tree (B = 0, so the
    model's outputs are unchanged). Jittable; the base arrays are shared, not copied."""
    out = _copy_dicts(params)
    models = list(_models(out))
    if not models:
        raise ValueError("lora.attach: no model (a dict with 'layers') in the tree")
    for mi, (_, model) in enumerate(models):
        layers = model["layers"]
        missing = [t for t in spec.targets if t not in layers]
        if missing:
            have = [t for t in TARGET_IN_DIMS if t in layers]
            raise UserError(field, f"this model has no projection(s) {missing}",
                            f"choose among {','.join(have)}")
        for ti, t in enumerate(spec.targets):
            kernel = layers[t]["kernel"]
            n_in = TARGET_IN_DIMS[t]
            L, ins, outs = kernel.shape[0], kernel.shape[1:1 + n_in], kernel.shape[1 + n_in:]
            fan_in = int(np.prod(ins))
            bound = 1.0 / math.sqrt(fan_in)  # PEFT: kaiming_uniform_(a=sqrt(5))
            k = jax.random.fold_in(jax.random.fold_in(key, mi), ti)
            layers[t]["lora_a"] = jax.random.uniform(k, (L, *ins, spec.rank), kernel.dtype,
                                                     -bound, bound)
            layers[t]["lora_b"] = jnp.zeros((L, spec.rank, *outs), kernel.dtype)
            layers[t]["lora_scale"] = jnp.full((L,), spec.scale, jnp.float32)
    return out


def with_scales(params: Mapping, alpha: float) -> dict:
    """`params` with `lora_scale` = alpha / r beside every `lora_a` (a saved adapter holds only
    the trained A and B; its metadata holds alpha)."""
    out = _copy_dicts(params)
    for _, model in _models(out):
        for p in model["layers"].values():
            if isinstance(p, dict) and "lora_a" in p:
                a = p["lora_a"]
                p["lora_scale"] = np.full((a.shape[0],), float(alpha) / a.shape[-1], np.float32)
    return out


def delta_kernel(p: Mapping) -> jax.Array:
    """scale * A . B as a kernel [L, in..., out...] of the projection dict `p`."""
    a, b = jnp.asarray(p["lora_a"], jnp.float32), jnp.asarray(p["lora_b"], jnp.float32)
    d = jax.vmap(lambda a, b: jnp.tensordot(a, b, axes=1))(a, b)
    s = jnp.asarray(p["lora_scale"], jnp.float32).reshape((-1,) + (1,) * (d.ndim - 1))
    return d * s


def merge(params: Mapping) -> dict:
    """Adapters folded into their kernels (W + scale * A . B, in f32, cast back) and removed."""
    out = _copy_dicts(params)
    for _, model in _models(out):
        for t, p in model["layers"].items():
            if isinstance(p, Mapping) and "lora_a" in p:
                w = p["kernel"]
                p["kernel"] = (jnp.asarray(w, jnp.float32) + delta_kernel(p)).astype(w.dtype)
                for name in ADAPTER_LEAVES:
                    del p[name]
    return out


def trainable_bytes(tree) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
