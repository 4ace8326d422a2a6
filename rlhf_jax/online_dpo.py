"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback").

    python -m rlhf_jax.online_dpo --config=configs/online_dpo_sim.py \
        --config.init_from=<SFT work dir> --config.reward_from=<RM work dir>

Every update samples two responses per prompt from the current policy (adjacent rows), a judge
scores both (`online_dpo.judge`: "rm", or "gold": `config.eval.gold`), the higher is chosen
and the DPO loss (`pref_losses.dpo_loss`: sigmoid or IPO) trains the policy against the frozen
SFT reference, epochs x minibatches steps on the pairs. A tie (e.g. two unfinished responses,
both given the EOS trick's score) is no preference: weight 0. Log-probs, the policy's and the
reference's, are the sampling distribution's (logits / T); the reference's come from the rollout.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from rlhf_jax import config_utils, onpolicy, rewards
from rlhf_jax import rollout as rollout_lib
from rlhf_jax.errors import UserError
from rlhf_jax.ops import response_logprobs
from rlhf_jax.pref_losses import LOSSES, dpo_loss

JUDGES = ("rm", "gold")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(rollout_lib.Settings):
    """The shared on-policy fields and the DPO loss (static: jitted code closes over them)."""

    loss: str = "sigmoid"
    beta: float = 0.1


def rollout(s: Settings, params, ref_params, rm_params, prompt_tokens, prompt_mask, rng, *,
            batch_sharding=None) -> tuple[dict, dict, dict]:
    """Two samples per prompt (rows 2p, 2p + 1) -> (data for `update` with the RM's `scores`,
    per-row results for the host, batch means)."""
    prompts = rollout_lib.repeat_prompts(prompt_tokens, prompt_mask, 2, batch_sharding)
    policy_pass = functools.partial(response_logprobs, s.policy, params,
                                    temperature=s.temperature, with_entropy=True)
    r = rollout_lib.sample_and_score(s, params, policy_pass, ref_params, rm_params,
                                     prompts["tokens"], prompts["mask"], rng)
    logp, rmask = r.policy["logp"], r.response_mask
    m = rmask.astype(jnp.float32)
    ref_seq, kl_seq = jnp.sum(r.ref_logp * m, axis=1), jnp.sum((logp - r.ref_logp) * m, axis=1)
    data = {"tokens": r.tokens, "mask": r.mask, "positions": r.positions, "response_mask": rmask,
            "ref_logp": ref_seq, "scores": r.rm_score, "ended": r.out.ended}
    rows = {"response_tokens": r.out.tokens, "response_mask": rmask, "lengths": r.out.lengths,
            "ended": r.out.ended, "rm_score": r.rm_score, "score": r.score, "kl": kl_seq}
    return data, rows, rollout_lib.rollout_metrics(r, logp, r.policy["entropy"], kl_seq, r.score)


_rollout_jit = jax.jit(rollout, static_argnums=(0,), static_argnames=("batch_sharding",))


def preference_pairs(scores: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scores [2P] of P adjacent pairs -> (order [P, 2]: the chosen row of each pair then the
    rejected one, weight [P]: 0 for a tie)."""
    s = scores.reshape(-1, 2)
    chosen = jnp.where(s[:, 0] >= s[:, 1], 0, 1)
    return jnp.stack([chosen, 1 - chosen], axis=1), (s[:, 0] != s[:, 1]).astype(jnp.float32)


def to_pairs(s: Settings, data: dict) -> dict:
    """Rows -> pairs [P, 2, ...], chosen first, by the judge's scores after the EOS trick."""
    order, weight = preference_pairs(
        rewards.apply_eos_trick(data["scores"], data["ended"], s.no_eos_score))

    def pick(x):
        x = x.reshape((-1, 2) + x.shape[1:])
        return jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)

    keys = ("tokens", "mask", "positions", "response_mask", "ref_logp")
    return {**{k: pick(data[k]) for k in keys}, "weight": weight}


def minibatch_loss(s: Settings, params, mb: dict) -> tuple[jax.Array, dict]:
    """The DPO loss, a mean over the minibatch's non-tied pairs, and its metrics."""
    n, _, T = mb["tokens"].shape
    flat = {k: mb[k].reshape((2 * n,) + mb[k].shape[2:])
            for k in ("tokens", "mask", "positions", "response_mask")}
    L = T - flat["response_mask"].shape[1]
    logp = response_logprobs(s.policy, params, flat["tokens"], flat["mask"], flat["positions"],
                             L, temperature=s.temperature)["logp"]
    m = flat["response_mask"].astype(jnp.float32)
    seq, count = jnp.sum(logp * m, axis=1).reshape(n, 2), jnp.sum(m, axis=1).reshape(n, 2)
    loss_sum, sums = dpo_loss(seq, mb["ref_logp"], count, kind=s.loss, beta=s.beta,
                              weight=mb["weight"])
    w = jnp.maximum(sums["count"], 1.0)
    return loss_sum / w, {**{k: v / w for k, v in sums.items() if k != "count"},
                          "pairs": sums["count"]}


def update(s: Settings, optimizer, params, opt_state, data: dict, shuffle_key, update_index, *,
           batch_sharding=None):
    """Epochs x minibatches of DPO steps over the update's pairs (`rollout.update_epochs`)."""
    pairs = to_pairs(s, data)
    params, opt_state, stats = rollout_lib.update_epochs(
        lambda p, mb, _: minibatch_loss(s, p, mb), optimizer, params, opt_state, pairs,
        shuffle_key, update_index, epochs=s.epochs, minibatches=s.minibatches,
        batch_sharding=batch_sharding)
    tie_frac = 1.0 - jnp.mean(pairs["weight"])  # pairs the judge scored equal: no preference
    return params, opt_state, {**rollout_lib.reduce_update_stats(stats), "tie_frac": tie_frac}


def validate_config(config) -> None:
    """Online DPO's fields and the shared on-policy ones, before anything loads."""
    for field, choices in (("loss", LOSSES), ("judge", JUDGES)):
        config_utils.check_choice(config, f"online_dpo.{field}", choices)
    config_utils.check_number(config, "online_dpo.beta")
    onpolicy.validate_config(config, "online_dpo")
    if config.online_dpo.judge == "gold" and not config.eval.gold:
        raise UserError("config.online_dpo.judge", "is 'gold' but config.eval.gold is empty",
                        "name a gold judge in config.eval.gold")


def build(config, m: onpolicy.Models, tr) -> onpolicy.Method:
    """Online DPO's part of the stage: the policy alone is trained, two samples per prompt."""
    o = config.online_dpo
    s = Settings(**rollout_lib.settings_fields(config, "online_dpo", m.policy.cfg, m.reward.cfg,
                                               m.reward.reward_norm, m.eos_id, m.pad_id),
                 loss=o.loss, beta=float(o.beta))
    P = int(config.train.batch_size)

    def rescore(data, judged, place):  # the gold judge labels the pairs instead of the RM
        gold = judged[config.eval.gold].astype("float32")
        return {**data, "scores": jax.make_array_from_callback(
            gold.shape, place.replicated, lambda i: gold[i])}

    return onpolicy.policy_method(
        s, m, tr, _rollout_jit, update, samples_per_prompt=2, rescore=rescore if o.judge == "gold" else None,
        after_update=lambda extra, metrics: (extra, {"beta": s.beta}),
        summary=lambda st: {"judge": o.judge, "pairs": int(jax.device_get(st.step)) * P})


def run(config) -> dict:
    """Online DPO from the SFT policy in `config.init_from`; returns the run summary."""
    validate_config(config)
    return onpolicy.run(config, "online_dpo", build)


if __name__ == "__main__":
    config_utils.run_stage(run, ("sft", "online_dpo", "win_rate_vs_sft", "pairs"))
