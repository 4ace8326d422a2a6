"""What every on-policy method computes the same way inside its jitted rollout and update.

* `Settings`: the static fields every on-policy method shares (model configs, the RM's
  normalisation, sampling, EOS trick, epochs x minibatches); a method's own `Settings`
  subclasses it.
* `sample_and_score`: the front half of a rollout: sample responses from the policy, the
  policy's (trainer-side) pass, reference log-probs, the RM score and the EOS trick.
* `repeat_prompts`: K samples per prompt in K adjacent rows (critic-free groups, online DPO
  pairs).
* `rollout_metrics`: the batch means every rollout logs.
* `minibatch_indices`, `update_epochs`, `reduce_update_stats`: epochs x minibatches of optimizer
  steps over one rollout batch in one `lax.scan`, a fresh permutation per (update, epoch).

A method keeps its own math (rewards, advantages, its loss) in its own file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from rlhf_jax import models, rewards, sampling, sharding
from rlhf_jax.ops import kl_estimators, masked_mean, response_logprobs


@dataclasses.dataclass(frozen=True)
class Settings:
    """Static settings every on-policy method shares (hashable: jitted code closes over them,
    so changing one recompiles and nothing else does)."""

    policy: models.ModelConfig
    reward: models.ModelConfig
    reward_gain: float = 1.0  # the RM checkpoint's `reward_norm`
    reward_bias: float = 0.0
    max_new_tokens: int = 20
    temperature: float = 0.7
    eos_id: int = 1
    pad_id: int = 0
    no_eos_score: float | None = -1.0  # the EOS trick; None = off
    epochs: int = 1
    minibatches: int = 1


def settings_fields(config, block: str, policy: models.ModelConfig, reward: models.ModelConfig,
                    reward_norm, eos_id: int, pad_id: int) -> dict:
    """The shared `Settings` fields from `config.rollout`, `config.<block>.{epochs,minibatches}`
    and the loaded models."""
    norm = reward_norm or {"gain": 1.0, "bias": 0.0}
    r = config.rollout
    return dict(policy=policy, reward=reward, reward_gain=float(norm["gain"]),
                reward_bias=float(norm["bias"]), max_new_tokens=int(r.max_new_tokens),
                temperature=float(r.temperature), eos_id=int(eos_id), pad_id=int(pad_id),
                no_eos_score=float(r.no_eos_score) if r.eos_trick else None,
                epochs=int(config[block].epochs), minibatches=int(config[block].minibatches))


@dataclasses.dataclass
class Sample:
    """The front half of a rollout (traced arrays): `out` the sampler's output, the sequences
    ([B, P + N]) and response mask ([B, N]), `policy` whatever the method's policy pass
    returned, the reference log-probs, the normalised RM score and the score after the EOS
    trick ([B])."""

    out: Any
    tokens: jax.Array
    mask: jax.Array
    positions: jax.Array
    response_mask: jax.Array
    policy: Any
    ref_logp: jax.Array
    rm_score: jax.Array
    score: jax.Array


def repeat_prompts(prompt_tokens, prompt_mask, k: int, batch_sharding=None) -> dict:
    """Each prompt `k` times in adjacent rows (a group's rows consecutive), split over the
    mesh's batch axes."""
    return sharding.split_rows(
        {"tokens": jnp.repeat(prompt_tokens, k, axis=0),
         "mask": jnp.repeat(prompt_mask, k, axis=0)}, batch_sharding)


def sample_and_score(s: Settings, sample_params, policy_pass: Callable, ref_params, rm_params,
                     prompt_tokens: jax.Array, prompt_mask: jax.Array, rng: jax.Array) -> Sample:
    """Sample -> the policy's pass -> reference log-probs -> RM score -> EOS trick.

    `policy_pass(tokens, mask, positions, prompt_len)` is the method's teacher-forced pass over
    the sampled sequences (log-probs, and values for PPO); the trainer recomputes log-probs
    rather than trusting the sampler's (Huang et al. 2023), the gap is `logprob_diff_max`.
    """
    P = prompt_tokens.shape[1]
    # Fixed-length sampling through the KV-cache sampler; after the first EOS everything is pad
    # with mask 0 (the EOS trick, Huang et al. 2023).
    out = sampling.generate(s.policy, sample_params, prompt_tokens, prompt_mask, rng,
                            max_new_tokens=s.max_new_tokens, eos_id=s.eos_id, pad_id=s.pad_id,
                            temperature=s.temperature)
    tokens, mask, positions = out.sequence_tokens, out.sequence_mask, out.sequence_positions
    pol = policy_pass(tokens, mask, positions, P)
    # log pi_ref of the response tokens, also under logits / T (Ziegler et al. 2019).
    ref_logp = response_logprobs(s.policy, ref_params, tokens, mask, positions, P,
                                 temperature=s.temperature)["logp"]
    # Normalised RM score read at the EOS / last real token (rewards.reward_index).
    rm_score = rewards.score_sequences(s.reward, rm_params, tokens, mask,
                                       {"gain": s.reward_gain, "bias": s.reward_bias})
    score = rewards.apply_eos_trick(rm_score, out.ended, s.no_eos_score)
    return Sample(out, tokens, mask, positions, out.mask, pol, ref_logp, rm_score, score)


def rollout_metrics(r: Sample, logp: jax.Array, entropy: jax.Array, kl_seq: jax.Array,
                    returns: jax.Array, beta_in_reward=None) -> dict:
    """Batch means every rollout logs. `kl_seq` [B] is the sequence k1, `returns` [B] what the
    method's reward summed to, `beta_in_reward` the KL coefficient when the KL is in the reward
    (None: in the loss, so the non-score reward is 0)."""
    rmask = r.response_mask
    m = rmask.astype(jnp.float32)
    k3_seq = jnp.sum(kl_estimators(logp, r.ref_logp)["k3"] * m, axis=1)
    return {
        "rm_score": jnp.mean(r.rm_score),
        "score": jnp.mean(r.score),  # after the EOS trick: what enters the reward
        "kl": jnp.mean(kl_seq),  # sequence k1 (sum over tokens), batch mean
        "kl_k3": jnp.mean(k3_seq),
        # The KL part of the reward (0 when the KL is in the loss instead).
        "non_score_reward": (-beta_in_reward * jnp.mean(kl_seq) if beta_in_reward is not None
                             else jnp.zeros((), jnp.float32)),
        "return": jnp.mean(returns),
        "entropy": masked_mean(entropy, rmask),
        "response_length": jnp.mean(r.out.lengths.astype(jnp.float32)),
        "eos_rate": jnp.mean(r.out.ended.astype(jnp.float32)),
        # Sampler (KV cache, one token at a time) vs trainer (teacher-forced) log-probs.
        "logprob_diff_max": jnp.max(jnp.abs(r.out.logprobs - logp) * m),
    }


def minibatch_indices(key: jax.Array, update: jax.Array | int, epoch: jax.Array | int,
                      batch_size: int, num_minibatches: int) -> jax.Array:
    """Row indices [num_minibatches, batch_size // num_minibatches] for one epoch.

    A fresh permutation for every (update, epoch): `fold_in(fold_in(key, update), epoch)`, so
    minibatches are reshuffled each epoch (Huang et al. 2023) and never repeat across updates
    (DESIGN.md pitfall 7).
    """
    if batch_size % num_minibatches:
        raise ValueError(f"batch_size={batch_size} is not divisible by "
                         f"num_minibatches={num_minibatches}")
    k = jax.random.fold_in(jax.random.fold_in(key, update), epoch)
    return jax.random.permutation(k, batch_size).reshape(num_minibatches, -1)


def update_epochs(loss_fn: Callable, optimizer: optax.GradientTransformation, params, opt_state,
                  batch: dict, shuffle_key: jax.Array, update_index, *, epochs: int,
                  minibatches: int, per_minibatch: dict | None = None,
                  batch_sharding=None) -> tuple[Any, Any, dict]:
    """`epochs` passes over one rollout batch (leading axis: its rows, or pairs), `minibatches`
    optimizer steps each, in one `lax.scan` (compiled once); minibatches are a fresh permutation
    per (update, epoch). `loss_fn(params, minibatch, per_minibatch[j]) -> (loss, stats)`;
    `per_minibatch` (leading axis `minibatches`, e.g. PPO-ptx rows) gives minibatch j of every
    epoch its slice j.

    `batch_sharding` (the trainer's) splits every minibatch over the mesh's batch axes, so each
    device computes its rows and the gradient is all-reduced; without it the random-index
    gather leaves a minibatch replicated. The numbers do not depend on it. Returns (params,
    opt_state, stats stacked [epochs, minibatches]) with `loss` and `grad_norm` added.
    """
    B = batch["tokens"].shape[0]
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def minibatch_step(carry, xs):
        params, opt_state = carry
        idx, j = xs
        mb = sharding.split_rows(jax.tree.map(lambda x: x[idx], batch), batch_sharding)
        extra = None if per_minibatch is None else sharding.split_rows(
            jax.tree.map(lambda x: x[j], per_minibatch), batch_sharding)
        (loss, stats), grads = grad_fn(params, mb, extra)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state), {**stats, "loss": loss, "grad_norm": optax.tree.norm(grads)}

    def epoch(carry, e):
        idx = minibatch_indices(shuffle_key, update_index, e, B, minibatches)
        return jax.lax.scan(minibatch_step, carry, (idx, jnp.arange(minibatches)))

    (params, opt_state), stats = jax.lax.scan(epoch, (params, opt_state), jnp.arange(epochs))
    return params, opt_state, stats


EXTREMES = ("ratio_max_dev", "ratio_min", "ratio_max")


def reduce_update_stats(stats: dict) -> dict:
    """Per-step stats [epochs, minibatches] -> the update's metrics: means, the extreme ratios,
    `ratio_first_max_dev` (max |ratio - 1| on the first minibatch of the first epoch: 0 up to
    float32 rounding when rollout and update compute the same log-probs) and the last epoch's
    `approx_kl`, for the stats a loss reports."""
    metrics = {k: jnp.mean(v) for k, v in stats.items() if k not in EXTREMES}
    if "ratio_min" in stats:
        metrics["ratio_min"] = jnp.min(stats["ratio_min"])
    if "ratio_max" in stats:
        metrics["ratio_max"] = jnp.max(stats["ratio_max"])
    if "ratio_max_dev" in stats:
        metrics["ratio_first_max_dev"] = stats["ratio_max_dev"][0, 0]
    if "approx_kl" in stats:
        metrics["approx_kl_last_epoch"] = jnp.mean(stats["approx_kl"][-1])
    return metrics
