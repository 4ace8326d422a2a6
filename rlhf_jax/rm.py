"""The reward model stage (InstructGPT step 2): comparisons -> a scalar reward.

    python -m rlhf_jax.rm --config=configs/rm_sim.py

The model is the SFT checkpoint's trunk with a fresh scalar head (N(0, 1/sqrt(d+1)), zero bias;
Ziegler et al. 2019, Huang et al. 2023). The reward of a text is read at its last real token
(`rlhf_jax.rewards`, shared by every stage that scores text).

Losses (config `loss.kind`), over a batch of prompts each with K ranked responses:

* `kwise` (Ouyang et al. 2022): `-(1/C) sum_{(w, l)} log sigmoid(r_w - r_l - margin)` over all
  C pairs with different ranks of one prompt, kept in one batch element (training on each pair as
  its own example overfits). With K = 2 it is Bradley-Terry.
* `pairwise`: the same pairs, each pair weighted as one example (plain Bradley-Terry on pairs).
* `best_of_k` (Ziegler et al. 2019): `-log softmax(r)[best]` over the present responses.

After training the stage fits the reward normalisation (`rewards.fit_norm`: `reference` —
Ziegler's mean 0 / std 1 on the SFT policy's own samples, recording the temperature and length
they were drawn at — `demonstrations` or `none`) and writes it into the final checkpoint's
metadata as `reward_norm`, which `rewards.score_sequences` applies for every later stage.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import config_utils, evaluation, handoff, models, offline, rewards
from rlhf_jax.data import preferences, tokenize
from rlhf_jax.errors import UserError
from rlhf_jax.rng import Purpose

log = logging.getLogger(__name__)

LOSS_KINDS = ("kwise", "pairwise", "best_of_k")

# ----------------------------------------------------------------------------------------------
# Losses. scores [B, K] float, rank [B, K] int (0 best, ties share a rank, -1 absent).


def preference_pairs(rank: jax.Array) -> jax.Array:
    """[B, K, K] bool: `pairs[b, i, j]` = response i is ranked above response j (both present)."""
    rank = jnp.asarray(rank)
    present = rank >= 0
    better = rank[:, :, None] < rank[:, None, :]
    return better & present[:, :, None] & present[:, None, :]


def rm_loss(scores: jax.Array, rank: jax.Array, *, kind: str = "kwise", margin: float = 0.0,
            example_margin: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss_sum, metric_sums) of a batch of rankings; `metric_sums["count"]` is the loss weight.

    `kind`: see the module docstring. `margin` (a config constant) and `example_margin` [B]
    (a per-comparison margin from the data, Touvron et al. 2023) are subtracted from each
    winner-minus-loser gap. Rows with no preference (fewer than two distinct present ranks) get
    weight 0. The metric sums include `accuracy` (weighted like the loss, so `accuracy / count`
    is the pair accuracy for `pairwise` and the mean per-prompt pair accuracy otherwise) and
    `pairs` / `pairs_correct` (ties in score count one half).
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"loss.kind={kind!r} is not one of {LOSS_KINDS}")
    scores = scores.astype(jnp.float32)
    pairs = preference_pairs(rank)
    pf = pairs.astype(jnp.float32)
    n_pairs = pf.sum(axis=(1, 2))  # [B]
    has_pref = n_pairs > 0
    gap = scores[:, :, None] - scores[:, None, :]  # r_i - r_j
    m = jnp.float32(margin)
    if example_margin is not None:
        m = m + example_margin.astype(jnp.float32)[:, None, None]
    pair_nll = -jax.nn.log_sigmoid(gap - m) * pf
    correct = ((gap > 0) + 0.5 * (gap == 0)) * pf

    if kind == "kwise":
        per_row = pair_nll.sum(axis=(1, 2)) / jnp.maximum(n_pairs, 1.0)
        loss_sum = jnp.sum(jnp.where(has_pref, per_row, 0.0))
        count = has_pref.sum().astype(jnp.float32)
    elif kind == "pairwise":
        loss_sum = pair_nll.sum()
        count = n_pairs.sum()
    else:  # best_of_k
        r = jnp.asarray(rank)
        present = r >= 0
        top = jnp.min(jnp.where(present, r, jnp.iinfo(jnp.int32).max), axis=1, keepdims=True)
        best = present & (r == top)
        neg = jnp.float32(-1e30)
        # -log P(the labeler's pick): the pick is any of the responses tied at the top.
        per_row = (jax.nn.logsumexp(jnp.where(present, scores, neg), axis=1)
                   - jax.nn.logsumexp(jnp.where(best, scores, neg), axis=1))
        loss_sum = jnp.sum(jnp.where(has_pref, per_row, 0.0))
        count = has_pref.sum().astype(jnp.float32)

    # Accuracy weighted like the loss, so sum / count is exact under gradient accumulation:
    # pair accuracy for `pairwise`, mean per-prompt pair accuracy otherwise.
    row_correct = correct.sum(axis=(1, 2))
    if kind == "pairwise":
        acc_sum = row_correct.sum()
    else:
        acc_sum = jnp.sum(jnp.where(has_pref, row_correct / jnp.maximum(n_pairs, 1.0), 0.0))
    metrics = {
        "count": count,
        "loss": loss_sum,
        "accuracy": acc_sum,
        "pairs": n_pairs.sum(),
        "pairs_correct": correct.sum(),
    }
    return loss_sum, metrics


def init_score_head(cfg: models.ModelConfig, key: jax.Array) -> dict:
    """A fresh scalar head: N(0, 1/sqrt(d+1)) kernel, zero bias (Huang et al. 2023)."""
    # Only the head survives dead-code elimination of the jitted full init.
    return jax.jit(lambda k: models.init_params(cfg, k, ("score",))["score_head"])(key)


# ----------------------------------------------------------------------------------------------
# The stage's pieces.


def validate_config(config) -> None:
    """RM fields, checked before anything loads or compiles (the Trainer checks the rest)."""
    if not config.init_from:
        raise UserError("config.init_from", "is empty", "the reward model starts from a "
                        "finished SFT stage's work dir (or zoo:<preset> / hf:<dir>)")
    config_utils.check_choice(config, "loss.kind", LOSS_KINDS)
    if config.loss.margin and config.loss.kind == "best_of_k":
        raise UserError("config.loss.margin", "applies to the pairwise / kwise losses",
                        "set it to 0 for best_of_k")
    config_utils.check_choice(config, "norm.method", rewards.NORM_METHODS)
    config_utils.check_choice(config, "data.candidates", preferences.CANDIDATES)
    kind = config.data.source.kind
    if kind not in ("sim", "preference_files"):
        raise UserError("config.data.source.kind", f"{kind!r} has no comparisons",
                        "use 'sim' or 'preference_files'")
    if kind != "sim" and config.data.candidates != "dataset":
        raise UserError("config.data.candidates", f"{config.data.candidates!r} needs the "
                        "simulated world's annotators", "use 'dataset' with preference files")
    if config.train.epochs < 0:
        raise UserError("config.train.epochs", f"{config.train.epochs} must be >= 0",
                        "0 uses config.train.steps")


def fit_reward_norm(nc, source, policy, rm_cfg, rm_params, tokenizer, max_len, key,
                    place) -> dict:
    """`reward_norm` of the trained RM (see the module docstring), with what it was fit on."""
    if nc.method == "none":
        return rewards.fit_norm(np.zeros(2), "none")
    pad_id, eos_id = tokenize.special_ids(tokenizer)
    if nc.method == "reference":
        prompts = source.prompts("train")
        prompts = (prompts * -(-nc.num_samples // max(len(prompts), 1)))[:nc.num_samples]
        enc, _ = preferences.encode_prompts(tokenizer, prompts, nc.max_prompt_len,
                                            "config.norm reference prompts")
        raw, info = rewards.reference_rewards(
            policy.cfg, policy.params, rm_cfg, rm_params, enc["prompt_tokens"],
            enc["prompt_mask"], key, max_new_tokens=nc.max_new_tokens, eos_id=eos_id,
            pad_id=pad_id, temperature=nc.temperature, batch_size=nc.batch_size, place=place)
        norm = rewards.fit_norm(raw, "reference", nc.target_mean, nc.target_std)
        # What the samples were drawn at: a policy stage warns when it samples elsewhere.
        return {**norm, "temperature": float(nc.temperature),
                "max_new_tokens": int(nc.max_new_tokens), "samples": info}
    # demonstrations (Stiennon et al. 2020); preference files give their preferred responses.
    prompts, completions, _ = source.demonstrations("train")
    enc, _ = tokenize.encode_sft(tokenizer, prompts[:nc.num_samples],
                                 completions[:nc.num_samples], max_len)
    raw = rewards.score_batches(rm_cfg, rm_params, enc["tokens"], enc["mask"],
                                batch_size=nc.batch_size, place=place)
    return rewards.fit_norm(raw, "demonstrations", nc.target_mean, nc.target_std)


def judge_agreement(config, source, policy, rm, tokenizer, key, place) -> dict:
    """How often the RM orders fresh pairs as each gold judge does (simulated world only):
    the world's held-out candidates, and pairs of fresh SFT samples (what PPO's first rollouts
    look like to the RM). Also the normalised rewards of those fresh reference samples."""
    ev, nc = config.eval, config.norm
    if not source.has_world or not ev.judges:
        return {}
    judges = evaluation.get_judges(tuple(ev.judges))
    out: dict[str, Any] = {}

    def agreement(prompts, responses, scores):
        gold = evaluation.gold_scores(judges, prompts, responses)
        return {n: evaluation.judge_agreement(scores[0::2] - scores[1::2], g[0::2] - g[1::2])
                for n, g in gold.items()}

    if ev.fresh_world_pairs > 0:
        pairs = source.fresh_pairs(ev.fresh_world_pairs)
        recs = [{"prompt": p, "responses": rs, "ranks": [0, 1]} for p, rs in pairs]
        arr, _ = preferences.encode_records(tokenizer, recs, config.data.max_len)
        r = rewards.score_batches(rm.cfg, rm.params, arr["tokens"], arr["mask"], rm.reward_norm,
                                  ev.batch_size, place=place).reshape(-1)
        out["world_pairs"] = agreement([p for p, rs in pairs for _ in rs],
                                       [x for _, rs in pairs for x in rs], r)
    if ev.fresh_policy_pairs > 0:
        rep = [p for p in source.prompts("eval")[:ev.fresh_policy_pairs] for _ in range(2)]
        s = evaluation.sample_texts(policy.cfg, policy.params, tokenizer, rep, key,
                                    max_prompt_len=nc.max_prompt_len,
                                    max_new_tokens=nc.max_new_tokens, temperature=nc.temperature,
                                    batch_size=nc.batch_size, place=place)
        r = rewards.score_batches(
            rm.cfg, rm.params, np.concatenate([s["prompt_tokens"], s["tokens"]], axis=1),
            np.concatenate([s["prompt_mask"], s["mask"]], axis=1), rm.reward_norm,
            ev.batch_size, place=place)
        out["policy_pairs"] = agreement(rep, s["responses"], r)
        # Fresh reference samples after normalisation (Ziegler: mean 0, std 1 by construction).
        out["fresh_reference_rewards"] = {"mean": float(r.mean()), "std": float(r.std()),
                                          "n": int(r.size)}
    return out


def rm_probes(config, source, rm, tokenizer, place) -> dict:
    """{"probes": counterfactual-pair metrics} of the RM when its source's simulated world has
    failure-mode features (`rlhf_jax.sim.probes.run_rm_probes`: the same text with and without
    a typo, a refusal vs an answer on harmful and on boundary prompts, the group word swapped;
    how often the RM prefers each side and the mean margin), else {}."""
    world = source.world()
    if world is None or not world.config.features():
        return {}
    from rlhf_jax.sim import probes

    score = evaluation.text_scorer(rm, tokenizer, config.data.max_len, config.eval.batch_size,
                                   place=place)
    return {"probes": probes.run_rm_probes(world, score)}


# ----------------------------------------------------------------------------------------------
# The stage.


def encode_comparisons(st: offline.Stage) -> tuple[dict, dict, dict]:
    """(arrays per split: `tokens`, `mask`, `response_mask` [N, K, L], `rank` [N, K]; records
    per split; data stats): the stage's comparisons, whole rankings."""
    records, load_stats = st.comparisons()
    arrays, info = {}, {"candidates": st.config.data.candidates}
    for split in ("train", "eval"):
        arrays[split], enc = preferences.encode_records(
            st.tokenizer, records[split], st.config.data.max_len, f"{split} comparisons")
        info[split] = {**load_stats[split], **enc, "comparisons": len(records[split])}
    return arrays, records, info


def held_out_summary(st: offline.Stage, rm: handoff.Loaded, eval_arrays: dict,
                     eval_records: list) -> dict:
    """Held-out accuracy (raw and normalised scores rank alike), its gold ceiling, the
    per-annotator / per-bucket breakdowns and calibration, the judges' agreement on fresh pairs
    and the counterfactual probes."""
    config, tr = st.config, st.tr
    raw = rewards.score_batches(rm.cfg, rm.params, eval_arrays["tokens"], eval_arrays["mask"],
                                batch_size=config.eval.batch_size, place=tr)
    norm = rm.reward_norm
    held = evaluation.PreferenceEval.from_records(
        eval_records, eval_arrays["rank"], annotator_names=st.source.annotator_names(),
        gap_edges=tuple(config.eval.gap_edges))(raw * norm["gain"] + norm["bias"], raw=raw)
    out: dict[str, Any] = {
        "held_out_accuracy": held["accuracy"],
        "gold_ceiling_accuracy": held.get("gold_ceiling_accuracy"),
        "held_out_pairs": held["pairs"], "per_annotator": held.get("per_annotator", {}),
        "per_bucket": held.get("per_bucket", {}), "calibration": held["calibration"],
        "reward_norm": norm, "loss_kind": config.loss.kind}
    if out["gold_ceiling_accuracy"] is not None:
        out["gap_to_ceiling"] = out["gold_ceiling_accuracy"] - out["held_out_accuracy"]
    agreement = judge_agreement(config, st.source, st.policy, rm, st.tokenizer,
                                tr.key(Purpose.RM_EVAL), tr)
    if "fresh_reference_rewards" in agreement:
        out["fresh_reference_rewards"] = agreement.pop("fresh_reference_rewards")
    out["judge_agreement"] = agreement
    return {**out, **rm_probes(config, st.source, rm, st.tokenizer, tr)}


def run(config) -> dict:
    """(config, SFT checkpoint, comparisons) -> `workdir/final` RM params + summary.json."""
    t_start = time.perf_counter()
    validate_config(config)
    # The SFT policy: its trunk starts the RM; it is also the reference policy whose samples
    # fit the normalisation (and are labelled for candidates=policy).
    st = offline.Stage(config, "rm")
    cfg, kind, margin = st.cfg, config.loss.kind, float(config.loss.margin)
    arrays, records, data_info = encode_comparisons(st)
    rows = {s: {k: a[k] for k in ("tokens", "mask", "rank")} for s, a in arrays.items()}
    rm_init = {**models.trunk(st.policy.params),
               "score_head": init_score_head(cfg, st.place.key(Purpose.INIT))}

    def loss_fn(params, frozen, batch, key):
        del frozen, key  # nothing frozen; dropout is off
        scores = rewards.score_sequences(cfg, params, batch["tokens"], batch["mask"])
        return rm_loss(scores, batch["rank"], kind=kind, margin=margin)

    t_train = time.perf_counter()
    state = st.train(rows["train"], rm_init, models.param_axes(cfg, ("score",)), loss_fn,
                     held_out=offline.HeldOut(rows["eval"], config.train.batch_size,
                                              max_batches=config.train.eval_batches),
                     data_stats=data_info, write_final=False)
    train_seconds = time.perf_counter() - t_train
    tr = st.tr
    if tr.final_metadata() is None:  # not finished before: fit the normalisation, hand off
        tr.metadata["reward_norm"] = fit_reward_norm(
            config.norm, st.source, st.policy, cfg, state.params, st.tokenizer,
            config.data.max_len, tr.key(Purpose.NORM), tr)
        log.info("reward normalisation: %s", tr.metadata["reward_norm"])
        tr.save_final(state.params)
    rm = handoff.Loaded(cfg, state.params, tr.final_metadata(), str(tr.workdir))
    return st.finish({**held_out_summary(st, rm, arrays["eval"], records["eval"]),
                      "data": data_info, "train_comparisons": len(records["train"]),
                      "train_seconds": round(train_seconds, 1),
                      "runtime_seconds": round(time.perf_counter() - t_start, 1)})


if __name__ == "__main__":
    config_utils.run_stage(run, ("held_out_accuracy", "gold_ceiling_accuracy", "gap_to_ceiling",
                                "judge_agreement", "probes", "reward_norm", "runtime_seconds"))
