"""PPO against a reward model with a KL penalty to the SFT policy (InstructGPT step 3).

    python -m rlhf_jax.ppo --config=configs/ppo_sim.py

Objective (Ouyang et al. 2022, eq. 2; Ziegler et al. 2019):

    E_{x, y~pi}[ r(x, y) - beta * log(pi(y|x) / pi_SFT(y|x)) ] + gamma_ptx * E_{x~D_pretrain}[ log pi(x) ]

This file holds the whole algorithm: the math (pure functions of arrays, tested against plain
references in tests/test_ppo_math.py), the rollout (sampler -> reference / value / reward model
passes -> per-token rewards -> GAE), the PPO update (epochs x minibatches in one jitted scan) and
`run(config)`, which wires them into the shared `Trainer` loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# ----------------------------------------------------------------------------------------------
# Masked statistics. Every mean / variance below is a token-weighted sum / count over the whole
# (global) array: under jit on a mesh XLA reduces across devices, so the numbers do not depend on
# the mesh shape (DESIGN.md pitfall 6) and padding never enters an average (pitfall 13).


def masked_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(x * mask.astype(x.dtype))


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

    `shift_mean=False` only rescales (Ziegler et al. 2019 whiten rewards that way, so the sign of
    the reward is kept).
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


# ----------------------------------------------------------------------------------------------
# Rewards, returns, advantages.


def last_token_index(response_mask: jax.Array) -> jax.Array:
    """Index of each row's last response token (the EOS when it ended), in the response block.

    Responses are right-aligned after the prompt and mask 1 up to and including the first EOS
    (the sampler's contract), so the last real token is at `sum(mask) - 1`; this does not depend
    on how the prompt was padded (pitfall 1). Rows with an empty mask get index 0.
    """
    return jnp.maximum(jnp.sum(response_mask.astype(jnp.int32), axis=-1) - 1, 0)


def apply_eos_trick(scores: jax.Array, ended: jax.Array, no_eos_score: float | None) -> jax.Array:
    """Replace the RM score of responses that never produced EOS by `no_eos_score`.

    Ziegler et al. 2019 give -1 to continuations without a period; Huang et al. 2023 call this
    the "EOS trick": fixed-length sampling can then still teach the policy to end its response.
    `None` keeps the RM score (read at the last token) for truncated responses.
    """
    if no_eos_score is None:
        return scores
    return jnp.where(ended, scores, jnp.asarray(no_eos_score, scores.dtype))


def compute_rewards(scores: jax.Array, logp: jax.Array, logp_ref: jax.Array,
                    response_mask: jax.Array, beta: jax.Array | float, *,
                    kl_in_reward: bool = True) -> tuple[jax.Array, jax.Array]:
    """Per-token rewards [B, N]: -beta * k1 at every response token plus the score at the last.

    Ziegler et al. 2019 / Huang et al. 2023: the KL penalty is the per-token k1 estimate
    (log pi - log pi_ref, unbiased for the sequence KL) and the sequence-level RM score is added
    at the last response token (the EOS). Padding gets reward 0. Returns (rewards, kl_k1 [B, N]).
    With `kl_in_reward=False` the KL term is left to the loss (`kl_mode="loss"`).
    """
    m = response_mask.astype(jnp.float32)
    kl = (logp - logp_ref) * m
    rewards = -beta * kl if kl_in_reward else jnp.zeros_like(kl)
    last = last_token_index(response_mask)
    place = jax.nn.one_hot(last, response_mask.shape[-1], dtype=rewards.dtype)
    rewards = rewards + place * scores[:, None].astype(rewards.dtype)
    return rewards * m, kl


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al. 2016) in a reverse `lax.scan`.

    rewards, values, mask: [B, N] over response tokens, mask right-padded. delta_t = r_t +
    gamma V_{t+1} - V_t with V = 0 after the last real token (the episode ends there), and
    A_t = delta_t + gamma lam A_{t+1}. Returns (advantages, returns = advantages + values), both 0
    on padding.
    """
    m = mask.astype(jnp.float32)
    values = values * m
    rewards = rewards * m
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = (rewards + gamma * next_values - values) * m

    def step(next_adv, xs):
        delta, mt = xs
        adv = (delta + gamma * lam * next_adv) * mt
        return adv, adv

    # Scan over time (axis 1) backwards; carry is A_{t+1} per row.
    _, adv_t = jax.lax.scan(step, jnp.zeros_like(deltas[:, 0]), (deltas.T, m.T), reverse=True)
    advantages = adv_t.T
    return advantages, (advantages + values) * m


def adaptive_beta(beta: jax.Array | float, kl: jax.Array | float, n_steps: int, target: float,
                  horizon: float) -> jax.Array:
    """Ziegler et al. 2019's adaptive KL controller (lm-human-preferences `AdaptiveKLController`).

    e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n_steps / horizon), where KL is
    the batch mean of the sequence KL and n_steps the number of episodes in the batch.
    """
    err = jnp.clip(jnp.asarray(kl, jnp.float32) / target - 1.0, -0.2, 0.2)
    return jnp.asarray(beta, jnp.float32) * (1.0 + err * n_steps / horizon)


def minibatch_indices(key: jax.Array, update: jax.Array | int, epoch: jax.Array | int,
                      batch_size: int, num_minibatches: int) -> jax.Array:
    """Row indices [num_minibatches, batch_size // num_minibatches] for one PPO epoch.

    A fresh permutation for every (update, epoch): `fold_in(fold_in(key, update), epoch)`, so
    minibatches are reshuffled each epoch (Huang et al. 2023) and never repeat across updates
    (DESIGN.md pitfall 7).
    """
    if batch_size % num_minibatches:
        raise ValueError(f"batch_size={batch_size} is not divisible by num_minibatches={num_minibatches}")
    k = jax.random.fold_in(jax.random.fold_in(key, update), epoch)
    return jax.random.permutation(k, batch_size).reshape(num_minibatches, -1)


# ----------------------------------------------------------------------------------------------
# Losses of one minibatch.


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
                clip: float) -> tuple[jax.Array, dict]:
    """Clipped surrogate (Schulman et al. 2017), a masked token mean, plus diagnostics."""
    log_ratio = logp - old_logp
    ratio = jnp.exp(log_ratio)
    loss1 = -advantages * ratio
    loss2 = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(jnp.maximum(loss1, loss2), mask)
    stats = {
        "clipfrac": masked_mean((loss2 > loss1).astype(jnp.float32), mask),
        # k3 between the rollout policy and the current one: the usual "approx-KL" of PPO.
        "approx_kl": masked_mean(jnp.expm1(-log_ratio) + log_ratio, mask),
        "ratio_mean": masked_mean(ratio, mask),
        "ratio_max_dev": jnp.max(jnp.abs(ratio - 1.0) * mask),
    }
    return loss, stats


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
               clip: float) -> tuple[jax.Array, dict]:
    """Clipped value loss (Ziegler et al. 2019; Huang et al. 2023): 0.5 max of the squared errors
    of the new value and of the new value clipped to `old ± clip`, masked token mean."""
    clipped = old_values + jnp.clip(values - old_values, -clip, clip)
    err1 = jnp.square(values - returns)
    err2 = jnp.square(clipped - returns)
    loss = 0.5 * masked_mean(jnp.maximum(err1, err2), mask)
    return loss, {"vf_clipfrac": masked_mean((err2 > err1).astype(jnp.float32), mask)}


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """1 - Var(returns - values) / Var(returns) over the masked tokens (1 = perfect critic)."""
    var_ret = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / jnp.maximum(var_ret, 1e-8)
