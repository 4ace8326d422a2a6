"""Pairwise preference losses on sequence log-probs, shared by the preference methods (offline
DPO, online DPO, ...).

Inputs are sequence log-probs [N, 2] (column 0 chosen, 1 rejected) of the policy and of the frozen
reference, and response token counts [N, 2].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.errors import UserError

LOSSES = ("sigmoid", "ipo")


def dpo_loss(logp: jax.Array, ref_logp: jax.Array, count: jax.Array, *, kind: str = "sigmoid",
             beta: float = 0.1, label_smoothing: float = 0.0,
             weight: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss_sum, metric_sums) of a batch of pairs; `metric_sums["count"]` is the pair weight.

    `weight` [N] (0 for padding pairs) defaults to 1. Metric sums: `loss`, `accuracy` (implicit
    reward of the chosen above the rejected, ties one half), `margin`, `reward_chosen`,
    `reward_rejected` (β-scaled log-ratios of the summed log-probs), `chosen_logp`,
    `rejected_logp`.
    """
    if kind not in LOSSES:
        raise UserError("config.dpo.loss", f"{kind!r} is not a DPO loss", f"use one of {LOSSES}")
    w = jnp.ones(logp.shape[:1], jnp.float32) if weight is None else weight.astype(jnp.float32)
    ratio = logp - ref_logp  # log π/π_ref per sequence [N, 2]
    rewards = beta * ratio  # implicit rewards
    if kind == "ipo":
        per_token = ratio / jnp.maximum(count, 1.0)
        h = per_token[:, 0] - per_token[:, 1]
        losses = jnp.square(h - 1.0 / (2.0 * beta))
    else:
        h = ratio[:, 0] - ratio[:, 1]
        losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
                  - label_smoothing * jax.nn.log_sigmoid(-beta * h))
    margin = rewards[:, 0] - rewards[:, 1]
    correct = (margin > 0) + 0.5 * (margin == 0)
    sums = {"count": w.sum(), "loss": (losses * w).sum(), "accuracy": (correct * w).sum(),
            "margin": (margin * w).sum(), "reward_chosen": (rewards[:, 0] * w).sum(),
            "reward_rejected": (rewards[:, 1] * w).sum(), "chosen_logp": (logp[:, 0] * w).sum(),
            "rejected_logp": (logp[:, 1] * w).sum()}
    return sums["loss"], sums
