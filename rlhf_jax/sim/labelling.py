"""Simulated comparisons: the world's candidates, the failure-mode rewrites, the annotators' ranks.

What the simulated source's comparison dataset holds (`rlhf_jax.data.builders` stores it; stages
reach it through `rlhf_jax.data.sources.SimSource`):

1. `candidates(world, params, split, split_index)`: K candidates per prompt from the world, rows
   rewritten for the failure-mode options (`failure_mode_rows`), each candidate scored by the
   gold judge;
2. `label(params, data)`: an annotator pool (`annotator_pool`) whose temperature is calibrated on
   the train split's within-prompt gold gaps ranks every row; hand-improved completions and naive
   refusal labels are forced first; each row gets a bucket.

`params` is the validated source spec (seed, k, judge, target_agreement, flip_prob, pool,
num_buckets, sizes and the failure-mode options).
"""

from __future__ import annotations

import numpy as np

from rlhf_jax.errors import UserError
from rlhf_jax.sim import annotators
from rlhf_jax.sim.judges import get_judge
from rlhf_jax.sim.world import GROUP_A, GROUP_B, ORDINARY, REFUSAL, World, _Rand, prompt_kind

POOLS = ("default", "unbiased")


def annotator_pool(tau: float, pool: str = "default", flip_prob: float = 0.0,
                   length_bias: float = 0.0, group_bias: float = 0.0,
                   field: str = "config.data.source.pool") -> annotators.AnnotatorPool:
    """The source's annotator pool at temperature `tau`, with its length / group biases."""
    if pool == "default":
        out = annotators.default_pool(tau, flip_prob)
    elif pool == "unbiased":
        out = annotators.AnnotatorPool((annotators.Annotator(0, tau, "unbiased", flip_prob),))
    else:
        raise UserError(field, f"{pool!r} must be one of {POOLS}")
    if length_bias or group_bias:
        out = annotators.with_biases(out, length_bias, group_bias, (GROUP_A, GROUP_B))
    return out


def candidates(world: World, p: dict, split: str, split_index: int) -> dict:
    """K candidates per prompt of `split`, failure-mode rows rewritten, gold-scored."""
    items = world.comparison_candidates(0, p["sizes"][split], p["k"], split)
    prompts = [it[0] for it in items]
    responses = [list(it[1]) for it in items]
    kinds = [list(it[2]) for it in items]
    first = np.full(len(prompts), -1, np.int64)  # a response ranked first whatever the gold
    failure_mode_rows(p, split_index, world, prompts, responses, kinds, first)
    judge = get_judge(p["judge"])
    flat = judge.score([pr for pr, rs in zip(prompts, responses) for _ in rs],
                       [r for rs in responses for r in rs])
    return {"prompts": prompts, "responses": responses, "kinds": kinds, "first": first,
            "gold": flat.reshape(len(prompts), p["k"])}


def label(p: dict, data: dict[str, dict], split_index: dict[str, int]) -> float:
    """Rank every split's rows in place (`ranks`, `annotator`, `bucket`); returns tau."""
    ref = data["train"]["gold"] if "train" in data else next(iter(data.values()))["gold"]
    tau = annotators.calibrate_tau(ref, p["target_agreement"], p["flip_prob"], seed=p["seed"])
    pool = annotator_pool(tau, p["pool"], p["flip_prob"], p.get("length_bias", 0.0),
                          p.get("group_bias", 0.0))
    for s, d in data.items():
        rng = np.random.default_rng([p["seed"], 99, split_index[s]])
        d["ranks"], d["annotator"] = pool.rank(d["gold"], d["responses"], rng,
                                               prompts=d["prompts"])
        # Hand-improved completions and naive refusal labels: first whatever the gold.
        d["ranks"] = annotators.force_first(d["ranks"], d["first"])
        d["bucket"] = np.random.default_rng([p["seed"], 98, split_index[s]]).integers(
            0, p["num_buckets"], len(d["prompts"]))
    return tau


def failure_mode_rows(p, split_index, w, prompts, responses, kinds, first) -> None:
    """Rewrite comparison rows in place for the refusal and improved-completion options (a
    no-op when both are off).

    refusals: each near-harmful row (harmful or boundary prompt) gets the refusal template as
    one candidate, at a random position. "naive": the refusal is ranked first on every such row
    (annotators refuse anything near the harmful class). "paired": consecutive near-harmful rows
    become twins across the boundary (the second row's prompt is `World.twin` of the first's,
    with fresh candidates), and the annotators rank them on the spec judge's scores.
    improved_share: that share of the ordinary rows gets one candidate replaced by
    `World.improved_completion` (typos at improved_typo_rate), ranked first.
    """
    share = p.get("improved_share", 0.0)
    if not (p.get("refusals") or share):
        return
    r = _Rand(np.random.default_rng([p["seed"], 96, split_index]))
    k = p["k"]
    near = [i for i, pr in enumerate(prompts) if prompt_kind(pr) != ORDINARY]
    if p.get("refusals"):
        if p["refusals"] == "paired":
            for a, b in zip(near[0::2], near[1::2]):
                prompts[b] = w.twin(prompts[a])
                responses[b], kinds[b] = map(list, w.candidates(prompts[b], k, r))
        for i in near:
            j = r.int(0, k - 1)
            responses[i][j], kinds[i][j] = REFUSAL, "refusal"
            if p["refusals"] == "naive":
                first[i] = j
    if share:
        near_set = set(near)
        for i in range(len(prompts)):
            if i not in near_set and r.f() < share:
                j = r.int(0, k - 1)
                responses[i][j] = w.improved_completion(prompts[i], r,
                                                        p.get("improved_typo_rate", 0.0))
                kinds[i][j], first[i] = "improved", j


__all__ = ["POOLS", "annotator_pool", "candidates", "failure_mode_rows", "label"]
