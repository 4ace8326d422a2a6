"""PPO against a reward model with a KL penalty to the SFT policy (InstructGPT step 3).

    python -m rlhf_jax.ppo --config=configs/ppo_sim.py

Objective (Ouyang et al. 2022, eq. 2; Ziegler et al. 2019):

    E_{x, y~pi}[ r(x, y) - beta * log(pi(y|x) / pi_SFT(y|x)) ]
        + gamma_ptx * E_{x~D_pretrain}[ log pi(x) ]

This file holds what is PPO's own: the math (pure functions of arrays, tested against plain
references in tests/test_ppo_math.py), the rollout (the shared front half of `rlhf_jax.rollout`:
sampler -> policy / value pass -> reference -> RM -> EOS trick; then per-token rewards and GAE),
the loss of one minibatch and its update (`rollout.update_epochs`), the value model's
initialisation, and `build`, PPO's part of the on-policy stage driver (`onpolicy.run`): policy
and value trained, beta in the checkpointed state, the adaptive KL controller after each update.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import config_utils, models, onpolicy, rewards
from rlhf_jax import rollout as rollout_lib
from rlhf_jax.errors import UserError
from rlhf_jax.ops import (kl_estimators, lm_loss_sums, masked_mean, masked_var, masked_whiten,
                          response_logprobs)

# ----------------------------------------------------------------------------------------------
# Rewards, returns, advantages.


def last_token_index(response_mask: jax.Array) -> jax.Array:
    """Index of each response's last real token (its EOS, or its last token when cut).

    The one reward-reading rule of the project, `rewards.reward_index`, applied to the response mask,
    so the per-token reward lands where the RM read its score (pitfall 1). Rows with an empty
    mask get index 0.
    """
    return rewards.reward_index(response_mask)


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
    r = -beta * kl if kl_in_reward else jnp.zeros_like(kl)
    last = last_token_index(response_mask)
    place = jax.nn.one_hot(last, response_mask.shape[-1], dtype=r.dtype)
    r = r + place * scores[:, None].astype(r.dtype)
    return r * m, kl


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
        # k3 estimate of KL(pi_old || pi) on the rollout's samples: (r - 1) - log r.
        "approx_kl": masked_mean(jnp.expm1(log_ratio) - log_ratio, mask),
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


# ----------------------------------------------------------------------------------------------
# The stage: static settings, model passes over rollout sequences, rollout, update.

log = logging.getLogger(__name__)

KL_MODES = ("reward", "loss")
KL_ESTIMATORS = ("k1", "k2", "k3")
VALUE_FROM = ("rm", "policy_head")


@dataclasses.dataclass(frozen=True)
class Settings(rollout_lib.Settings):
    """Static hyper-parameters of one PPO run: the shared on-policy fields (`rollout.Settings`)
    and PPO's own (hashable: jitted code closes over it, so changing any of them recompiles and
    nothing else does)."""

    # Config of a separate value network (initialised from the RM), or None for a value head on
    # the policy trunk.
    value: models.ModelConfig | None = None
    kl_mode: str = "reward"
    kl_loss_estimator: str = "k3"
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    whiten_advantages: bool = True
    epochs: int = 4
    minibatches: int = 4
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    ptx_coef: float = 0.0

    def __post_init__(self):
        if self.kl_mode not in KL_MODES:
            raise ValueError(f"config.kl.mode={self.kl_mode!r} must be one of {KL_MODES}")
        if self.kl_loss_estimator not in KL_ESTIMATORS:
            raise ValueError(f"config.kl.loss_estimator={self.kl_loss_estimator!r} must be one "
                             f"of {KL_ESTIMATORS}")
        if not self.temperature > 0:
            raise ValueError(f"config.rollout.temperature={self.temperature} must be > 0: PPO "
                             "needs the sampling distribution's log-probs (logits / T)")


def _with_value_head(s: Settings, params: dict) -> dict:
    """Policy params with the value head attached when the value is a head on the policy trunk,
    so one forward pass gives both logits and values (models.forward adds `scores`)."""
    if s.value is not None:
        return params["policy"]
    return {**params["policy"], "score_head": params["value"]["score_head"]}


def policy_pass(s: Settings, params: dict, tokens: jax.Array, mask: jax.Array,
                positions: jax.Array, prompt_len: int):
    """Teacher-forced pass over prompt + response ([B, P + N]) -> per response token [B, N]:
    log-probs of the sampled tokens under logits / T, entropy of that distribution, values.

    Row t of the outputs is read at sequence position P - 1 + t, the position whose logits
    predict response token t (and whose value estimates the return from token t on); only those
    N positions go through the LM head (`ops.response_logprobs`). Log-probs use logits divided
    by the sampling temperature (Ziegler et al. 2019; Huang et al. 2023), so they match the
    sampler's and the PPO ratio starts at 1 (up to float32 rounding). With the value head on the
    policy trunk, the value loss also trains the trunk.
    """
    out = response_logprobs(s.policy, _with_value_head(s, params), tokens, mask, positions,
                            prompt_len, temperature=s.temperature, with_entropy=True)
    if s.value is None:
        values = out["scores"]
    else:
        values = models.forward(s.value, params["value"], tokens, positions, mask,
                                want_logits=False)["scores"][:, prompt_len - 1:-1]
    return out["logp"], out["entropy"], values


def rollout(s: Settings, params: dict, ref_params: dict, rm_params: dict,
            prompt_tokens: jax.Array, prompt_mask: jax.Array, rng: jax.Array,
            beta: jax.Array) -> tuple[dict, dict, dict]:
    """Sample responses and turn them into PPO training data (one jitted program).

    Returns (batch, rows, metrics): `batch` is what `update` trains on (sequences, masks,
    rollout log-probs / values, advantages, returns), `rows` per-row results for the host
    (response tokens, lengths, ended, RM score, sequence KL) and `metrics` batch means.
    """
    # The shared front half: sample, the policy / value pass, reference, RM score, EOS trick.
    r = rollout_lib.sample_and_score(
        s, params["policy"], functools.partial(policy_pass, s, params), ref_params, rm_params,
        prompt_tokens, prompt_mask, rng)
    logp, entropy, values = r.policy
    rmask = r.response_mask
    token_rewards, kl = compute_rewards(r.score, logp, r.ref_logp, rmask, beta,
                                        kl_in_reward=s.kl_mode == "reward")
    raw_return = jnp.sum(token_rewards, axis=1)
    if s.whiten_rewards:
        # Ziegler et al. 2019 whiten rewards (scale only) so the value scale stays ~1.
        token_rewards = masked_whiten(token_rewards, rmask, shift_mean=False)
    advantages, returns = gae(token_rewards, values, rmask, s.gamma, s.lam)
    adv_std = jnp.sqrt(masked_var(advantages, rmask))
    if s.whiten_advantages:
        # Over the whole (global) rollout batch, so the numbers do not depend on the mesh.
        advantages = masked_whiten(advantages, rmask)
    kl_seq = jnp.sum(kl, axis=1)
    batch = {
        "tokens": r.tokens, "mask": r.mask, "positions": r.positions, "response_mask": rmask,
        "old_logp": logp, "ref_logp": r.ref_logp, "old_values": values,
        "advantages": advantages, "returns": returns,
    }
    rows = {"response_tokens": r.out.tokens, "response_mask": rmask, "lengths": r.out.lengths,
            "ended": r.out.ended, "rm_score": r.rm_score, "score": r.score, "kl": kl_seq}
    metrics = rollout_lib.rollout_metrics(r, logp, entropy, kl_seq, raw_return,
                                          beta if s.kl_mode == "reward" else None)
    metrics.update({
        "value_error": masked_mean(jnp.square(values - returns), rmask),
        "explained_variance": explained_variance(values, returns, rmask),
        "value_mean": masked_mean(values, rmask),
        "advantage_std": adv_std,
    })
    return batch, rows, metrics


# Jitted with the settings static, so runs in one process with equal settings (a resumed run,
# tests) share one compiled rollout.
_rollout_jit = jax.jit(rollout, static_argnums=(0,))


def ppo_loss(s: Settings, params: dict, mb: dict, ptx: dict | None, beta: jax.Array):
    """Loss of one minibatch: clipped policy loss + vf_coef * clipped value loss
    [- ent_coef * entropy] [+ beta * KL (kl_mode="loss")] [+ ptx_coef * LM loss (PPO-ptx)]."""
    P = mb["tokens"].shape[1] - mb["response_mask"].shape[1]
    m = mb["response_mask"]
    logp, entropy, values = policy_pass(s, params, mb["tokens"], mb["mask"], mb["positions"], P)
    pg, stats = policy_loss(logp, mb["old_logp"], mb["advantages"], m, s.clip)
    vf, vstats = value_loss(values, mb["old_values"], mb["returns"], m, s.value_clip)
    ent = masked_mean(entropy, m)
    loss = pg + s.vf_coef * vf - s.ent_coef * ent
    stats = {**stats, **vstats, "pg_loss": pg, "vf_loss": vf, "entropy_update": ent}
    if s.kl_mode == "loss":
        # KL as a loss term (GRPO-style) instead of in the reward. Note the bias (DESIGN.md
        # pitfall 5): on-policy, the gradient of mean k3 is that of KL(pi_ref || pi), of k1 is 0
        # in expectation; k2's equals the gradient of KL(pi || pi_ref).
        kl_tok = kl_estimators(logp, mb["ref_logp"])[s.kl_loss_estimator]
        kl_loss = masked_mean(kl_tok, m)
        loss = loss + beta * kl_loss
        stats["kl_loss"] = kl_loss
    if ptx is not None:
        # PPO-ptx (Ouyang et al. 2022, eq. 2): next-token loss on pretraining text keeps the
        # "alignment tax" down. Token mean over this minibatch's ptx rows.
        nll, sums = lm_loss_sums(s.policy, params["policy"], ptx)
        ptx_loss = nll / jnp.maximum(sums["count"], 1.0)
        loss = loss + s.ptx_coef * ptx_loss
        stats["ptx_loss"] = ptx_loss
    return loss, stats


def update(s: Settings, optimizer: optax.GradientTransformation, params: dict, opt_state,
           batch: dict, ptx: dict | None, beta: jax.Array, shuffle_key: jax.Array,
           update_index: jax.Array, *,
           batch_sharding: jax.sharding.NamedSharding | None = None) -> tuple[dict, Any, dict]:
    """`s.epochs` passes over one rollout batch, `s.minibatches` optimizer steps each
    (`rollout.update_epochs`: one `lax.scan`, a fresh permutation per (update, epoch), each
    minibatch split over the mesh by `batch_sharding`).

    `ptx` (PPO-ptx) holds `s.minibatches * k` LM rows; minibatch j of every epoch uses rows
    j*k .. (j+1)*k. Returns (params, opt_state, metrics averaged over all minibatch steps, plus
    `ratio_first_max_dev` and `approx_kl_last_epoch`, see `rollout.reduce_update_stats`).
    """
    n_mb = s.minibatches
    if ptx is not None:
        rows = jax.tree.leaves(ptx)[0].shape[0]
        if rows % n_mb:
            raise ValueError(f"ptx batch of {rows} rows is not divisible by "
                             f"config.ppo.minibatches={n_mb}")
        ptx = jax.tree.map(lambda x: x.reshape((n_mb, rows // n_mb) + x.shape[1:]), ptx)
    loss_fn = lambda p, mb, ptx_mb: ppo_loss(s, p, mb, ptx_mb, beta)  # noqa: E731
    params, opt_state, stats = rollout_lib.update_epochs(
        loss_fn, optimizer, params, opt_state, batch, shuffle_key, update_index,
        epochs=s.epochs, minibatches=n_mb, per_minibatch=ptx, batch_sharding=batch_sharding)
    return params, opt_state, rollout_lib.reduce_update_stats(stats)


# ----------------------------------------------------------------------------------------------
# Value model initialisation (head remapping).


def value_params_from_rm(rm_params: dict, gain: float, bias: float) -> dict:
    """A value network initialised from the RM (Ouyang et al. 2022; Huang et al. 2023), with the
    RM's normalisation folded into its head so the initial values are on the reward's scale.
    Array ops, so params on a mesh stay there."""
    head = rm_params["score_head"]
    kernel = head["kernel"] * jnp.asarray(gain, head["kernel"].dtype)
    bias_ = (head["bias"] * gain + bias).astype(head["bias"].dtype)
    return {**rm_params, "score_head": {"kernel": kernel, "bias": bias_}}


def zero_value_head(cfg: models.ModelConfig) -> dict:
    """Zero-initialised value head on the policy trunk (Huang et al. 2023: value head zero-init)."""
    shapes = models.abstract_params(cfg, ("lm", "score"))["score_head"]
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


# ----------------------------------------------------------------------------------------------
# The stage.


def validate_config(config) -> None:
    """PPO fields, checked before anything loads or compiles (the shared on-policy ones by
    `onpolicy.validate_config`, the training ones by the Trainer)."""
    config_utils.check_choice(config, "value_from", VALUE_FROM)
    onpolicy.validate_config(config, "ppo")
    check = functools.partial(config_utils.check_number, config)
    for name in ("clip", "value_clip"):
        check(f"ppo.{name}")
    for name in ("vf_coef", "ent_coef"):
        check(f"ppo.{name}", strict=False)
    for name in ("gamma", "lam"):
        check(f"ppo.{name}", strict=False, upper=1.0)
    k = config.kl
    config_utils.check_choice(config, "kl.mode", KL_MODES)
    config_utils.check_choice(config, "kl.loss_estimator", KL_ESTIMATORS)
    check("kl.beta", strict=False)
    if k.adaptive:
        check("kl.target")
        check("kl.horizon")
        if k.beta == 0:
            raise UserError("config.kl.beta", "is 0 with config.kl.adaptive=True",
                            "the controller multiplies beta, so start from beta > 0")
    check("ptx.coef", strict=False)
    if config.ptx.coef > 0:
        check("ptx.rows_per_minibatch", int)
        check("ptx.seq_len", int)


def settings_from_config(config, policy: models.ModelConfig, reward: models.ModelConfig,
                         reward_norm: Mapping | None, eos_id: int, pad_id: int) -> Settings:
    p = config.ppo
    return Settings(
        **rollout_lib.settings_fields(config, "ppo", policy, reward, reward_norm, eos_id, pad_id),
        value=reward if config.value_from == "rm" else None,
        kl_mode=config.kl.mode, kl_loss_estimator=config.kl.loss_estimator,
        gamma=float(p.gamma), lam=float(p.lam), whiten_rewards=bool(p.whiten_rewards),
        whiten_advantages=bool(p.whiten_advantages), clip=float(p.clip),
        value_clip=float(p.value_clip), vf_coef=float(p.vf_coef), ent_coef=float(p.ent_coef),
        ptx_coef=float(config.ptx.coef))


def build(config, m: onpolicy.Models, tr) -> onpolicy.Method:
    """PPO's part of the stage: policy + value trained, beta in the checkpointed state and
    Ziegler et al.'s controller after each update."""
    s = settings_from_config(config, m.policy.cfg, m.reward.cfg, m.reward.reward_norm,
                             m.eos_id, m.pad_id)
    B, k = int(config.train.batch_size), config.kl
    # Value model: a separate network initialised from the RM, or a zero head on the policy.
    if config.value_from == "rm":
        value = value_params_from_rm(m.reward.params, s.reward_gain, s.reward_bias)
        value_axes = models.param_axes(s.reward, ("score",))
    else:
        value = {"score_head": zero_value_head(s.policy)}
        value_axes = {"score_head": models.param_axes(s.policy, ("lm", "score"))["score_head"]}

    def after_update(extra, metrics):
        # Ziegler et al. 2019's controller: n_steps = episodes in this batch.
        beta = extra["beta"]
        new = adaptive_beta(beta, metrics["kl"], B, k.target, k.horizon) if k.adaptive else beta
        return {"beta": new}, {"beta": beta}

    return onpolicy.Method(
        settings=s, params={"policy": m.policy.params, "value": value},
        axes={"policy": models.param_axes(s.policy, ("lm",)), "value": value_axes},
        extra={"beta": jnp.asarray(k.beta, jnp.float32)},
        rollout=lambda params, frozen, b, key, extra: _rollout_jit(
            s, params, frozen["ref"], frozen["rm"], b["prompt_tokens"], b["prompt_mask"], key,
            extra["beta"]),
        update=lambda opt, params, opt_state, data, ptx, extra, *a, **kw: update(
            s, opt, params, opt_state, data, ptx, extra["beta"], *a, **kw),
        ptx_rows=s.minibatches * int(config.ptx.rows_per_minibatch) if s.ptx_coef > 0 else 0,
        after_update=after_update, policy_of=lambda params: params["policy"],
        summary=lambda st: {"beta": float(jax.device_get(st.extra["beta"])),
                            "episodes": int(jax.device_get(st.step)) * B},
        finite_metrics=("loss", "kl", "rm_score", "grad_norm", "beta"))


def run(config) -> dict:
    """Train a policy with PPO against the RM in `config.reward_from`, starting from (and
    KL-regularised towards) the SFT policy in `config.init_from`. Returns the run summary."""
    validate_config(config)
    return onpolicy.run(config, "ppo", build)


if __name__ == "__main__":
    config_utils.run_stage(run, ("sft", "ppo", "win_rate_vs_sft", "beta"))
