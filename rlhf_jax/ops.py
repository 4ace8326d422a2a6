"""Array operations every method shares: masked statistics, KL estimators, log-probs, chunking.

Every mean / variance is a token-weighted sum / count over the whole (global) array: under jit on
a mesh XLA reduces across devices, so the numbers do not depend on the mesh shape (DESIGN.md
pitfall 6) and padding never enters an average (pitfall 13).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax import models


def masked_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum of `x` over the positions where `mask` is 1."""
    return jnp.sum(x * mask.astype(jnp.float32))


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `x` over the positions where `mask` is 1 (0 when the mask is empty)."""
    m = mask.astype(jnp.float32)
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def masked_var(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Population variance over the masked positions (two-pass: numerically stable)."""
    mean = masked_mean(x, mask)
    return masked_mean(jnp.square(x - mean), mask)


def masked_whiten(x: jax.Array, mask: jax.Array, *, shift_mean: bool = True,
                  eps: float = 1e-8) -> jax.Array:
    """(x - mean) / std over the masked positions of the whole batch; padding stays 0.

    `shift_mean=False` keeps the mean: the deviations from it are rescaled to unit std and the
    mean is added back (lm-human-preferences' `whiten(shift_mean=False)`, used by Ziegler et al.
    2019 on rewards so their sign is kept).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    white = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return white * mask.astype(white.dtype)


# ----------------------------------------------------------------------------------------------
# KL estimators (Schulman, "Approximating KL divergence", 2020). With samples y ~ pi and
# log r = log pi_ref(y) - log pi(y): k1 = -log r (unbiased, can be negative), k2 = (log r)^2 / 2,
# k3 = (r - 1) - log r (unbiased, never negative, low variance).


def kl_estimators(logp: jax.Array, logp_ref: jax.Array) -> dict[str, jax.Array]:
    """Per-token k1, k2, k3 estimates of KL(pi || pi_ref) for tokens sampled from pi."""
    log_ratio = logp_ref - logp
    return {
        "k1": -log_ratio,
        "k2": 0.5 * jnp.square(log_ratio),
        "k3": jnp.expm1(log_ratio) - log_ratio,
    }


def token_logprobs(cfg: models.ModelConfig, params, tokens, mask, *, positions=None,
                   segment_ids=None, temperature: float = 1.0):
    """log p(tokens[t] | tokens[<t]) for t >= 1, shape [B, T-1], plus the logits' entropy.

    Row t of the result scores token t+1 (the standard target shift). Callers weight it with
    `loss_mask[:, 1:]`, so the first response token — predicted from the last prompt token —
    is trained (pitfall 13 in DESIGN.md).
    """
    if positions is None:
        positions = models.positions_from_mask(mask)
    out = models.forward(cfg, params, tokens, positions, mask, segment_ids=segment_ids)
    logits = out["logits"][:, :-1] / temperature
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    targets = tokens[:, 1:]
    logp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, entropy


def lm_loss_sums(cfg: models.ModelConfig, params, batch) -> tuple[jax.Array, dict]:
    """Token-weighted cross-entropy as (sum, {"count", ...}) so accumulation and padding are exact."""
    logp, _ = token_logprobs(
        cfg, params, batch["tokens"], batch["mask"],
        positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
    )
    weights = batch["loss_mask"][:, 1:].astype(jnp.float32)
    nll = -jnp.sum(logp * weights)
    count = jnp.sum(weights)
    return nll, {"count": count, "loss": nll}


