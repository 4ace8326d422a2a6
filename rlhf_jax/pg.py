"""Critic-free policy gradients: RLOO, GRPO, Dr. GRPO and REINFORCE with a batch-mean baseline.

Every prompt is sampled K times in one rollout; the K responses of a prompt sit in K consecutive
rows (batch B = prompts x K). Each response gets one sequence reward (the normalised RM score,
minus beta * sum_t k1 when the KL is in the reward), the baseline comes from the other responses
(of its group, or of the batch), and the policy is trained with a PPO-style clipped surrogate on
the per-sequence advantage broadcast over its tokens. No value model and no GAE pass.

    RLOO      A_i = r_i - mean_{j != i} r_j                  (Ahmadian et al. 2024)
    GRPO      A_i = (r_i - mean_g r) / (std_g r + eps)       (Shao et al. 2024, DeepSeekMath)
    Dr. GRPO  A_i = r_i - mean_g r, constant loss normaliser (Liu et al. 2025)
    REINFORCE A_i = r_i - mean_batch r                       (Williams 1992)

Loss of one minibatch (Schulman et al. 2017, with DAPO's clip-higher, Yu et al. 2025):

    l_t = max(-A ratio_t, -A clip(ratio_t, 1 - eps_low, 1 + eps_high)) [+ beta k_t]
    loss = aggregate(l, mask)       token mean | sequence mean of token means | sum / constant

The top half of the file is the math: pure, jittable functions of arrays (tested against plain
references in tests/test_pg_math.py). Everything works on global arrays, so under jit on a mesh
the numbers do not depend on how the batch is split across devices, even when a group's rows
land on different devices (DESIGN.md pitfall 6). The stage below it (rollout, update, `build`
for the on-policy driver `onpolicy.run`) calls the math and the shared parts of
`rlhf_jax.rollout`, and adds no formula of its own:

    python -m rlhf_jax.pg --config=configs/pg_sim.py:method=grpo \
        --config.init_from=<SFT work dir> --config.reward_from=<RM work dir>

`config.train.batch_size` counts PROMPTS per update; each is sampled `config.pg.group_size`
times, so an update trains on batch_size x group_size episodes (the K samples of a prompt in
adjacent rows). The trained params are the policy alone: no value model, no GAE.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from rlhf_jax import config_utils, onpolicy
from rlhf_jax import rollout as rollout_lib
from rlhf_jax.errors import UserError
from rlhf_jax.ops import kl_estimators, masked_mean, response_logprobs

# ----------------------------------------------------------------------------------------------
# Options.

KL_MODES = ("reward", "loss")
KL_LOSS_ESTIMATORS = ("k1", "k2", "k3")

# Loss aggregation. These give DIFFERENT GRADIENTS when response lengths are ragged (DESIGN.md
# pitfall 17); they agree (up to a constant factor for "constant") only when every response in
# the minibatch has the same length.
#   "token_mean":          sum_{b,t} m l / sum_{b,t} m. Every token weighs the same, so long
#                          responses weigh more per sequence (DAPO, Yu et al. 2025).
#   "seq_mean_token_mean": mean_b (sum_t m l / sum_t m). Every sequence weighs the same, so a
#                          token of a short response weighs more than one of a long response:
#                          for A > 0 short answers are pushed up harder, for A < 0 long wrong
#                          answers are pushed down less (GRPO as published; MaxText's default).
#                          The length bias Liu et al. (2025) remove.
#   "constant":            sum_{b,t} m l / C, C = `loss_normalizer` or B * L_max (rows x mask
#                          width, i.e. the generation budget): every token weighs the same and
#                          the scale does not move with the lengths sampled (Dr. GRPO).
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "constant")


@dataclasses.dataclass(frozen=True)
class PGOptions:
    """Static options of the critic-free losses (hashable: jitted code closes over them).

    Field -> config field named in errors: estimator, group_size, std_eps, aggregation,
    loss_normalizer, clip_low, clip_high -> `config.pg.<field>`; kl_mode, kl_loss_estimator,
    beta -> `config.kl.mode`, `config.kl.loss_estimator`, `config.kl.beta`.
    """

    estimator: str = "rloo"
    group_size: int = 4  # K samples per prompt
    std_eps: float = 1e-6  # GRPO: A = (r - mean) / (std + eps)
    kl_mode: str = "reward"  # "reward": -beta sum_t k1 in the sequence reward; "loss": beta k
    kl_loss_estimator: str = "k3"  # used when kl_mode == "loss" (GRPO uses k3; see the bias note)
    beta: float = 0.05
    aggregation: str = "token_mean"
    loss_normalizer: float | None = None  # "constant" only; None = rows x mask width
    clip_low: float = 0.2  # ratio clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2  # DAPO clip-higher: 0.28

    def __post_init__(self):
        def bad(field, what, fix):
            raise UserError(field, what, fix)

        if self.estimator not in ADVANTAGE_ESTIMATORS:
            bad("config.pg.estimator", f"unknown estimator {self.estimator!r}",
                f"use one of {sorted(ADVANTAGE_ESTIMATORS)}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or \
                self.group_size < 1:
            bad("config.pg.group_size", f"{self.group_size!r} is not a positive int",
                "set the number of samples per prompt, e.g. 4")
        if self.group_size < 2 and self.estimator in ("rloo", "grpo", "dr_grpo"):
            bad("config.pg.group_size", f"{self.estimator} needs >= 2 samples per prompt for "
                f"its baseline, got {self.group_size}",
                "raise it, or use config.pg.estimator='reinforce'")
        if not self.std_eps >= 0:
            bad("config.pg.std_eps", f"{self.std_eps} must be >= 0", "use e.g. 1e-6")
        if self.kl_mode not in KL_MODES:
            bad("config.kl.mode", f"unknown mode {self.kl_mode!r}", f"use one of {KL_MODES}")
        if self.kl_loss_estimator not in KL_LOSS_ESTIMATORS:
            bad("config.kl.loss_estimator", f"unknown estimator {self.kl_loss_estimator!r}",
                f"use one of {KL_LOSS_ESTIMATORS}")
        if not self.beta >= 0:
            bad("config.kl.beta", f"{self.beta} must be >= 0", "0 turns the KL penalty off")
        if self.aggregation not in AGGREGATIONS:
            bad("config.pg.aggregation", f"unknown aggregation {self.aggregation!r}",
                f"use one of {AGGREGATIONS}")
        if self.loss_normalizer is not None and not self.loss_normalizer > 0:
            bad("config.pg.loss_normalizer", f"{self.loss_normalizer} must be > 0",
                "or None for rows x generation length")
        for name in ("clip_low", "clip_high"):
            value = getattr(self, name)
            if not 0 < value or (name == "clip_low" and value >= 1):
                bad(f"config.pg.{name}", f"{value} is out of range",
                    "clip_low in (0, 1), clip_high > 0 (PPO 0.2; DAPO 0.2 / 0.28)")


# ----------------------------------------------------------------------------------------------
# Advantage estimators on sequence rewards [B], B = prompts x K, a group's K rows adjacent.
# Each reshapes the global array to [P, K]; under jit on a mesh XLA moves whatever rows a group
# needs, so a group split across devices gives the same numbers as on one device.


def _groups(rewards: jax.Array, group_size: int) -> jax.Array:
    """[B] -> [P, K] in float32 (shapes are static, so this check runs once, at trace time)."""
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise UserError("config.pg.group_size", f"a reward batch of shape {rewards.shape} is not "
                        f"[prompts x {group_size}]", "sample group_size responses per prompt")
    return rewards.astype(jnp.float32).reshape(-1, group_size)


def rloo_advantages(rewards: jax.Array, group_size: int, *, eps: float = 0.0) -> jax.Array:
    """RLOO (Ahmadian et al. 2024, eq. 7; Kool et al. 2019): the baseline of sample i is the mean
    reward of the other K - 1 samples of its prompt, so it is independent of sample i and the
    gradient estimate stays unbiased. Equals K / (K - 1) * (r_i - group mean). `eps` unused."""
    r = _groups(rewards, group_size)
    leave_one_out = (jnp.sum(r, axis=1, keepdims=True) - r) / (group_size - 1)
    return (r - leave_one_out).reshape(-1)


def grpo_advantages(rewards: jax.Array, group_size: int, *, eps: float = 1e-6,
                    scale_by_std: bool = True) -> jax.Array:
    """GRPO outcome supervision (Shao et al. 2024, sec. 4.1.2): (r_i - group mean) / (group std +
    eps). The std is the sample std (ddof = 1), as TRL, verl and OpenRLHF compute it.

    Dividing by the std up-weights prompts whose K rewards nearly agree (almost always solved or
    almost never): a question-level difficulty bias (Liu et al. 2025; DESIGN.md pitfall 17).
    A group whose rewards are all equal gets advantage 0 either way.
    """
    r = _groups(rewards, group_size)
    adv = r - jnp.mean(r, axis=1, keepdims=True)
    if scale_by_std:
        adv = adv / (jnp.std(r, axis=1, ddof=1, keepdims=True) + eps)
    return adv.reshape(-1)


def dr_grpo_advantages(rewards: jax.Array, group_size: int, *, eps: float = 0.0) -> jax.Array:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): r_i - group mean, no
    std division. The other half of Dr. GRPO is `aggregation="constant"`. `eps` unused."""
    return grpo_advantages(rewards, group_size, scale_by_std=False)


def reinforce_advantages(rewards: jax.Array, group_size: int, *, eps: float = 0.0) -> jax.Array:
    """REINFORCE (Williams 1992) with the batch-mean reward as baseline. The mean includes r_i
    itself, which shrinks the expected gradient by (B - 1) / B; no grouping needed. `group_size`
    and `eps` unused."""
    r = rewards.astype(jnp.float32)
    return r - jnp.mean(r)


AdvantageFn = Callable[..., jax.Array]
ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {
    "rloo": rloo_advantages,
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "reinforce": reinforce_advantages,
}


def group_stats(rewards: jax.Array, group_size: int) -> dict[str, jax.Array]:
    """Diagnostics of the grouped rewards: mean within-group std (ddof = 1, as GRPO divides by)
    and the fraction of groups whose K rewards are all equal, which give every member advantage 0
    under RLOO / GRPO / Dr. GRPO and so no learning signal (DAPO's dynamic-sampling motive).
    With K = 1 (REINFORCE without groups) the std is 0 and every group counts as equal."""
    r = _groups(rewards, group_size)
    if group_size == 1:
        zero = jnp.zeros((), jnp.float32)
        return {"group_reward_std": zero, "zero_adv_group_frac": jnp.ones((), jnp.float32)}
    return {
        "group_reward_std": jnp.mean(jnp.std(r, axis=1, ddof=1)),
        "zero_adv_group_frac": jnp.mean((jnp.max(r, axis=1) == jnp.min(r, axis=1))
                                        .astype(jnp.float32)),
    }


def compute_advantages(opts: PGOptions, rewards: jax.Array) -> tuple[jax.Array, dict]:
    """Advantages [B] by `opts.estimator`, plus reward and group statistics."""
    fn = ADVANTAGE_ESTIMATORS[opts.estimator]
    adv = fn(rewards, opts.group_size, eps=opts.std_eps)
    r = rewards.astype(jnp.float32)
    stats = {"reward_mean": jnp.mean(r), "reward_std": jnp.std(r),
             "advantage_mean": jnp.mean(adv), "advantage_std": jnp.std(adv),
             **group_stats(rewards, opts.group_size)}
    return adv, stats


# ----------------------------------------------------------------------------------------------
# KL to the reference: in the reward or in the loss (DESIGN.md pitfalls 5 and 17).
#
# Schulman (2020), "Approximating KL divergence": for y ~ pi and log r = log ref(y) - log pi(y),
#   k1 = -log r,   k2 = (log r)^2 / 2,   k3 = (r - 1) - log r
# estimate KL(pi || ref); k1 and k3 without bias, k3 never negative. Those are statements about
# the VALUE. Used as a LOSS, autodiff differentiates only k's explicit dependence on theta, not
# the sampling distribution, so on-policy the gradient is E_pi[grad k(y)] = sum_y pi grad k:
#   k1: sum_y pi grad log pi                 = sum_y grad pi                = 0
#   k2: sum_y pi log(pi / ref) grad log pi   = sum_y grad pi log(pi / ref)  = grad KL(pi || ref)
#   k3: sum_y pi (1 - ref / pi) grad log pi  = -sum_y ref grad log pi       = grad KL(ref || pi)
# So k1-as-loss only adds noise, and k3-as-loss (GRPO, Shao et al. 2024, eq. 4) follows the
# gradient of the REVERSE divergence KL(ref || pi) (mass-covering), not the KL(pi || ref) of the
# RLHF objective. Near pi = ref both divergences share their Hessian (the Fisher), so the
# gradients agree to first order and the bias grows as pi moves away (Tang & Munos 2025, "On a
# few pitfalls in KL divergence gradient estimation for RL"). With several updates per rollout
# the samples come from pi_old, which adds an uncorrected off-policy error to every estimator.
# tests/test_pg_math.py checks the three identities exactly on a categorical.
#
# k1 IN THE REWARD is unbiased: r(y) - beta sum_t k1_t, computed from the rollout's log-probs (no
# gradient through it), is a score-function reward, and E_pi[(r - beta log pi/ref) grad log pi]
# = grad (E_pi[r] - beta KL(pi || ref)) because E_pi[grad log pi] = 0.


def kl_penalized_rewards(opts: PGOptions, scores: jax.Array, logp: jax.Array,
                         ref_logp: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sequence rewards [B] and the sequence k1 KL [B] = sum_t (logp - ref_logp) over the mask.

    With `kl_mode == "reward"` the reward is `scores - beta * KL`; with "loss" it is the score
    and the KL goes into `pg_loss` instead. `logp` are the rollout's (sampling-time) log-probs.
    """
    seq_kl = jnp.sum((logp - ref_logp).astype(jnp.float32) * mask.astype(jnp.float32), axis=-1)
    scores = scores.astype(jnp.float32)
    if opts.kl_mode == "reward":
        return scores - opts.beta * seq_kl, seq_kl
    return scores, seq_kl


# ----------------------------------------------------------------------------------------------
# Aggregation and the loss of one minibatch.


def aggregate(per_token: jax.Array, mask: jax.Array, mode: str,
              normalizer: float | None = None) -> jax.Array:
    """Reduce per-token losses [B, T] to a scalar by `mode` (see AGGREGATIONS for how they differ).

    "seq_mean_token_mean" averages over rows with at least one real token. "constant" divides the
    masked sum by `normalizer`, or by B * T (T = the mask width, the generation budget) if None.
    """
    m = mask.astype(jnp.float32)
    x = per_token.astype(jnp.float32) * m
    if mode == "token_mean":
        return jnp.sum(x) / jnp.maximum(jnp.sum(m), 1.0)
    if mode == "seq_mean_token_mean":
        lengths = jnp.sum(m, axis=-1)
        per_seq = jnp.sum(x, axis=-1) / jnp.maximum(lengths, 1.0)
        has_tokens = (lengths > 0).astype(jnp.float32)
        return jnp.sum(per_seq * has_tokens) / jnp.maximum(jnp.sum(has_tokens), 1.0)
    if mode == "constant":
        c = float(mask.shape[0] * mask.shape[1]) if normalizer is None else float(normalizer)
        return jnp.sum(x) / c
    raise UserError("config.pg.aggregation", f"unknown aggregation {mode!r}",
                    f"use one of {AGGREGATIONS}")


def pg_loss(opts: PGOptions, logp: jax.Array, old_logp: jax.Array, advantages: jax.Array,
            mask: jax.Array, ref_logp: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Clipped-surrogate loss of one minibatch and its diagnostics.

    logp [B, T] (differentiated), old_logp [B, T] (the rollout's), advantages [B] (one per
    sequence, broadcast over its tokens), mask [B, T] (response tokens), ref_logp [B, T] (needed
    when `opts.kl_mode == "loss"`; with it the reference KL is also reported). Per token,
    ratio = pi / pi_old and l = max(-A ratio, -A clip(ratio, 1 - clip_low, 1 + clip_high)), plus
    beta * k (k = opts.kl_loss_estimator) when the KL is in the loss; `opts.aggregation` reduces
    it. Diagnostics are masked token means whatever the aggregation.
    """
    m = mask.astype(jnp.float32)
    logp = logp.astype(jnp.float32)
    old_logp = jax.lax.stop_gradient(old_logp.astype(jnp.float32))
    adv = jax.lax.stop_gradient(advantages.astype(jnp.float32))[:, None]
    log_ratio = logp - old_logp
    ratio = jnp.exp(log_ratio)
    surr = -adv * ratio
    surr_clipped = -adv * jnp.clip(ratio, 1.0 - opts.clip_low, 1.0 + opts.clip_high)
    pg = aggregate(jnp.maximum(surr, surr_clipped), m, opts.aggregation, opts.loss_normalizer)
    # The clip zeroes a token's gradient exactly when it is active: ratio below 1 - clip_low
    # with A < 0, or above 1 + clip_high with A > 0.
    low = ((ratio < 1.0 - opts.clip_low) & (adv < 0)).astype(jnp.float32)
    high = ((ratio > 1.0 + opts.clip_high) & (adv > 0)).astype(jnp.float32)
    on = m > 0
    stats = {
        "pg_loss": pg,
        "clipfrac_low": masked_mean(low, m),
        "clipfrac_high": masked_mean(high, m),
        "clipfrac": masked_mean(low + high, m),
        # k3 estimate of KL(pi_old || pi) on the rollout's samples, as in PPO.
        "approx_kl": masked_mean(jnp.expm1(log_ratio) - log_ratio, m),
        "ratio_mean": masked_mean(ratio, m),
        "ratio_min": jnp.min(jnp.where(on, ratio, 1.0)),
        "ratio_max": jnp.max(jnp.where(on, ratio, 1.0)),
        "ratio_max_dev": jnp.max(jnp.where(on, jnp.abs(ratio - 1.0), 0.0)),
    }
    loss = pg
    if ref_logp is not None:
        ks = kl_estimators(logp, jax.lax.stop_gradient(ref_logp.astype(jnp.float32)))
        stats["kl_ref_k1"] = masked_mean(jax.lax.stop_gradient(ks["k1"]), m)
        stats["kl_ref_k3"] = masked_mean(jax.lax.stop_gradient(ks["k3"]), m)
        if opts.kl_mode == "loss":
            kl_term = aggregate(ks[opts.kl_loss_estimator], m, opts.aggregation,
                                opts.loss_normalizer)
            stats["kl_loss"] = kl_term
            loss = loss + opts.beta * kl_term
    elif opts.kl_mode == "loss":
        raise ValueError("pg_loss: kl_mode='loss' needs ref_logp")
    stats["loss"] = loss
    return loss, stats


# ----------------------------------------------------------------------------------------------
# The stage: static settings, rollout, update, build / run on the on-policy driver. Only the
# policy is trained; the frozen trees are the SFT reference and the reward model.


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(rollout_lib.Settings):
    """Static settings of one critic-free run: the shared on-policy fields (`rollout.Settings`)
    and the loss options (hashable: jitted code closes over them)."""

    opts: PGOptions


def rollout(s: Settings, params: dict, ref_params: dict, rm_params: dict,
            prompt_tokens: jax.Array, prompt_mask: jax.Array, rng: jax.Array, *,
            batch_sharding: jax.sharding.NamedSharding | None = None) -> tuple[dict, dict, dict]:
    """Sample `group_size` responses per prompt and turn them into training data (one jit).

    prompt_tokens, prompt_mask: [P, L]; each prompt is repeated K times in adjacent rows, so the
    B = P x K episodes hold whole groups in consecutive rows (what the estimators reshape).
    `params` are the policy's alone. Returns (batch, rows, metrics) like `ppo.rollout`: `batch`
    for `update` (sequences, masks, rollout and reference log-probs, one advantage per row),
    `rows` per-episode results for the host, `metrics` batch means.
    """
    opts = s.opts
    prompts = rollout_lib.repeat_prompts(prompt_tokens, prompt_mask, opts.group_size,
                                         batch_sharding)
    # Trainer-side log-probs under logits / T, as PPO (the sampler's are only compared).
    policy_pass = functools.partial(response_logprobs, s.policy, params,
                                    temperature=s.temperature, with_entropy=True)
    r = rollout_lib.sample_and_score(s, params, policy_pass, ref_params, rm_params,
                                     prompts["tokens"], prompts["mask"], rng)
    logp, rmask = r.policy["logp"], r.response_mask
    seq_reward, seq_kl = kl_penalized_rewards(opts, r.score, logp, r.ref_logp, rmask)
    advantages, adv_stats = compute_advantages(opts, seq_reward)
    batch = {"tokens": r.tokens, "mask": r.mask, "positions": r.positions,
             "response_mask": rmask, "old_logp": logp, "ref_logp": r.ref_logp,
             "advantages": advantages}
    rows = {"response_tokens": r.out.tokens, "response_mask": rmask, "lengths": r.out.lengths,
            "ended": r.out.ended, "rm_score": r.rm_score, "score": r.score, "kl": seq_kl,
            "reward": seq_reward, "advantages": advantages}
    # `return`: the sequence reward the estimator saw.
    metrics = rollout_lib.rollout_metrics(r, logp, r.policy["entropy"], seq_kl, seq_reward,
                                          opts.beta if opts.kl_mode == "reward" else None)
    # reward / advantage mean and std, group_reward_std, zero_adv_group_frac
    return batch, rows, {**metrics, **adv_stats}


# Settings and the batch sharding static: runs in one process with equal settings (a resumed
# run, the pipeline's methods, tests) share one compiled rollout.
_rollout_jit = jax.jit(rollout, static_argnums=(0,), static_argnames=("batch_sharding",))


def minibatch_loss(s: Settings, params: dict, mb: dict) -> tuple[jax.Array, dict]:
    """`pg_loss` of one minibatch, on the policy's log-probs of the rollout's tokens."""
    L = mb["tokens"].shape[1] - mb["response_mask"].shape[1]
    logp = response_logprobs(s.policy, params, mb["tokens"], mb["mask"], mb["positions"], L,
                             temperature=s.temperature)["logp"]
    return pg_loss(s.opts, logp, mb["old_logp"], mb["advantages"], mb["response_mask"],
                   ref_logp=mb["ref_logp"])


def update(s: Settings, optimizer: optax.GradientTransformation, params: dict, opt_state,
           batch: dict, shuffle_key: jax.Array, update_index: jax.Array | int, *,
           batch_sharding: jax.sharding.NamedSharding | None = None) -> tuple[dict, Any, dict]:
    """`s.epochs` passes over one rollout batch, `s.minibatches` optimizer steps each
    (`rollout.update_epochs`: one `lax.scan`, a fresh permutation per (update, epoch), each
    minibatch split over the mesh by `batch_sharding`).

    Returns (params, opt_state, metrics averaged over the minibatch steps, plus the extreme
    ratios and `ratio_first_max_dev`: max |ratio - 1| on the first minibatch, ~1e-7 when rollout
    and update compute the same log-probs).
    """
    params, opt_state, stats = rollout_lib.update_epochs(
        lambda p, mb, _: minibatch_loss(s, p, mb), optimizer, params, opt_state, batch,
        shuffle_key, update_index, epochs=s.epochs, minibatches=s.minibatches,
        batch_sharding=batch_sharding)
    return params, opt_state, rollout_lib.reduce_update_stats(stats)


def options_from_config(config) -> PGOptions:
    p, k = config.pg, config.kl
    config_utils.check_number(config, "pg.loss_normalizer", strict=False)
    return PGOptions(estimator=p.estimator, group_size=p.group_size, std_eps=float(p.std_eps),
                     kl_mode=k.mode, kl_loss_estimator=k.loss_estimator, beta=float(k.beta),
                     aggregation=p.aggregation,
                     loss_normalizer=float(p.loss_normalizer) or None,
                     clip_low=float(p.clip_low), clip_high=float(p.clip_high))


def validate_config(config) -> PGOptions:
    """The stage's fields, checked before anything loads or compiles (the shared on-policy ones
    by `onpolicy.validate_config`, the training ones by the Trainer). Returns the loss options."""
    config_utils.check_number(config, "kl.beta", strict=False)
    opts = options_from_config(config)
    onpolicy.validate_config(config, "pg", opts.group_size)
    return opts


def build(config, m: onpolicy.Models, tr) -> onpolicy.Method:
    """The critic-free part of the stage: the policy alone is trained, K samples per prompt."""
    opts = options_from_config(config)
    s = Settings(**rollout_lib.settings_fields(config, "pg", m.policy.cfg, m.reward.cfg,
                                               m.reward.reward_norm, m.eos_id, m.pad_id),
                 opts=opts)
    P, K = int(config.train.batch_size), opts.group_size

    def summary(state):
        steps = int(jax.device_get(state.step))
        return dict(estimator=opts.estimator, group_size=K, prompts=steps * P,
                    episodes=steps * P * K)

    return onpolicy.policy_method(
        s, m, tr, _rollout_jit, update, samples_per_prompt=K, after_update=lambda extra, metrics: (extra, {"beta": opts.beta}),
        summary=summary)


def run(config) -> dict:
    """Train the SFT policy in `config.init_from` against the RM in `config.reward_from` with
    the critic-free estimator `config.pg.estimator`. Returns the run summary."""
    opts = validate_config(config)
    return onpolicy.run(config, opts.estimator, build)


if __name__ == "__main__":
    config_utils.run_stage(run, ("sft", *ADVANTAGE_ESTIMATORS, "win_rate_vs_sft", "episodes"))
