"""The reward model stage (InstructGPT step 2): comparisons -> a scalar reward.

    python -m rlhf_jax.rm --config=configs/rm_sim.py

The model is the SFT checkpoint's trunk with a fresh scalar head (N(0, 1/sqrt(d+1)), zero bias;
Ziegler et al. 2019, Huang et al. 2023). The reward of a text is the head's output at the text's
last real token — the EOS when the response ended, the last response token when it was cut —
read by the one function `reward_index` and applied by `score_sequences`, which every stage that
scores text (PPO, best-of-N, evaluation) imports.

Losses (config `loss.kind`), over a batch of prompts each with K ranked responses:

* `kwise` (Ouyang et al. 2022): `-(1/C) sum_{(w, l)} log sigmoid(r_w - r_l - margin)` over all
  C pairs with different ranks of one prompt, kept in one batch element (training on each pair as
  its own example overfits). With K = 2 it is Bradley-Terry.
* `pairwise`: the same pairs, each pair weighted as one example (plain Bradley-Terry on pairs).
* `best_of_k` (Ziegler et al. 2019): `-log softmax(r)[best]` over the present responses.

Normalisation (config `norm.method`), stored in the final checkpoint's metadata as
`reward_norm = {"gain", "bias", "method"}` and applied by `score_sequences`:

* `reference`: gain and bias so rewards of samples from the frozen reference (SFT) policy have
  mean 0 and std 1 (Ziegler et al. 2019); the samples come from the sampler, never from the
  training data (DESIGN.md pitfall 8).
* `demonstrations`: a bias so demonstrations average 0, gain 1 (Stiennon et al. 2020).
* `none`.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import models, sharding
from rlhf_jax.errors import UserError
from rlhf_jax.rewards import (NORM_METHODS, fit_norm, reference_rewards, score_batches,
                              score_sequences)

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


# ----------------------------------------------------------------------------------------------
# Evaluation (numpy, on rewards already computed).


def ranked_pairs(ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, winner, loser) index arrays of every ordered pair in rankings [N, K] (-1 absent)."""
    p = np.asarray(preference_pairs(jnp.asarray(ranks)))
    row, win, lose = np.nonzero(p)
    return row, win, lose


def _acc(diff: np.ndarray) -> float:
    diff = np.asarray(diff, np.float64)
    return float(np.mean((diff > 0) + 0.5 * (diff == 0))) if diff.size else float("nan")


def preference_metrics(ranks: np.ndarray, rewards: np.ndarray, *, raw: np.ndarray | None = None,
                       gold: np.ndarray | None = None, annotators: list[str] | None = None,
                       buckets: list[str] | None = None, annotator_names: dict | None = None,
                       gap_edges: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0)) -> dict:
    """Accuracy of `rewards` [N, K] against the labelled rankings, and its breakdowns.

    Every ordered pair of every ranking counts once; a reward tie counts one half. With `gold`
    [N, K], `gold_ceiling_accuracy` is the noiseless gold's accuracy on the same labels: the best
    the annotators' noise allows. Calibration bins pairs by |reward gap| (edges `gap_edges`, last
    bin open) and compares the accuracy with the Bradley-Terry probability the model gives its
    own pick, sigmoid(|raw gap|) (`raw`: unnormalised rewards; default `rewards`).
    """
    rewards = np.asarray(rewards, np.float64)
    raw = rewards if raw is None else np.asarray(raw, np.float64)
    row, w, l = ranked_pairs(ranks)
    diff = rewards[row, w] - rewards[row, l]
    out: dict[str, Any] = {"pairs": int(diff.size), "accuracy": _acc(diff)}
    gdiff = None
    if gold is not None:
        gold = np.asarray(gold, np.float64)
        gdiff = gold[row, w] - gold[row, l]
        out["gold_ceiling_accuracy"] = _acc(gdiff)

    def breakdown(labels, names=None):
        groups = {}
        lab = np.asarray([str(labels[r]) for r in row])
        for g in sorted(set(lab.tolist()), key=lambda x: (len(x), x)):
            sel = lab == g
            name = names.get(g, g) if names else g
            d = {"pairs": int(sel.sum()), "accuracy": _acc(diff[sel])}
            if gdiff is not None:
                d["gold_ceiling_accuracy"] = _acc(gdiff[sel])
            groups[name] = d
        return groups

    if annotators is not None and any(a != "" for a in annotators):
        out["per_annotator"] = breakdown(annotators, annotator_names)
    if buckets is not None and any(b != "" for b in buckets):
        out["per_bucket"] = breakdown(buckets)
    gap = np.abs(diff)
    conf = sigmoid_np(np.abs(raw[row, w] - raw[row, l]))
    edges = list(gap_edges) + [np.inf]
    cal = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (gap >= lo) & (gap < hi)
        if sel.any():
            cal.append({"gap_lo": float(lo), "gap_hi": float(hi), "pairs": int(sel.sum()),
                        "accuracy": _acc(diff[sel]), "predicted": float(conf[sel].mean())})
    out["calibration"] = cal
    return out


def judge_agreement(reward_diff: np.ndarray, gold_diff: np.ndarray) -> dict[str, float]:
    """How often the RM orders a pair as a gold judge does (gold ties left out)."""
    reward_diff, gold_diff = np.asarray(reward_diff), np.asarray(gold_diff)
    keep = gold_diff != 0
    return {"agreement": _acc(reward_diff[keep] * np.sign(gold_diff[keep])),
            "pairs": int(keep.sum())}


def sigmoid_np(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


# ----------------------------------------------------------------------------------------------
# The stage.

PREFERENCE_FILE_KINDS = ("preference_files",)
CANDIDATE_SOURCES = ("dataset", "policy", "mixed")


def _validate(config) -> None:
    if not config.init_from:
        raise UserError("config.init_from", "is empty: the reward model starts from a finished "
                        "SFT stage", "give its work dir (or 'zoo:<preset>' / 'hf:<dir>')")
    if config.loss.kind not in LOSS_KINDS:
        raise UserError("config.loss.kind", f"{config.loss.kind!r} must be one of {LOSS_KINDS}")
    if config.loss.margin and config.loss.kind == "best_of_k":
        raise UserError("config.loss.margin", "applies to the pairwise / kwise losses, not "
                        "best_of_k", "set it to 0 or pick another config.loss.kind")
    if config.norm.method not in NORM_METHODS:
        raise UserError("config.norm.method", f"{config.norm.method!r} must be one of "
                        f"{NORM_METHODS}")
    if config.data.candidates not in CANDIDATE_SOURCES:
        raise UserError("config.data.candidates", f"{config.data.candidates!r} must be one of "
                        f"{CANDIDATE_SOURCES}")
    kind = config.data.source.kind
    if kind not in ("sim",) + PREFERENCE_FILE_KINDS:
        raise UserError("config.data.source.kind", f"{kind!r} must be 'sim' or "
                        "'preference_files'")
    if kind != "sim" and config.data.candidates != "dataset":
        raise UserError("config.data.candidates", "'policy'/'mixed' needs the simulated world's "
                        "annotators", "use data.source.kind='sim' or candidates='dataset'")
    if config.train.epochs < 0:
        raise UserError("config.train.epochs", f"{config.train.epochs} must be >= 0 (0: use "
                        "config.train.steps)")


def _tokenizer(config, meta):
    from transformers import AutoTokenizer

    if config.tokenizer:
        return AutoTokenizer.from_pretrained(config.tokenizer), str(config.tokenizer)
    if meta.get("tokenizer_dir"):
        return AutoTokenizer.from_pretrained(meta["tokenizer_dir"]), str(meta["tokenizer_dir"])
    if config.data.source.kind != "sim":
        raise UserError("config.tokenizer", "is empty and init_from gives none",
                        "set --config.tokenizer=<a Hugging Face tokenizer directory>")
    from rlhf_jax.sim.tokenizer import world_tokenizer

    tok, path = world_tokenizer(int(config.data.source.seed))
    return tok, str(path)


def _files(value) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def load_preference_records(source) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """Records and stats of both splits of a data source (simulated or preference files)."""
    from rlhf_jax.data import builders
    from rlhf_jax.data import preference_formats as pf
    from rlhf_jax.paths import cache_dir

    src = source.to_dict() if hasattr(source, "to_dict") else dict(source)
    if src["kind"] == "sim":
        out, stats = {}, {}
        for split in ("train", "eval"):
            out[split], stats[split] = builders.load_comparisons(src, split)
        return out, stats
    allowed = {"kind", "format", "train", "eval", "train_split", "eval_split", "skip_bad_rows",
               "data_dir"}
    unknown = sorted(set(src) - allowed)
    if unknown:
        raise UserError("config.data.source", f"unknown field(s) {unknown} for kind "
                        "'preference_files'", f"allowed: {sorted(allowed)}")
    if src.get("format") not in pf.FORMATS:
        raise UserError("config.data.source.format", f"{src.get('format')!r} must be one of "
                        f"{sorted(pf.FORMATS)}")
    splits = {}
    for split in ("train", "eval"):
        files = _files(src.get(split))
        if not files:
            raise UserError(f"config.data.source.{split}", "names no file",
                            "give one or more preference data files")
        for f in files:
            if not os.path.isfile(f):
                raise UserError(f"config.data.source.{split}", f"no such file {f!r}")
        splits[split] = {"format": src["format"], "files": files,
                         "skip_bad_rows": bool(src.get("skip_bad_rows", False))}
        if src.get(f"{split}_split"):
            splits[split]["split"] = src[f"{split}_split"]
    data_dir = src.get("data_dir") or str(cache_dir() / "tfds")
    return pf.build_preference_dataset(splits, data_dir)


def policy_comparisons(policy_cfg, policy_params, tokenizer, prompts, rng, *, k, judge_name,
                       target_agreement, flip_prob, pool_name, seed, max_prompt_len,
                       max_new_tokens, temperature, batch_size):
    """K samples of the policy per prompt, ranked by the simulated annotator pool.

    What InstructGPT's labelers ranked: outputs of the policy being improved. The pool's tau is
    calibrated on these samples' own gold gaps, so agreement with gold is `target_agreement` as
    for the world's candidates.
    """
    from rlhf_jax import evaluation
    from rlhf_jax.sim import annotators
    from rlhf_jax.sim.judges import get_judge

    rep = [p for p in prompts for _ in range(k)]
    s = evaluation.sample_texts(policy_cfg, policy_params, tokenizer, rep, rng,
                                max_prompt_len=max_prompt_len, max_new_tokens=max_new_tokens,
                                temperature=temperature, batch_size=batch_size)
    responses = [s["responses"][i * k:(i + 1) * k] for i in range(len(prompts))]
    gold = get_judge(judge_name).score(rep, s["responses"]).reshape(len(prompts), k)
    gold_gaps = np.abs(gold[:, :, None] - gold[:, None, :])
    if not np.any(gold_gaps > 1e-9):
        raise ValueError("policy samples all got the same gold score: nothing to rank")
    tau = annotators.calibrate_tau(gold, target_agreement, flip_prob, seed=seed)
    if pool_name == "default":
        pool = annotators.default_pool(tau, flip_prob)
    else:
        pool = annotators.AnnotatorPool((annotators.Annotator(0, tau, "unbiased", flip_prob),))
    ranks, ids = pool.rank(gold, responses, np.random.default_rng([seed, 97]))
    records, dropped = [], 0
    for i, p in enumerate(prompts):
        # Samples that came out identical carry no preference between them; drop such rows.
        if len(set(responses[i])) < 2:
            dropped += 1
            continue
        records.append({"prompt": p, "responses": list(responses[i]),
                        "ranks": [int(r) for r in ranks[i]], "gold": [float(g) for g in gold[i]],
                        "kinds": ["policy"] * k, "annotator": str(int(ids[i])), "bucket": "policy",
                        "source": f"policy:{i}"})
    return records, {"examples": len(records), "dropped_identical": dropped, "tau": float(tau),
                     "ended_frac": float(np.mean(s["ended"]))}


def _encode(tokenizer, records, max_len):
    from rlhf_jax.data import tokenize

    if not records:
        raise UserError("config.data.source", "no comparisons to encode (every row was dropped "
                        "or the split is empty)")
    batch, stats = tokenize.encode_comparisons(
        tokenizer, [r["prompt"] for r in records], [r["responses"] for r in records],
        [r["ranks"] for r in records], max_len)
    return {"tokens": batch["tokens"], "mask": batch["mask"], "rank": batch["rank"]}, stats


def _pad_rows(arrays: dict, n: int) -> dict:
    """Append all-padding comparisons (rank -1: no preference, loss weight 0) up to n rows."""
    extra = n - arrays["tokens"].shape[0]
    if extra <= 0:
        return arrays
    out = {}
    for k, v in arrays.items():
        fill = -1 if k == "rank" else 0
        out[k] = np.concatenate([v, np.full((extra,) + v.shape[1:], fill, v.dtype)])
    return out


def _gold_array(records) -> np.ndarray | None:
    if not records or "gold" not in records[0]:
        return None
    K = max(len(r["responses"]) for r in records)
    g = np.zeros((len(records), K))
    for i, r in enumerate(records):
        g[i, :len(r["gold"])] = r["gold"]
    return g


def _annotator_names(source) -> dict[str, str] | None:
    if source.kind != "sim" or source.get("pool", "default") != "default":
        return None
    from rlhf_jax.sim import annotators

    return {str(a.annotator_id): f"{a.annotator_id}:{a.name}"
            for a in annotators.default_pool(1.0).annotators}


def run(config) -> dict:
    """(config, SFT checkpoint, comparisons) -> `workdir/final` RM params + summary.json.

    The final checkpoint's metadata holds `model_config`, `tokenizer_dir` and `reward_norm`
    (gain, bias, method), which `score_sequences` applies for every later stage.
    """
    import logging
    import time

    from rlhf_jax import evaluation
    from rlhf_jax import trainer as trainer_lib
    from rlhf_jax.data import builders, tokenize
    from rlhf_jax.data.iterators import ArrayIterator
    from rlhf_jax.handoff import resolve_init
    from rlhf_jax.sim.judges import get_judge

    t_start = time.perf_counter()
    _validate(config)
    cfg, init_params, meta = resolve_init(config.init_from)
    tokenizer, tok_dir = _tokenizer(config, meta)
    if len(tokenizer) > cfg.vocab_size:
        raise UserError("config.tokenizer" if config.tokenizer else "config.init_from",
                        f"the tokenizer at {tok_dir} has {len(tokenizer)} tokens but the model's "
                        f"vocab_size is {cfg.vocab_size}", "use the model's own tokenizer")
    cfg = cfg.replace(dropout=0.0)  # Huang et al. 2023: dropout off in every stage
    pad_id, eos_id = tokenize.special_ids(tokenizer)
    policy_params = init_params  # the frozen reference policy: the SFT model itself
    if not cfg.tie_embeddings and "lm_head" not in policy_params:
        raise UserError("config.init_from", f"{config.init_from!r} holds no LM head: the reward "
                        "model needs the SFT policy (to sample for normalisation)",
                        "give the SFT stage's work dir, not an RM checkpoint")

    # -- data ---------------------------------------------------------------------------------
    src = config.data.source
    t0 = time.perf_counter()
    records, load_stats = load_preference_records(src)
    data_info: dict[str, Any] = {"candidates": config.data.candidates}
    if config.data.candidates != "dataset":
        n_policy = {s: len(records[s]) for s in records}
        if config.data.candidates == "mixed":
            n_policy = {s: n // 2 for s, n in n_policy.items()}
        pd = config.policy_data
        for i, split in enumerate(("train", "eval")):
            prompts, _ = builders.load_prompts(
                {"kind": "sim", "seed": src.seed, "num_train": n_policy["train"],
                 "num_eval": n_policy["eval"]}, split)
            recs, st = policy_comparisons(
                cfg, policy_params, tokenizer, prompts[:n_policy[split]],
                jax.random.fold_in(jax.random.key(config.seed), 1000 + i), k=int(src.k),
                judge_name=src.judge, target_agreement=float(src.target_agreement),
                flip_prob=float(src.flip_prob), pool_name=src.pool, seed=int(src.seed) + i,
                max_prompt_len=pd.max_prompt_len, max_new_tokens=pd.max_new_tokens,
                temperature=pd.temperature, batch_size=pd.batch_size)
            keep = len(records[split]) - n_policy[split] if config.data.candidates == "mixed" else 0
            records[split] = records[split][:keep] + recs
            load_stats[split] = {**load_stats[split], "policy": st}
    train_arrays, train_enc = _encode(tokenizer, records["train"], config.data.max_len)
    eval_arrays, eval_enc = _encode(tokenizer, records["eval"], config.data.max_len)
    data_info.update(
        train={**load_stats["train"], **train_enc, "comparisons": len(records["train"])},
        eval={**load_stats["eval"], **eval_enc, "comparisons": len(records["eval"])},
        seconds=round(time.perf_counter() - t0, 2))
    n_train = train_arrays["tokens"].shape[0]
    logging.info("rm data: %s", data_info)

    bs = config.train.batch_size
    if config.train.epochs > 0:
        # InstructGPT trains the RM for one epoch: more overfits the comparisons.
        config.train.steps = max(1, int(config.train.epochs * n_train) // bs)
        config.optim.warmup_steps = min(config.optim.warmup_steps, config.train.steps)

    # -- model --------------------------------------------------------------------------------
    tr = trainer_lib.Trainer(config, "rm")
    head = jax.jit(lambda k: models.init_params(cfg, k, ("score",))["score_head"])(
        jax.random.fold_in(jax.random.key(config.seed), 17))  # only the head survives DCE
    rm_init = {**models.trunk(init_params), "score_head": jax.device_get(head)}
    axes = models.param_axes(cfg, ("score",))
    optimizer = trainer_lib.make_optimizer(config.optim, config.train.steps)
    state, _ = tr.create_state(rm_init, axes, optimizer)
    tr.metadata.update(model_config=cfg.to_dict(), tokenizer_dir=tok_dir,
                       init_from=str(config.init_from), data_stats=data_info,
                       reward_norm={"gain": 1.0, "bias": 0.0, "method": "none"})

    kind, margin = config.loss.kind, float(config.loss.margin)

    def loss_fn(params, batch, rng):
        del rng  # dropout is off
        scores = score_sequences(cfg, params, batch["tokens"], batch["mask"])
        return rm_loss(scores, batch["rank"], kind=kind, margin=margin)

    step = trainer_lib.make_train_step(loss_fn, optimizer, config.train.accum_steps)
    eval_step = tr.jit_eval(trainer_lib.make_eval_step(loss_fn))
    train_iter = ArrayIterator(train_arrays, bs, seed=config.seed)
    # Held-out batches: padded with rows of no preference (rank -1, weight 0) to a batch size
    # the mesh can split, so every held-out comparison is evaluated and none counts twice.
    data_par, fsdp_par, _ = sharding.mesh_shape(config.mesh, jax.device_count())
    shards = data_par * fsdp_par
    n_eval_rows = eval_arrays["tokens"].shape[0]
    eval_bs = min(bs, -(-n_eval_rows // shards) * shards)
    padded_eval = _pad_rows(eval_arrays, -(-n_eval_rows // eval_bs) * eval_bs)

    def eval_fn(st):
        it = ArrayIterator(padded_eval, eval_bs, seed=0, shuffle=False)
        n = min(config.train.eval_batches or it.batches_per_epoch, it.batches_per_epoch)
        return tr.evaluate(eval_step, st.params, it, num_batches=n)

    # -- normalisation (computed on the trained RM, before the final params are written) -------
    nc = config.norm
    norm_prompts = None
    if nc.method == "reference":
        if src.kind == "sim":
            norm_prompts, _ = builders.load_prompts(
                {"kind": "sim", "seed": src.seed, "num_train": nc.num_samples, "num_eval": 0},
                "train")
        else:
            norm_prompts = list(dict.fromkeys(r["prompt"] for r in records["train"]))
        repeats = -(-nc.num_samples // max(len(norm_prompts), 1))  # few real prompts: reuse them
        norm_prompts = (norm_prompts * repeats)[:nc.num_samples]
    norm_info: dict[str, Any] = {}

    def fit_reward_norm(params) -> dict:
        if nc.method == "none":
            return fit_norm(np.zeros(2), "none")
        if nc.method == "reference":
            enc, _ = tokenize.encode_prompts(tokenizer, norm_prompts, nc.max_prompt_len)
            raw, info = reference_rewards(
                cfg, policy_params, cfg, params, enc["prompt_tokens"], enc["prompt_mask"],
                jax.random.fold_in(jax.random.key(config.seed), 2000),
                max_new_tokens=nc.max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                temperature=nc.temperature, batch_size=nc.batch_size)
            norm_info.update(info)
        else:  # demonstrations (Stiennon et al. 2020)
            if src.kind == "sim":
                prompts, completions, _ = builders.load_sft_texts(
                    {"kind": "sim", "seed": src.seed, "num_train": nc.num_samples,
                     "num_eval": 0}, "train")
            else:  # real preference data: the preferred responses stand in for demonstrations
                best = [(r["prompt"], r["responses"][int(np.argmin(r["ranks"]))])
                        for r in records["train"][:nc.num_samples]]
                prompts, completions = [b[0] for b in best], [b[1] for b in best]
            enc, _ = tokenize.encode_sft(tokenizer, prompts, completions, config.data.max_len)
            raw = score_batches(cfg, params, enc["tokens"], enc["mask"], batch_size=nc.batch_size)
        return fit_norm(raw, nc.method, nc.target_mean, nc.target_std)

    def final_params(st):
        params = jax.device_get(st.params)
        norm = fit_reward_norm(params)
        tr.metadata["reward_norm"] = norm
        logging.info("reward normalisation: %s", norm)
        return st.params

    t_train = time.perf_counter()
    state = tr.fit(state, step, train_iter, eval_fn=eval_fn, final_params=final_params)
    train_seconds = time.perf_counter() - t_train
    if tr.metadata["reward_norm"]["method"] != nc.method:  # resumed after the final save
        from rlhf_jax import checkpoint

        _, final_meta = checkpoint.load_stage_params(tr.workdir)
        tr.metadata["reward_norm"] = final_meta["reward_norm"]
    norm = tr.metadata["reward_norm"]

    # -- evaluation ---------------------------------------------------------------------------
    ev = config.eval
    params = jax.device_get(state.params)
    raw_eval = score_batches(cfg, params, eval_arrays["tokens"], eval_arrays["mask"],
                             batch_size=ev.batch_size)
    rewards_eval = raw_eval * norm["gain"] + norm["bias"]
    held = preference_metrics(
        eval_arrays["rank"], rewards_eval, raw=raw_eval, gold=_gold_array(records["eval"]),
        annotators=[r.get("annotator", "") for r in records["eval"]],
        buckets=[r.get("bucket", "") for r in records["eval"]],
        annotator_names=_annotator_names(src), gap_edges=tuple(ev.gap_edges))
    summary: dict[str, Any] = {
        "held_out_accuracy": held["accuracy"],
        "gold_ceiling_accuracy": held.get("gold_ceiling_accuracy"),
        "held_out_pairs": held["pairs"],
        "per_annotator": held.get("per_annotator", {}),
        "per_bucket": held.get("per_bucket", {}),
        "calibration": held["calibration"],
        "reward_norm": norm,
        "loss_kind": kind,
        "data": data_info,
        "train_comparisons": n_train,
    }
    if summary["gold_ceiling_accuracy"] is not None:
        summary["gap_to_ceiling"] = summary["gold_ceiling_accuracy"] - summary["held_out_accuracy"]
    if norm_info:
        summary["reference_samples"] = norm_info

    agreement: dict[str, Any] = {}
    judges = {name: get_judge(name) for name in ev.judges}
    if src.kind == "sim" and judges and ev.fresh_world_pairs > 0:
        # Fresh pairs: the world's candidates on its "test" split, never used for training.
        from rlhf_jax.sim.world import get_world

        items = get_world(int(src.seed)).comparison_candidates(0, ev.fresh_world_pairs, 2, "test")
        recs = [{"prompt": p, "responses": rs, "ranks": [0, 1]} for p, rs, _ in items]
        arr, _ = _encode(tokenizer, recs, config.data.max_len)
        r = score_batches(cfg, params, arr["tokens"], arr["mask"], norm, ev.batch_size)
        flat_p = [p for p, rs, _ in items for _ in rs]
        flat_r = [x for _, rs, _ in items for x in rs]
        agreement["world_pairs"] = {}
        for name, j in judges.items():
            g = j.score(flat_p, flat_r).reshape(-1, 2)
            agreement["world_pairs"][name] = judge_agreement(r[:, 0] - r[:, 1], g[:, 0] - g[:, 1])
    if judges and ev.fresh_policy_pairs > 0 and src.kind == "sim":
        # Pairs of fresh SFT-policy samples: what PPO's first rollouts look like to the RM.
        prompts, _ = builders.load_prompts(
            {"kind": "sim", "seed": src.seed, "num_train": 0, "num_eval": ev.fresh_policy_pairs},
            "eval")
        rep = [p for p in prompts for _ in range(2)]
        s = evaluation.sample_texts(cfg, policy_params, tokenizer, rep,
                                    jax.random.fold_in(tr.eval_rng, 3000),
                                    max_prompt_len=nc.max_prompt_len,
                                    max_new_tokens=nc.max_new_tokens, temperature=nc.temperature,
                                    batch_size=nc.batch_size)
        seq_t = np.concatenate([s["prompt_tokens"], s["tokens"]], axis=1)
        seq_m = np.concatenate([s["prompt_mask"], s["mask"]], axis=1)
        r = score_batches(cfg, params, seq_t, seq_m, norm, ev.batch_size)
        agreement["policy_pairs"] = {}
        for name, j in judges.items():
            g = j.score(rep, s["responses"])
            agreement["policy_pairs"][name] = judge_agreement(r[0::2] - r[1::2], g[0::2] - g[1::2])
        # Fresh reference samples after normalisation (Ziegler: mean 0, std 1 by construction).
        summary["fresh_reference_rewards"] = {"mean": float(r.mean()), "std": float(r.std()),
                                              "n": int(r.size)}
    summary["judge_agreement"] = agreement
    summary["train_seconds"] = round(train_seconds, 1)
    summary["runtime_seconds"] = round(time.perf_counter() - t_start, 1)
    tr.write_summary(summary)
    out = dict(tr.summary)
    tr.close()
    return out


def main(config) -> dict:
    import json

    summary = run(config)
    keys = ("held_out_accuracy", "gold_ceiling_accuracy", "gap_to_ceiling", "judge_agreement",
            "reward_norm", "runtime_seconds")
    print(json.dumps({k: summary.get(k) for k in keys}, indent=2, default=str))
    return summary


if __name__ == "__main__":
    from rlhf_jax import config_utils

    config_utils.run_with_config(main)
