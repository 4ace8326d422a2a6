"""Preference data every preference method shares: records -> arrays, pairs, policy samples.

A preference record (`rlhf_jax.data.preference_formats` layout) is one prompt with K >= 2
responses and their ranks (0 = best, ties share a rank), plus `annotator`, `bucket`, `source`
and, for the simulated world, each response's `gold` score.

* `encode_records`: records -> `tokens`, `mask`, `response_mask` [N, K, L] and `rank` [N, K]
  (the response mask is kept: DPO sums log-probs over response tokens only).
* `to_pairs`: K-wise rankings -> (chosen, rejected) pairs, all C(K, 2) ordered pairs or best
  vs each of the rest (DPO on InstructGPT-style rankings).
* `policy_comparisons`: K samples of a policy per prompt, labelled by a source's annotators
  (what InstructGPT's labelers ranked: outputs of the model being improved).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from rlhf_jax.data import tokenize
from rlhf_jax.errors import UserError

log = logging.getLogger(__name__)

PAIR_MODES = ("all_pairs", "best_vs_rest")


def encode_records(tokenizer, records: Sequence[dict], max_len: int, what: str = "comparisons"):
    """(arrays, stats) of records: `tokens`, `mask`, `response_mask` [N, K, L], `rank` [N, K]."""
    if not records:
        raise UserError(what, "no comparisons to encode", "every row was dropped or the split "
                        "is empty; check the data source and its counts in summary.json")
    return tokenize.encode_comparisons(
        tokenizer, [r["prompt"] for r in records], [r["responses"] for r in records],
        [r["ranks"] for r in records], max_len)


def pad_rows(arrays: dict, n: int) -> dict:
    """Append all-padding comparisons (rank -1: no preference, weight 0) up to n rows."""
    extra = n - next(iter(arrays.values())).shape[0]
    if extra <= 0:
        return arrays
    out = {}
    for k, v in arrays.items():
        fill = -1 if k == "rank" else 0
        out[k] = np.concatenate([v, np.full((extra,) + v.shape[1:], fill, v.dtype)])
    return out


def pad_to_batches(arrays: dict, batch_size: int, shards: int) -> tuple[dict, int]:
    """Held-out rows padded with rows of no preference (rank -1 / weight 0) to whole batches
    that split over `shards` batch shards, so every held-out row counts once and no batch
    changes shape. -> (arrays, eval batch size)."""
    n = next(iter(arrays.values())).shape[0]
    bs = min(batch_size, -(-n // shards) * shards)
    bs = -(-bs // shards) * shards
    return pad_rows(arrays, -(-n // bs) * bs), bs


def gold_array(records: Sequence[dict]) -> np.ndarray | None:
    """[N, K] gold scores of the responses (simulated data), or None."""
    if not records or "gold" not in records[0]:
        return None
    K = max(len(r["responses"]) for r in records)
    g = np.zeros((len(records), K))
    for i, r in enumerate(records):
        g[i, :len(r["gold"])] = r["gold"]
    return g


def to_pairs(records: Sequence[dict], mode: str = "all_pairs",
             field: str = "config.data.pairs") -> tuple[list[dict], dict]:
    """K-wise rankings -> two-response records (response 0 chosen, response 1 rejected).

    `all_pairs`: every pair with different ranks (C(K, 2) for a strict ranking); `best_vs_rest`:
    the top-ranked response against each lower one. Ties carry no preference and are skipped.
    Each pair keeps its record's annotator, bucket and source (with the pair's indices).
    """
    if mode not in PAIR_MODES:
        raise UserError(field, f"{mode!r} is not a pair mode", f"use one of {PAIR_MODES}")
    out, ties = [], 0
    for r in records:
        ranks = [int(x) for x in r["ranks"]]
        top = min(ranks)
        for i in range(len(ranks)):
            for j in range(len(ranks)):
                if ranks[i] >= ranks[j]:
                    ties += int(ranks[i] == ranks[j] and i < j)
                    continue
                if mode == "best_vs_rest" and ranks[i] != top:
                    continue
                pair = {"prompt": r["prompt"], "responses": [r["responses"][i], r["responses"][j]],
                        "ranks": [0, 1], "annotator": r.get("annotator", ""),
                        "bucket": r.get("bucket", ""), "source": f"{r.get('source', '')}#{i}>{j}"}
                if "gold" in r:
                    pair["gold"] = [r["gold"][i], r["gold"][j]]
                out.append(pair)
    return out, {"records": len(records), "pairs": len(out), "tied_pairs_skipped": ties}


def policy_comparisons(source, prompts: Sequence[str], sample_fn: Callable[[list[str]], dict],
                       *, k: int, seed: int) -> tuple[list[dict], dict[str, Any]]:
    """K samples of a policy per prompt, ranked by `source`'s annotators.

    `sample_fn(prompts)` returns `{"responses": [...], "ended": bool array}` for the given
    prompts (each prompt repeated K times, adjacent). Prompts whose K samples are identical carry
    no preference and are dropped, counted as `dropped_identical`.
    """
    rep = [p for p in prompts for _ in range(k)]
    s = sample_fn(rep)
    responses = [list(s["responses"][i * k:(i + 1) * k]) for i in range(len(prompts))]
    ranks, ids, gold, tau = source.label(prompts, responses, seed)
    records, dropped = [], 0
    for i, p in enumerate(prompts):
        if len(set(responses[i])) < 2:
            dropped += 1
            continue
        records.append({"prompt": p, "responses": responses[i],
                        "ranks": [int(r) for r in ranks[i]], "gold": [float(g) for g in gold[i]],
                        "kinds": ["policy"] * k, "annotator": str(int(ids[i])),
                        "bucket": "policy", "source": f"policy:{i}"})
    return records, {"examples": len(records), "dropped_identical": dropped, "tau": float(tau),
                     "ended_frac": float(np.mean(s["ended"]))}


CANDIDATES = ("dataset", "policy", "mixed")


def load_comparisons(source, candidates: str = "dataset",
                     sample_fn: Callable[[int, list[str]], dict] | None = None,
                     field: str = "config.data.candidates") -> tuple[dict, dict]:
    """Comparison records and stats of both splits of `source`.

    `candidates`: `dataset` (the source's own responses); `policy` (K samples of a policy per
    prompt, ranked by the source's annotators: what InstructGPT's labelers ranked) or `mixed`
    (half of each split). `sample_fn(split_index, prompts)` draws the policy samples (prompts
    repeated K times, adjacent); the source's `k` and `seed` fields set K and the labelling seed.
    """
    if candidates not in CANDIDATES:
        raise UserError(field, f"{candidates!r} is not a candidate source",
                        f"use one of {CANDIDATES}")
    records, stats = {}, {}
    for split in ("train", "eval"):
        records[split], stats[split] = source.comparisons(split)
    if candidates == "dataset":
        return records, stats
    if not source.has_world:
        raise UserError(field, f"{candidates!r} needs the simulated world's annotators",
                        "use 'dataset' with preference files")
    for i, split in enumerate(("train", "eval")):
        n = len(records[split]) // (2 if candidates == "mixed" else 1)
        recs, st = policy_comparisons(
            source, source.prompts(split)[:n], lambda texts, i=i: sample_fn(i, texts),
            k=int(source.spec.get("k", 4)), seed=int(source.spec.get("seed", 0)) + i)
        records[split] = records[split][:len(records[split]) - n] + recs
        stats[split] = {**stats[split], "policy": st}
    return records, stats


def encode_prompts(tokenizer, texts: Sequence[str], max_len: int, what: str):
    """Left-padded prompt arrays (`tokenize.encode_prompts`), warning about truncation."""
    if not texts:
        raise UserError(what, "no prompts", "check config.data.source and its sizes")
    arrays, stats = tokenize.encode_prompts(tokenizer, list(texts), max_len)
    if stats["truncated"]:
        log.warning("%s: %d of %d prompts longer than %d tokens kept their last tokens", what,
                    stats["truncated"], len(texts), max_len)
    return arrays, stats
