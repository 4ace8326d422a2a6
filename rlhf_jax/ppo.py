"""PPO against a reward model with a KL penalty to the SFT policy (InstructGPT step 3).

    python -m rlhf_jax.ppo --config=configs/ppo_sim.py

Objective (Ouyang et al. 2022, eq. 2; Ziegler et al. 2019):

    E_{x, y~pi}[ r(x, y) - beta * log(pi(y|x) / pi_SFT(y|x)) ]
        + gamma_ptx * E_{x~D_pretrain}[ log pi(x) ]

This file holds the whole algorithm: the math (pure functions of arrays, tested against plain
references in tests/test_ppo_math.py), the rollout (sampler -> reference / value / reward model
passes -> per-token rewards -> GAE), the PPO update (epochs x minibatches in one jitted scan) and
`run(config)`, which wires them into the shared `Trainer` loop.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rlhf_jax import (config_utils, evaluation, models, onpolicy, optim, rewards, sampling,
                      sharding)
from rlhf_jax import trainer as trainer_lib
from rlhf_jax.errors import UserError
from rlhf_jax.ops import (kl_estimators, lm_loss_sums, masked_mean, masked_var, masked_whiten,
                          response_logprobs)
from rlhf_jax.rewards import apply_eos_trick
from rlhf_jax.rng import Purpose, StepUse, step_key

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


def minibatch_indices(key: jax.Array, update: jax.Array | int, epoch: jax.Array | int,
                      batch_size: int, num_minibatches: int) -> jax.Array:
    """Row indices [num_minibatches, batch_size // num_minibatches] for one PPO epoch.

    A fresh permutation for every (update, epoch): `fold_in(fold_in(key, update), epoch)`, so
    minibatches are reshuffled each epoch (Huang et al. 2023) and never repeat across updates
    (DESIGN.md pitfall 7).
    """
    if batch_size % num_minibatches:
        raise ValueError(f"batch_size={batch_size} is not divisible by "
                         f"num_minibatches={num_minibatches}")
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
class Settings:
    """Static hyper-parameters and model configs of one PPO run (hashable: jitted code closes
    over it, so changing any of them recompiles and nothing else does)."""

    policy: models.ModelConfig
    reward: models.ModelConfig
    # Config of a separate value network (initialised from the RM), or None for a value head on
    # the policy trunk.
    value: models.ModelConfig | None = None
    reward_gain: float = 1.0  # the RM checkpoint's `reward_norm`
    reward_bias: float = 0.0
    max_new_tokens: int = 20
    temperature: float = 0.7
    eos_id: int = 1
    pad_id: int = 0
    no_eos_score: float | None = -1.0
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


def reference_logprobs(s: Settings, ref_params: dict, tokens, mask, positions, prompt_len: int):
    """log pi_ref of the response tokens, also under logits / T (Ziegler et al. 2019)."""
    return response_logprobs(s.policy, ref_params, tokens, mask, positions, prompt_len,
                             temperature=s.temperature)["logp"]


def rollout(s: Settings, params: dict, ref_params: dict, rm_params: dict,
            prompt_tokens: jax.Array, prompt_mask: jax.Array, rng: jax.Array,
            beta: jax.Array) -> tuple[dict, dict, dict]:
    """Sample responses and turn them into PPO training data (one jitted program).

    Returns (batch, rows, metrics): `batch` is what `update` trains on (sequences, masks,
    rollout log-probs / values, advantages, returns), `rows` per-row results for the host
    (response tokens, lengths, ended, RM score, sequence KL) and `metrics` batch means.
    """
    P = prompt_tokens.shape[1]
    # Fixed-length sampling through the KV-cache sampler; after the first EOS everything is pad
    # with mask 0 (the EOS trick, Huang et al. 2023).
    out = sampling.generate(s.policy, params["policy"], prompt_tokens, prompt_mask, rng,
                            max_new_tokens=s.max_new_tokens, eos_id=s.eos_id, pad_id=s.pad_id,
                            temperature=s.temperature)
    tokens, mask, positions = out.sequence_tokens, out.sequence_mask, out.sequence_positions
    rmask = out.mask
    m = rmask.astype(jnp.float32)
    # The trainer recomputes log-probs rather than trusting the sampler's (Huang et al. 2023):
    # PPO's ratio must compare like with like; the gap is logged as `logprob_diff_max`.
    logp, entropy, values = policy_pass(s, params, tokens, mask, positions, P)
    ref_logp = reference_logprobs(s, ref_params, tokens, mask, positions, P)
    # Normalised RM score read at the EOS / last real token (rm.reward_index).
    rm_score = rewards.score_sequences(s.reward, rm_params, tokens, mask,
                                       {"gain": s.reward_gain, "bias": s.reward_bias})
    score = apply_eos_trick(rm_score, out.ended, s.no_eos_score)
    token_rewards, kl = compute_rewards(score, logp, ref_logp, rmask, beta,
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
    k3_seq = jnp.sum(kl_estimators(logp, ref_logp)["k3"] * m, axis=1)
    batch = {
        "tokens": tokens, "mask": mask, "positions": positions, "response_mask": rmask,
        "old_logp": logp, "ref_logp": ref_logp, "old_values": values,
        "advantages": advantages, "returns": returns,
    }
    rows = {"response_tokens": out.tokens, "response_mask": rmask, "lengths": out.lengths,
            "ended": out.ended, "rm_score": rm_score, "score": score, "kl": kl_seq}
    metrics = {
        "rm_score": jnp.mean(rm_score),
        "score": jnp.mean(score),  # after the EOS trick: what enters the reward
        "kl": jnp.mean(kl_seq),  # sequence k1 (sum over tokens), batch mean
        "kl_k3": jnp.mean(k3_seq),
        # The KL part of the reward (0 when the KL is in the loss instead).
        "non_score_reward": (-beta * jnp.mean(kl_seq) if s.kl_mode == "reward"
                             else jnp.zeros((), jnp.float32)),
        "return": jnp.mean(raw_return),
        "entropy": masked_mean(entropy, rmask),
        "response_length": jnp.mean(out.lengths.astype(jnp.float32)),
        "eos_rate": jnp.mean(out.ended.astype(jnp.float32)),
        # Sampler (KV cache, one token at a time) vs trainer (teacher-forced) log-probs.
        "logprob_diff_max": jnp.max(jnp.abs(out.logprobs - logp) * m),
        "value_error": masked_mean(jnp.square(values - returns), rmask),
        "explained_variance": explained_variance(values, returns, rmask),
        "value_mean": masked_mean(values, rmask),
        "advantage_std": adv_std,
    }
    return batch, rows, metrics


# Jitted with the settings static, so runs in one process with equal settings (a resumed run, the
# evaluation of SFT and PPO policies) share one compiled rollout.
_rollout_jit = jax.jit(rollout, static_argnums=(0,))


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
    """`s.epochs` passes over one rollout batch, `s.minibatches` optimizer steps each, in one
    `lax.scan` (compiled once). Minibatches are a fresh permutation per (update, epoch).

    `ptx` (PPO-ptx) holds `s.minibatches * k` LM rows; minibatch j of every epoch uses rows
    j*k .. (j+1)*k. Returns (params, opt_state, metrics averaged over all minibatch steps, plus
    `ratio_first_max_dev`: max |ratio - 1| on the first minibatch of the first epoch, 0 up to
    float32 rounding (~1e-7) when rollout and update compute the same log-probs).

    `batch_sharding` (the trainer's, `sharding.batch_sharding(mesh, rules)`) splits every
    minibatch over the mesh's batch axes, so each device computes its rows and the gradient is
    all-reduced. Without it, the random-index gather of a minibatch leaves it replicated and
    every device computes the whole minibatch. The numbers do not depend on it.
    """
    B = batch["tokens"].shape[0]
    n_mb = s.minibatches
    if ptx is not None:
        rows = jax.tree.leaves(ptx)[0].shape[0]
        if rows % n_mb:
            raise ValueError(f"ptx batch of {rows} rows is not divisible by "
                             f"config.ppo.minibatches={n_mb}")
        ptx = jax.tree.map(lambda x: x.reshape((n_mb, rows // n_mb) + x.shape[1:]), ptx)
    grad_fn = jax.value_and_grad(functools.partial(ppo_loss, s), has_aux=True)

    def minibatch_step(carry, xs):
        params, opt_state = carry
        idx, j = xs
        mb = sharding.split_rows(jax.tree.map(lambda x: x[idx], batch), batch_sharding)
        ptx_mb = None if ptx is None else sharding.split_rows(
            jax.tree.map(lambda x: x[j], ptx), batch_sharding)
        (loss, stats), grads = grad_fn(params, mb, ptx_mb, beta)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state), {**stats, "loss": loss, "grad_norm": optax.tree.norm(grads)}

    def epoch(carry, e):
        idx = minibatch_indices(shuffle_key, update_index, e, B, n_mb)
        return jax.lax.scan(minibatch_step, carry, (idx, jnp.arange(n_mb)))

    (params, opt_state), stats = jax.lax.scan(epoch, (params, opt_state), jnp.arange(s.epochs))
    metrics = {k: jnp.mean(v) for k, v in stats.items() if k != "ratio_max_dev"}
    metrics["ratio_first_max_dev"] = stats["ratio_max_dev"][0, 0]
    metrics["approx_kl_last_epoch"] = jnp.mean(stats["approx_kl"][-1])
    return params, opt_state, metrics




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
    """PPO fields, checked before anything loads or compiles (the Trainer checks the rest)."""
    config_utils.check_choice(config, "value_from", VALUE_FROM)
    for field, what in (("init_from", "SFT"), ("reward_from", "reward model")):
        if not config[field]:
            raise UserError(f"config.{field}", "is empty",
                            f"give the work dir of the {what} stage (--config.{field}=<dir>)")
    check = functools.partial(config_utils.check_number, config)
    check("rollout.max_new_tokens", int)
    check("rollout.temperature")
    check("ppo.epochs", int)
    check("ppo.minibatches", int)
    if config.train.batch_size % config.ppo.minibatches:
        raise UserError("config.train.batch_size", f"{config.train.batch_size} episodes per "
                        f"update do not split into config.ppo.minibatches="
                        f"{config.ppo.minibatches}", "use a multiple of the minibatch count")
    if config.train.accum_steps != 1:
        raise UserError("config.train.accum_steps", f"{config.train.accum_steps} is not 1",
                        "PPO minibatches with config.ppo.minibatches")
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
    check("eval.num_prompts", int)
    evaluation.get_judges(tuple(config.eval.judges))
    if config.eval.gold and config.eval.gold not in config.eval.judges:
        raise UserError("config.eval.gold", f"{config.eval.gold!r} is not one of "
                        f"config.eval.judges={tuple(config.eval.judges)}", "or set '' for none")


def settings_from_config(config, policy: models.ModelConfig, reward: models.ModelConfig,
                         reward_norm: Mapping | None, eos_id: int, pad_id: int) -> Settings:
    norm = reward_norm or {"gain": 1.0, "bias": 0.0}
    return Settings(
        policy=policy, reward=reward, value=reward if config.value_from == "rm" else None,
        reward_gain=float(norm["gain"]), reward_bias=float(norm["bias"]),
        max_new_tokens=int(config.rollout.max_new_tokens),
        temperature=float(config.rollout.temperature), eos_id=int(eos_id), pad_id=int(pad_id),
        no_eos_score=float(config.rollout.no_eos_score) if config.rollout.eos_trick else None,
        kl_mode=config.kl.mode, kl_loss_estimator=config.kl.loss_estimator,
        gamma=float(config.ppo.gamma), lam=float(config.ppo.lam),
        whiten_rewards=bool(config.ppo.whiten_rewards),
        whiten_advantages=bool(config.ppo.whiten_advantages),
        epochs=int(config.ppo.epochs), minibatches=int(config.ppo.minibatches),
        clip=float(config.ppo.clip), value_clip=float(config.ppo.value_clip),
        vf_coef=float(config.ppo.vf_coef), ent_coef=float(config.ppo.ent_coef),
        ptx_coef=float(config.ptx.coef),
    )


def run(config) -> dict:
    """Train a policy with PPO against the RM in `config.reward_from`, starting from (and
    KL-regularised towards) the SFT policy in `config.init_from`. Returns the run summary."""
    validate_config(config)
    tr = trainer_lib.Trainer(config, "ppo")
    m = onpolicy.load_models(config, tr)
    s = settings_from_config(config, m.policy.cfg, m.reward.cfg, m.reward.reward_norm,
                             m.eos_id, m.pad_id)
    B = int(config.train.batch_size)

    # Value model: a separate network initialised from the RM, or a zero head on the policy.
    policy_axes = models.param_axes(s.policy, ("lm",))
    if config.value_from == "rm":
        value = value_params_from_rm(m.reward.params, s.reward_gain, s.reward_bias)
        value_axes = models.param_axes(s.reward, ("score",))
    else:
        value = {"score_head": zero_value_head(s.policy)}
        value_axes = {"score_head": models.param_axes(s.policy, ("lm", "score"))["score_head"]}
    # The schedule counts optimizer steps (epochs x minibatches per update); warmup is given in
    # updates like every other `train` count.
    per_update = s.epochs * s.minibatches
    optim_cfg = ml_collections.ConfigDict(config.optim.to_dict())
    optim_cfg.warmup_steps = int(config.optim.warmup_steps) * per_update
    optimizer = optim.make_optimizer(optim_cfg, int(config.train.steps) * per_update)
    state, _ = tr.create_state({"policy": m.policy.params, "value": value},
                               {"policy": policy_axes, "value": value_axes}, optimizer,
                               extra={"beta": jnp.asarray(config.kl.beta, jnp.float32)})
    # Frozen trees: the SFT reference and the RM, placed once, jit arguments of every rollout.
    frozen = {"ref": m.policy.params, "rm": m.reward.params}

    ptx_rows = s.minibatches * int(config.ptx.rows_per_minibatch) if s.ptx_coef > 0 else 0
    batches, train_texts, eval_texts = onpolicy.prompt_data(config, m.tokenizer, B, ptx_rows)
    judge = onpolicy.RolloutJudge(config.eval, m.tokenizer, train_texts)
    policy_eval = onpolicy.policy_eval(config, m, eval_texts, tr)

    # Jitted pieces, each compiled once (fixed shapes): rollout (sampler + passes + GAE) and the
    # whole PPO update. Params / optimizer state keep the trainer's shardings.
    rollout_jit = functools.partial(_rollout_jit, s)
    update_jit = jax.jit(functools.partial(update, s, optimizer,
                                           batch_sharding=tr.batch_sharding),
                         donate_argnums=(0, 1),
                         out_shardings=(tr.state_shardings.params,
                                        tr.state_shardings.opt_state, tr.replicated))
    shuffle_key = tr.key(Purpose.SHUFFLE)
    k = config.kl

    def step_fn(state, frozen, batch, key):
        t0 = time.perf_counter()
        beta = state.extra["beta"]
        data, rows, metrics = rollout_jit(state.params, frozen["ref"], frozen["rm"],
                                          batch["prompt_tokens"], batch["prompt_mask"],
                                          step_key(key, StepUse.SAMPLE), beta)
        ptx = {kk[4:]: v for kk, v in batch.items() if kk.startswith("ptx_")} or None
        params, opt_state, upd = update_jit(state.params, state.opt_state, data, ptx, beta,
                                            shuffle_key, state.step)
        # While the update runs: decode and judge the rollout on the host.
        gold = judge(batch["prompt_index"], rows["response_tokens"], rows["response_mask"])
        # Ziegler et al. 2019's controller: n_steps = episodes in this batch.
        new_beta = adaptive_beta(beta, metrics["kl"], B, k.target, k.horizon) if k.adaptive \
            else beta
        out = {**metrics, **upd, **gold, "beta": beta}
        jax.block_until_ready(upd)
        out["time/update_s"] = time.perf_counter() - t0
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             extra={"beta": new_beta}), out

    def evaluate(policy_params, step):
        # Fixed prompts and sampling key, at the rollout temperature (what PPO optimises).
        metrics, rows = policy_eval(s.policy, policy_params, tr.key(Purpose.POLICY_EVAL))
        policy_eval.write_table(tr.workdir, step, rows, metrics)
        return metrics, rows

    # The SFT policy's numbers on the eval prompts (step 0 of the curves; the win-rate baseline).
    sft = evaluate(m.policy.params, 0)
    if int(jax.device_get(state.step)) == 0:
        tr.writer.write(0, {f"eval/{kk}": v for kk, v in sft[0].items()})
    last: list = []

    def eval_fn(st):
        last[:] = [evaluate(st.params["policy"], int(jax.device_get(st.step)))]
        return last[0][0]

    tr.metadata.update(model_config=s.policy.to_dict(), tokenizer_dir=m.tokenizer_dir,
                       init_from=str(config.init_from), reward_from=str(config.reward_from))
    state = tr.fit(state, step_fn, batches, eval_fn=eval_fn, jit=False, frozen=frozen,
                   final_params=lambda st: st.params["policy"],
                   finite_metrics=("loss", "kl", "rm_score", "grad_norm", "beta"))
    summary = onpolicy.summarize(policy_eval, sft, last[0] if last else None, "ppo")
    summary.update(beta=float(jax.device_get(state.extra["beta"])),
                   episodes=int(jax.device_get(state.step)) * B)
    tr.write_summary(summary)
    tr.close()
    return dict(tr.summary)


if __name__ == "__main__":
    config_utils.run_stage(run, ("sft", "ppo", "win_rate_vs_sft", "beta"))
