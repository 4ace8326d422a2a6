"""Preference losses on sequence log-probs, shared by the preference methods (offline DPO,
online DPO, KTO, ...).

* `dpo_loss`: pairs; sequence log-probs [N, 2] (column 0 chosen, 1 rejected) of the policy and
  of the frozen reference, and response token counts [N, 2].
* `kto_loss`: unpaired examples labelled desirable / undesirable; sequence log-probs [N] of the
  policy and the reference, plus those of mismatched (prompt, completion) rows for the
  reference point.
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


def kto_loss(logp: jax.Array, ref_logp: jax.Array, kl_logp: jax.Array, kl_ref_logp: jax.Array,
             desirable: jax.Array, *, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0,
             weight: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss_sum, metric_sums) of KTO (Ethayarajh et al. 2024) on a batch of N examples.

    With r = log π(y|x) − log π_ref(y|x) (summed over the response) and the reference point
    z₀ = max(0, mean over the batch of log π(y'|x) − log π_ref(y'|x)) on mismatched rows (x, y')
    (`kl_logp`, `kl_ref_logp` [N]; a Monte-Carlo estimate of KL(π || π_ref), not
    back-propagated), an example's loss is λ_D (1 − σ(β(r − z₀))) when `desirable` [N] is true
    and λ_U (1 − σ(β(z₀ − r))) otherwise. `weight` [N] (0 for padding rows) defaults to 1;
    the loss is the weighted mean over examples (`metric_sums["count"]` = Σ weight), as in the
    paper. Metric sums: `loss`, `kl` (z₀ before clamping, per example), `reward_desirable` /
    `reward_undesirable` (β r) and `desirable` (their weights), `accuracy` (desirable above z₀,
    undesirable below, ties one half).
    """
    w = jnp.ones(logp.shape[:1], jnp.float32) if weight is None else weight.astype(jnp.float32)
    d = desirable.astype(jnp.float32)
    kl = (kl_logp - kl_ref_logp) * w
    kl_mean = kl.sum() / jnp.maximum(w.sum(), 1.0)
    z0 = jax.lax.stop_gradient(jnp.maximum(kl_mean, 0.0))
    r = logp - ref_logp
    sign = 2.0 * d - 1.0  # +1 desirable, -1 undesirable
    lam = d * desirable_weight + (1.0 - d) * undesirable_weight
    losses = lam * (1.0 - jax.nn.sigmoid(beta * sign * (r - z0)))
    gap = sign * (r - z0)
    correct = (gap > 0) + 0.5 * (gap == 0)
    sums = {"count": w.sum(), "loss": (losses * w).sum(), "kl": kl_mean * w.sum(),
            "accuracy": (correct * w).sum(), "desirable": (d * w).sum(),
            "reward_desirable": (beta * r * d * w).sum(),
            "reward_undesirable": (beta * r * (1.0 - d) * w).sum()}
    return sums["loss"], sums
