"""Simulated annotators: noisy, biased labelers of the gold judge's preferences.

A Bradley-Terry labeler prefers a over b with `P(a > b) = sigmoid((g(a) - g(b)) / tau)`, where g
is the gold score. `calibrate_tau` picks tau so the labeler agrees with the noiseless gold
ordering as often as InstructGPT's labelers agreed with each other (~73%, Ouyang et al. 2022).
K-wise rankings are Plackett-Luce draws with utilities g / tau + bias (Gumbel-max: sorting
u + Gumbel noise is an exact PL sample, and for K = 2 it is the Bradley-Terry rule above).

As in AlpacaFarm (Dubois et al. 2023), a pool mixes annotators with different biases: length
(verbose / concise), a keyword liking, position (prefers what is shown first), noise level and
label flips; over-optimization only shows up when annotators vary. Everything is deterministic
given a numpy Generator.

The causes of the ChatGPT talk's failure modes (issue 16) are options here and in the simulated
comparisons builder (`rlhf_jax.data.builders`):
- a group bias: `Annotator.group_bias` scales how much the gold matters by the prompt's group
  (`with_biases` sets it on a whole pool);
- a length bias (Singhal et al. 2023): `Annotator.length_bias`, per word, on a whole pool with
  `with_biases`;
- labels that put one response first whatever the gold says (hand-improved completions, naive
  refusal labels): `force_first`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

_WORD = re.compile(r"[a-z']+")


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _gaps(gold: np.ndarray, num_pairs: int, rng: np.random.Generator) -> np.ndarray:
    """|g_a - g_b| over the pairs a labeler would see, ties (no gold order) removed."""
    gold = np.asarray(gold, dtype=np.float64)
    if gold.ndim == 1:
        if gold.size < 2:
            raise ValueError("calibrate_tau needs at least 2 gold scores")
        i = rng.integers(0, gold.size, num_pairs)
        j = rng.integers(0, gold.size - 1, num_pairs)
        j = j + (j >= i)  # uniform over j != i
        d = np.abs(gold[i] - gold[j])
    elif gold.ndim == 2:
        # [N, K]: the pairs inside each row, as in K-wise comparison data.
        a, b = np.triu_indices(gold.shape[1], k=1)
        d = np.abs(gold[:, a] - gold[:, b]).ravel()
    else:
        raise ValueError(f"gold scores must be [N] or [N, K], got shape {gold.shape}")
    d = d[np.isfinite(d) & (d > 1e-9)]
    if d.size == 0:
        raise ValueError("all gold scores are tied: there is no gold ordering to agree with")
    return d


def agreement(gold_gaps: np.ndarray, tau: float, flip_prob: float = 0.0) -> float:
    """Expected share of labels that agree with the gold order, for these |gaps|."""
    a = float(np.mean(_sigmoid(np.asarray(gold_gaps) / tau)))
    return (1.0 - flip_prob) * a + flip_prob * (1.0 - a)


def calibrate_tau(gold_score_sample, target_agreement: float = 0.73, flip_prob: float = 0.0,
                  num_pairs: int = 200_000, seed: int = 0) -> float:
    """tau such that a Bradley-Terry labeler agrees with the gold order `target_agreement` of the time.

    Solves E[sigmoid(|g_a - g_b| / tau)] = a' by bisection in log tau, the expectation over
    pairs from `gold_score_sample` ([N]: random pairs; [N, K]: within-row pairs), ties left out.
    With label flips, the noiseless part must reach a' = (target - f) / (1 - 2 f).
    """
    if not 0.0 <= flip_prob < 0.5:
        raise ValueError(f"flip_prob must be in [0, 0.5), got {flip_prob}")
    a_eff = (target_agreement - flip_prob) / (1.0 - 2.0 * flip_prob)
    if not 0.5 < a_eff < 1.0:
        raise ValueError(f"target_agreement={target_agreement} is unreachable with flip_prob="
                         f"{flip_prob}: it must lie in (0.5, {1 - flip_prob})")
    d = _gaps(gold_score_sample, num_pairs, np.random.default_rng(seed))
    lo, hi = np.log(np.min(d) * 1e-3), np.log(np.max(d) * 1e3)
    for _ in range(100):  # agreement falls monotonically as tau grows
        mid = 0.5 * (lo + hi)
        if np.mean(_sigmoid(d / np.exp(mid))) > a_eff:
            lo = mid
        else:
            hi = mid
    return float(np.exp(0.5 * (lo + hi)))


@dataclasses.dataclass(frozen=True)
class Annotator:
    """One simulated labeler. Biases are in utility (logit) units, added to gold / tau.

    length_bias: per word of the response (> 0 verbose, < 0 concise).
    keyword_bias: per occurrence of any of `keywords`.
    position_bias: for the response shown first; K-wise it falls linearly to 0 at the last.
    flip_prob: chance the whole judgement is reversed (a pairwise label flip).
    group_bias: on a prompt naming group A (`group_words[0]`) the utility is
        gold / tau + group_bias * gold, on one naming group B gold / tau - group_bias * gold:
        the labeler cares more about how good (positive) a response is for group A. In logits per
        unit of gold; needs the prompts (`rank(..., prompts=)`). A prompt naming both groups or
        neither is unaffected.
    """

    annotator_id: int
    tau: float
    name: str = "unbiased"
    flip_prob: float = 0.0
    length_bias: float = 0.0
    keyword_bias: float = 0.0
    keywords: tuple[str, ...] = ()
    position_bias: float = 0.0
    group_bias: float = 0.0
    group_words: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())

    def __post_init__(self):
        if not self.tau > 0:
            raise ValueError(f"annotator {self.annotator_id}: tau must be > 0, got {self.tau}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"annotator {self.annotator_id}: flip_prob must be in [0, 1]")

    def _bias(self, text: str) -> float:
        if not (self.length_bias or self.keyword_bias):
            return 0.0
        words = _WORD.findall(text.lower())
        b = self.length_bias * len(words)
        if self.keyword_bias:
            kw = set(self.keywords)
            b += self.keyword_bias * sum(w in kw for w in words)
        return b

    def _side(self, prompt: str) -> int:
        words = set(_WORD.findall(prompt.lower()))
        a, b = (bool(words & set(g)) for g in self.group_words)
        return int(a) - int(b)

    def utilities(self, gold: np.ndarray, responses: Sequence[Sequence[str]],
                  prompts: Sequence[str] | None = None) -> np.ndarray:
        """[N, K] Plackett-Luce utilities: gold / tau + content, position and group biases."""
        gold = np.asarray(gold, dtype=np.float64)
        if gold.ndim != 2 or len(responses) != gold.shape[0]:
            raise ValueError(f"gold must be [N, K] with N = len(responses); got {gold.shape} "
                             f"and {len(responses)} response lists")
        n, k = gold.shape
        u = gold / self.tau
        for i, row in enumerate(responses):
            if len(row) != k:
                raise ValueError(f"example {i}: {len(row)} responses but gold has K = {k}")
            for j, text in enumerate(row):
                u[i, j] += self._bias(text)
        if self.position_bias and k > 1:
            u += self.position_bias * (k - 1 - np.arange(k)) / (k - 1)
        if self.group_bias:
            if prompts is None or len(prompts) != n:
                raise ValueError(f"annotator {self.annotator_id}: group_bias needs the N prompts")
            side = np.asarray([self._side(p) for p in prompts], np.float64)
            u += self.group_bias * side[:, None] * gold
        return u

    def rank(self, gold, responses: Sequence[Sequence[str]], rng: np.random.Generator,
             prompts: Sequence[str] | None = None) -> np.ndarray:
        """[N, K] int32 ranks (0 = best), a Plackett-Luce sample per example."""
        u = self.utilities(gold, responses, prompts)
        order = np.argsort(-(u + rng.gumbel(size=u.shape)), axis=1, kind="stable")
        if self.flip_prob:
            flip = rng.random(u.shape[0]) < self.flip_prob
            order[flip] = order[flip, ::-1]
        ranks = np.empty_like(order)
        np.put_along_axis(ranks, order, np.arange(u.shape[1])[None, :], axis=1)
        return ranks.astype(np.int32)

    def prefer(self, gold_a, gold_b, responses_a: Sequence[str], responses_b: Sequence[str],
               rng: np.random.Generator) -> np.ndarray:
        """[N] int32 labels: 1 where a (shown first) is preferred over b, else 0."""
        gold = np.stack([np.asarray(gold_a, np.float64), np.asarray(gold_b, np.float64)], axis=1)
        ranks = self.rank(gold, list(zip(responses_a, responses_b)), rng)
        return (ranks[:, 0] == 0).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class AnnotatorPool:
    """Several annotators; each example is labeled by one drawn uniformly (its id is returned)."""

    annotators: tuple[Annotator, ...]

    def __post_init__(self):
        ids = [a.annotator_id for a in self.annotators]
        if not ids or len(set(ids)) != len(ids):
            raise ValueError(f"annotator pool needs distinct ids, got {ids}")

    def assign(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(0, len(self.annotators), n)

    def rank(self, gold, responses: Sequence[Sequence[str]], rng: np.random.Generator,
             prompts: Sequence[str] | None = None):
        """(ranks [N, K] int32, annotator_ids [N] int32); `prompts` only for group biases."""
        gold = np.asarray(gold, dtype=np.float64)
        who = self.assign(gold.shape[0], rng)
        ranks = np.zeros(gold.shape, np.int32)
        for idx, ann in enumerate(self.annotators):
            rows = np.nonzero(who == idx)[0]
            if rows.size:
                ranks[rows] = ann.rank(gold[rows], [responses[i] for i in rows], rng,
                                       None if prompts is None else [prompts[i] for i in rows])
        ids = np.asarray([a.annotator_id for a in self.annotators], np.int32)[who]
        return ranks, ids

    def prefer(self, gold_a, gold_b, responses_a, responses_b, rng: np.random.Generator):
        """(labels [N] int32, 1 = a preferred; annotator_ids [N] int32)."""
        gold = np.stack([np.asarray(gold_a, np.float64), np.asarray(gold_b, np.float64)], axis=1)
        ranks, ids = self.rank(gold, list(zip(responses_a, responses_b)), rng)
        return (ranks[:, 0] == 0).astype(np.int32), ids


def default_pool(tau: float, flip_prob: float = 0.0,
                 keywords: tuple[str, ...] = ("park", "garden", "beach", "music")) -> AnnotatorPool:
    """An AlpacaFarm-style pool: one unbiased labeler and five with one bias each.

    `tau` comes from `calibrate_tau`; AlpacaFarm's simulated pool also used 25% label flips
    (pass flip_prob=0.25 and calibrate with the same flip_prob).
    """
    A = Annotator
    return AnnotatorPool((
        A(0, tau, "unbiased", flip_prob),
        A(1, tau, "verbose", flip_prob, length_bias=0.15),
        A(2, tau, "concise", flip_prob, length_bias=-0.15),
        A(3, tau, "keyword", flip_prob, keyword_bias=1.0, keywords=tuple(keywords)),
        A(4, tau, "first_position", flip_prob, position_bias=0.5),
        A(5, 2.0 * tau, "noisy", flip_prob),
    ))


def with_biases(pool: AnnotatorPool, length_bias: float = 0.0, group_bias: float = 0.0,
                group_words: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())) -> AnnotatorPool:
    """The pool with every annotator's length bias raised by `length_bias` (logits per word:
    annotators lean toward longer responses, Singhal et al. 2023) and a `group_bias` toward group
    `group_words[0]` (see `Annotator`)."""
    if group_bias and not (group_words[0] and group_words[1]):
        raise ValueError("with_biases: group_bias needs both groups' words")
    return AnnotatorPool(tuple(
        dataclasses.replace(a, length_bias=a.length_bias + length_bias,
                            group_bias=a.group_bias + group_bias,
                            group_words=group_words if group_bias else a.group_words)
        for a in pool.annotators))


def force_first(ranks: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Ranks with response `first[i]` moved to rank 0 in row i (rows with first[i] < 0 unchanged).

    The others keep the order the annotator gave them; for Plackett-Luce rankings that order is
    exactly a ranking of the others alone (Luce's choice axiom), so a forced first place changes
    nothing else: what "always ranked best" means for a hand-improved completion, or a naive
    labeler's refusal.
    """
    ranks = np.array(ranks, dtype=np.int32, copy=True)
    first = np.asarray(first)
    if first.shape != (ranks.shape[0],):
        raise ValueError(f"force_first: first must be [N] = [{ranks.shape[0]}], got {first.shape}")
    for i in np.nonzero(first >= 0)[0]:
        f = int(first[i])
        rf = ranks[i, f]
        ranks[i] = ranks[i] + (ranks[i] < rf)
        ranks[i, f] = 0
    return ranks
