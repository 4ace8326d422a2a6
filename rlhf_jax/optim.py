"""Optimizers and learning-rate schedules (optax), built from a config's `optim` fields."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from rlhf_jax.config_utils import OPTIM_SCHEDULES
from rlhf_jax.errors import UserError
from rlhf_jax.models import lora


def make_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then constant / cosine / linear decay to lr·end_lr_ratio."""
    lr = float(optim_cfg.lr)
    warmup = int(optim_cfg.warmup_steps)
    end = lr * float(optim_cfg.get("end_lr_ratio", 0.0))
    kind = optim_cfg.schedule
    if kind == "constant":
        if not warmup:
            return optax.constant_schedule(lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1),
                                                  end_value=end)
    if kind == "linear":
        decay = optax.linear_schedule(lr, end, max(total_steps - warmup, 1))
        if not warmup:
            return decay
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])
    raise UserError("config.optim.schedule", f"{kind!r} is not a schedule",
                    f"use one of {OPTIM_SCHEDULES}")


def make_optimizer(optim_cfg, total_steps: int,
                   weight_decay_mask: Any | Callable | None = None) -> optax.GradientTransformation:
    """AdamW (+ global-norm clip) with the config's schedule.

    Built as clip → scale_by_adam → decayed weights → lr so that the current learning rate sits in
    the optimizer state (`inject_hyperparams`) and steps can report it. `weight_decay_mask`: a
    tree of bools or a callable params → tree (default: decay every parameter).
    """
    parts = []
    if optim_cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(float(optim_cfg.grad_clip)))
    parts.append(optax.scale_by_adam(b1=float(optim_cfg.b1), b2=float(optim_cfg.b2),
                                     eps=float(optim_cfg.eps)))
    if optim_cfg.weight_decay > 0:
        parts.append(optax.add_decayed_weights(float(optim_cfg.weight_decay),
                                               mask=weight_decay_mask))
    parts.append(optax.inject_hyperparams(optax.scale_by_learning_rate)(
        learning_rate=make_schedule(optim_cfg, total_steps)))
    return trained_only(optax.chain(*parts))


def trained_only(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` applied to the trained part of a tree that holds LoRA adapters (see
    `models.lora.split`), zero updates for the frozen rest; the identity wrapper otherwise.

    Its state is `inner`'s state of the trained part alone, so a step that passes the full
    params (base + adapter) and one that passes only the adapter share one optimizer state.
    """
    def init(params):
        return inner.init(lora.split(params)[0])

    def update(updates, state, params=None):
        trained, rest = lora.split(updates)
        p = None if params is None else lora.split(params)[0]
        new, state = inner.update(trained, state, p)
        if rest:
            new = lora.join(new, jax.tree.map(jnp.zeros_like, rest))
        return new, state

    return optax.GradientTransformation(init, update)


def current_lr(opt_state) -> jax.Array | None:
    """The learning rate of the last update, when the optimizer injects it (make_optimizer)."""
    found = [x.hyperparams["learning_rate"] for x in jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda x: hasattr(x, "hyperparams"))
        if hasattr(x, "hyperparams") and "learning_rate" in x.hyperparams]
    return found[0] if len(found) == 1 else None
