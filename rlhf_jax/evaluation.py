"""Evaluations every stage and experiment shares, as configured objects.

* `PolicyEval`: sample a policy on held-out prompts -> decode -> reward model (proxy) -> gold
  judges -> KL from a reference -> metrics, per-row results and a `samples.md` table. SFT, PPO,
  DPO, the critic-free methods, best-of-n and the pipeline's method comparison all call it.
* `PreferenceEval`: a scorer's accuracy on held-out comparisons, with the noiseless gold's
  ceiling, calibration, and per-annotator and per-bucket breakdowns (RM and DPO).

Gold judges only ever see text here: they measure, they never feed a reward.

Failure-mode probes (issue 16): with `eval.probes > 0` and a simulated world, `PolicyEval` also
samples the world's held-out probe prompts (`rlhf_jax.sim.probes.run_policy_probes`) and
reports `probe/*` metrics, plus the RM's reward gain over the reference policy within and across
length buckets (`probe/length_gain_*`, Singhal et al. 2023). `text_scorer` scores any texts with
a reward model (the RM stage's counterfactual probes use it).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rlhf_jax import models, ops, rewards, sampling
from rlhf_jax.data import tokenize
from rlhf_jax.errors import UserError
from rlhf_jax.rng import Purpose

# ---------------------------------------------------------------------------------- sampling


def _global(place, chunk: dict):
    """Host chunk -> the arrays a jit takes: global and batch-sharded under a trainer."""
    return chunk if place is None else place.shard_rows(chunk)


def sample_texts(cfg: models.ModelConfig, params, tokenizer, prompts: Sequence[str], rng, *,
                 max_prompt_len: int, max_new_tokens: int, temperature: float = 1.0,
                 batch_size: int = 128, place=None) -> dict:
    """Sample one response per prompt in fixed-shape batches (one compile).

    Returns {"responses": list[str], "ended": bool[N], "lengths": int[N],
    "tokens", "mask": [N, max_new_tokens], "prompt_tokens", "prompt_mask": [N, P]}. The chunk
    starting at row s samples with `fold_in(rng, s)`. `place` (a Trainer) splits each chunk
    over the mesh's batch axes and gathers the results on every process.
    """
    pad_id, eos_id = tokenize.special_ids(tokenizer)
    prompts = list(prompts)
    if not prompts:
        raise ValueError("sample_texts: no prompts")
    enc, _ = tokenize.encode_prompts(tokenizer, prompts, max_prompt_len)

    def one(chunk, start):
        g = _global(place, chunk)
        out = sampling.generate(cfg, params, g["prompt_tokens"], g["prompt_mask"],
                                jax.random.fold_in(rng, start), max_new_tokens=max_new_tokens,
                                eos_id=eos_id, pad_id=pad_id, temperature=temperature,
                                mesh=None if place is None else place.mesh,
                                rules=None if place is None else place.rules)
        return {"tokens": out.tokens, "mask": out.mask, "ended": out.ended,
                "lengths": out.lengths}

    res = ops.batched(one, enc, batch_size, ops.row_multiple(place))
    res.update(enc)
    res["responses"] = decode_responses(tokenizer, res["tokens"], res["mask"])
    return res


def decode_responses(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
    """Text of each response: the masked-in tokens, without the final EOS."""
    _, eos_id = tokenize.special_ids(tokenizer)
    texts = []
    for row, m in zip(np.asarray(tokens), np.asarray(mask)):
        ids = [int(t) for t, keep in zip(row, m) if keep]
        if ids and ids[-1] == eos_id:
            ids = ids[:-1]
        texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts


def sample_table(prompts: Sequence[str], responses: Sequence[str], n: int = 8, **columns) -> str:
    """A small markdown table of samples for logs (prompt | response | any score columns)."""
    names = list(columns)
    lines = ["| prompt | response | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for i in range(min(n, len(prompts))):
        vals = " | ".join(f"{float(columns[k][i]):+.3f}" for k in names)
        lines.append(f"| {prompts[i]} | {responses[i]} | {vals} |")
    return "\n".join(lines)


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _kl_jit(cfg, params, ref_params, tokens, mask, prompt_len, temperature):
    positions = models.positions_from_mask(mask)
    lp = ops.response_logprobs(cfg, params, tokens, mask, positions, prompt_len,
                               temperature=temperature)["logp"]
    lr = ops.response_logprobs(cfg, ref_params, tokens, mask, positions, prompt_len,
                               temperature=temperature)["logp"]
    return ((lp - lr) * mask[:, prompt_len:]).sum(-1)


def sequence_kl(cfg: models.ModelConfig, params, ref_params, seq_tokens, seq_mask,
                prompt_len: int, temperature: float = 1.0, batch_size: int = 128,
                place=None) -> np.ndarray:
    """Per-sample k1 estimate of KL(π || π_ref) over the response: Σ_t log π − log π_ref.

    Unbiased when the samples come from π. Both log-probs use logits / temperature, the
    distribution the samples were drawn from (and the one PPO's KL penalty uses).
    """
    def one(chunk, start):
        g = _global(place, chunk)
        return _kl_jit(cfg, params, ref_params, g["tokens"], g["mask"], prompt_len,
                       float(temperature))

    return ops.batched(one, {"tokens": seq_tokens, "mask": seq_mask}, batch_size,
                       ops.row_multiple(place))


@functools.partial(jax.jit, static_argnums=0)
def _lm_loss_jit(cfg, params, batch):
    nll, aux = ops.lm_loss_sums(cfg, params, batch)
    return nll, aux["count"]


def lm_loss(cfg: models.ModelConfig, params, tokenizer, texts: Sequence[str], *, seq_len: int,
            batch_size: int = 64, place=None) -> dict[str, float]:
    """A policy's pretraining loss on `texts`: mean next-token NLL in nats per token, every
    token a target, texts packed into rows of `seq_len` (what pretraining and PPO-ptx optimise,
    `ops.lm_loss_sums`). Its rise after RL on held-out pretraining text is InstructGPT's
    "alignment tax" (Ouyang et al. 2022). Rows are padded to whole batches with rows that
    carry no target, so every batch compiles to one shape and no token counts twice.
    Returns {"loss", "tokens", "rows"}.
    """
    batch, _ = tokenize.encode_lm(tokenizer, list(texts), seq_len, pack=True)
    n = batch["tokens"].shape[0]
    bs = -(-min(batch_size, n) // ops.row_multiple(place)) * ops.row_multiple(place)
    pad = -n % bs
    if pad:
        batch = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) for k, v in batch.items()}
        batch["loss_mask"][n:] = 0
    nll = count = 0.0
    for start in range(0, n + pad, bs):
        chunk = _global(place, {k: v[start:start + bs] for k, v in batch.items()})
        a, b = jax.device_get(_lm_loss_jit(cfg, params, chunk))
        nll, count = nll + float(a), count + float(b)
    return {"loss": nll / max(count, 1.0), "tokens": int(count), "rows": int(n)}


def text_scorer(reward, tokenizer, max_len: int, batch_size: int = 128,
                place=None) -> Callable[[Sequence[str], Sequence[str]], np.ndarray]:
    """`score(prompts, responses) -> float64 [N]`: normalised rewards of a loaded reward model
    (`handoff.Loaded`) for texts, each encoded as prompt + response + EOS in `max_len` tokens
    (as its training comparisons were; over-long prompts lose tokens from the left)."""
    def score(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        if len(prompts) != len(responses):
            raise ValueError(f"text_scorer: {len(prompts)} prompts but {len(responses)} "
                             "responses")
        enc, _ = tokenize.encode_sft(tokenizer, list(prompts), list(responses), max_len)
        return np.asarray(rewards.score_batches(
            reward.cfg, reward.params, enc["tokens"], enc["mask"], reward.reward_norm,
            batch_size, place=place), np.float64)

    return score


def gold_scores(judges: dict, prompts: Sequence[str], responses: Sequence[str]):
    """{judge name: float64 [N]} of every judge."""
    return {name: np.asarray(j.score(list(prompts), list(responses)), np.float64)
            for name, j in judges.items()}


def get_judges(names: Sequence[str], field: str = "config.eval.judges") -> dict:
    from rlhf_jax.sim.judges import available_judges, get_judge

    for name in names:
        if name not in available_judges():
            raise UserError(field, f"unknown judge {name!r}", f"use some of {available_judges()}")
    return {name: get_judge(name) for name in names}


def win_rate(a: np.ndarray, b: np.ndarray) -> float:
    """P(a > b) on the same prompts, ties counting one half."""
    a, b = np.asarray(a), np.asarray(b)
    return float(np.mean((a > b) + 0.5 * (a == b)))


# ------------------------------------------------------------------------- policy evaluation


@dataclasses.dataclass
class PolicyEval:
    """Sample -> decode -> RM -> gold judges -> KL, on fixed held-out prompts.

    Configured once per stage (`from_config`), called with any policy of the same tokenizer:
    `metrics, rows = ev(cfg, params, key)`. `reward` / `reference` are `handoff.Loaded` models
    (placed on the mesh by the caller); without them the proxy score / KL are not reported.
    Metrics: `gold` (the primary judge) and `gold/<judge>` for each judge, `rm_score`, `kl`,
    `response_length`, `eos_rate`, plus anything `probes(prompts, responses)` returns. Rows:
    per-sample `prompt`, `response`, `ended`, `length`, `rm_score`, `kl`, `gold/<judge>`.

    With a `world` and `probe_prompts` > 0 (config `eval.probes`), each call also samples the
    policy once on the world's probe prompts (`probe_prompts` of each kind; key
    `fold_in(key, Purpose.PROBES)`) and adds `run_policy_probes`' `probe/*` metrics. With a
    reward model and a reference as well, it adds `probe/length_gain_total`, `_within` and
    `_covered`: the RM-score gain of these samples over the reference policy's samples on the
    same prompts, all of it and what survives within 2-word length buckets
    (`probes.length_stratified_gain`; Singhal et al. 2023). The reference's samples are drawn
    once, with the key of the first call (or taken from that call when it evaluates the
    reference's own params, as every stage's first evaluation does).
    """

    prompts: list[str]
    tokenizer: Any
    max_prompt_len: int
    max_new_tokens: int
    temperature: float
    batch_size: int
    judges: dict = dataclasses.field(default_factory=dict)
    gold: str | None = None
    reward: Any = None
    reference: Any = None
    sample_rows: int = 8
    place: Any = None
    probes: Callable[[list[str], list[str]], dict] | None = None
    world: Any = None  # a `rlhf_jax.sim.world.World`: the probe prompts' source
    probe_prompts: int = 0  # prompts per probe set (0 = no probes)
    _reference_rows: dict | None = dataclasses.field(default=None, init=False, repr=False)

    @classmethod
    def from_config(cls, ev, prompts: Sequence[str], tokenizer, *, reward=None, reference=None,
                    place=None, probes=None, world=None,
                    field: str = "config.eval") -> "PolicyEval":
        """From an `eval` config block (`config_utils.policy_eval_config`). `world`: the stage's
        simulated world (`DataSource.world()`, None for real data), needed by `eval.probes`."""
        judges = get_judges(tuple(ev.judges), f"{field}.judges")
        if ev.gold and ev.gold not in judges:
            raise UserError(f"{field}.gold", f"{ev.gold!r} is not one of {field}.judges="
                            f"{tuple(ev.judges)}", "add it there, or set '' for none")
        n = int(ev.num_prompts)
        if n < 1:
            raise UserError(f"{field}.num_prompts", f"{n} must be >= 1", "")
        prompts = list(prompts)
        if not prompts:
            raise UserError("config.data.source", "gives no evaluation prompts", "")
        prompts = (prompts * (n // len(prompts) + 1))[:n]  # few real prompts: reuse them
        n_probe = ev.get("probes", 0)
        if isinstance(n_probe, bool) or not isinstance(n_probe, int) or n_probe < 0:
            raise UserError(f"{field}.probes", f"{n_probe!r} must be an int >= 0 (0 = off)", "")
        if n_probe and world is None:
            raise UserError(f"{field}.probes", f"is {n_probe}, but the data source has no "
                            "simulated world to draw probe prompts from",
                            f"set {field}.probes=0, or use a data source of kind 'sim'")
        return cls(prompts=prompts, tokenizer=tokenizer, max_prompt_len=int(ev.max_prompt_len),
                   max_new_tokens=int(ev.max_new_tokens), temperature=float(ev.temperature),
                   batch_size=int(ev.batch_size), judges=judges, gold=ev.gold or None,
                   reward=reward, reference=reference, sample_rows=int(ev.sample_rows),
                   place=place, probes=probes, world=world if n_probe else None,
                   probe_prompts=int(n_probe))

    def sample(self, cfg, params, key) -> dict:
        return sample_texts(cfg, params, self.tokenizer, self.prompts, key,
                            max_prompt_len=self.max_prompt_len,
                            max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                            batch_size=self.batch_size, place=self.place)

    def score(self, cfg, params, samples: dict) -> tuple[dict, dict]:
        """Metrics and rows of samples already drawn from policy (cfg, params)."""
        seq_t = np.concatenate([samples["prompt_tokens"], samples["tokens"]], axis=1)
        seq_m = np.concatenate([samples["prompt_mask"], samples["mask"]], axis=1)
        rows: dict[str, Any] = {"prompt": self.prompts, "response": samples["responses"],
                                "ended": np.asarray(samples["ended"]),
                                "length": np.asarray(samples["lengths"])}
        if self.reward is not None:
            rows["rm_score"] = rewards.score_batches(
                self.reward.cfg, self.reward.params, seq_t, seq_m, self.reward.reward_norm,
                batch_size=self.batch_size, place=self.place)
        if self.reference is not None:
            rows["kl"] = sequence_kl(cfg, params, self.reference.params, seq_t, seq_m,
                                     samples["prompt_tokens"].shape[1], self.temperature,
                                     self.batch_size, place=self.place)
        for name, g in gold_scores(self.judges, self.prompts, samples["responses"]).items():
            rows[f"gold/{name}"] = g
        metrics = {k: float(np.mean(v)) for k, v in rows.items()
                   if k not in ("prompt", "response", "ended", "length")}
        metrics["eos_rate"] = float(np.mean(rows["ended"]))
        metrics["response_length"] = float(np.mean(rows["length"]))
        if self.gold:
            g = rows[f"gold/{self.gold}"]
            metrics["gold"] = float(g.mean())
            metrics["gold_sem"] = float(g.std() / np.sqrt(len(g)))
        if self.probes is not None:
            metrics.update(self.probes(self.prompts, samples["responses"]))
        return metrics, rows

    def __call__(self, cfg, params, key) -> tuple[dict, dict]:
        metrics, rows = self.score(cfg, params, self.sample(cfg, params, key))
        if self.world is not None and self.probe_prompts > 0:
            metrics.update(self.world_probes(cfg, params, key, rows))
        return metrics, rows

    def world_probes(self, cfg, params, key, rows: dict) -> dict[str, float]:
        """The `probe/*` metrics of policy (cfg, params) (class docstring); `rows` are its rows
        on the eval prompts from the same call."""
        from rlhf_jax.sim import probes as P

        probe_key = jax.random.fold_in(key, int(Purpose.PROBES))

        def sample_fn(prompts):
            return sample_texts(cfg, params, self.tokenizer, prompts, probe_key,
                                max_prompt_len=self.max_prompt_len,
                                max_new_tokens=self.max_new_tokens,
                                temperature=self.temperature, batch_size=self.batch_size,
                                place=self.place)["responses"]

        out = P.run_policy_probes(self.world, sample_fn, n=self.probe_prompts)
        if "rm_score" in rows and self.reference is not None:
            if self._reference_rows is None:
                self._reference_rows = rows if params is self.reference.params else \
                    self.score(cfg, self.reference.params,
                               self.sample(cfg, self.reference.params, key))[1]
            ref = self._reference_rows
            gain = P.length_stratified_gain(
                [P.mean_words([r]) for r in ref["response"]], ref["rm_score"],
                [P.mean_words([r]) for r in rows["response"]], rows["rm_score"])
            out.update({f"{P.PREFIX}length_gain_{k}": v for k, v in gain.items()})
        return out

    def table(self, rows: dict, title: str) -> str:
        cols = {c: rows[c] for c in ("rm_score", "kl") if c in rows}
        if self.gold:
            cols[f"gold ({self.gold})"] = rows[f"gold/{self.gold}"]
        return f"\n## {title}\n\n" + sample_table(rows["prompt"], rows["response"],
                                                   n=self.sample_rows, **cols) + "\n"

    def write_table(self, workdir: str | Path, step: int, rows: dict, metrics: dict) -> None:
        """Append this evaluation's sample table to `workdir/samples.md` (main process)."""
        if jax.process_index() != 0 or self.sample_rows <= 0:
            return
        head = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("gold", "rm_score", "kl")
                         if k in metrics)
        with open(Path(workdir) / "samples.md", "a") as f:
            f.write(self.table(rows, f"step {step} ({head})"))


# --------------------------------------------------------------------- preference evaluation


def ranked_pairs(ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, winner, loser) index arrays of every ordered pair in rankings [N, K] (-1 absent)."""
    ranks = np.asarray(ranks)
    present = ranks >= 0
    better = ranks[:, :, None] < ranks[:, None, :]
    row, win, lose = np.nonzero(better & present[:, :, None] & present[:, None, :])
    return row, win, lose


def _acc(diff: np.ndarray) -> float:
    diff = np.asarray(diff, np.float64)
    return float(np.mean((diff > 0) + 0.5 * (diff == 0))) if diff.size else float("nan")


def sigmoid_np(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def preference_metrics(ranks: np.ndarray, scores: np.ndarray, *, raw: np.ndarray | None = None,
                       gold: np.ndarray | None = None, annotators: list[str] | None = None,
                       buckets: list[str] | None = None, annotator_names: dict | None = None,
                       gap_edges: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0)) -> dict:
    """Accuracy of `scores` [N, K] against the labelled rankings, and its breakdowns.

    Every ordered pair of every ranking counts once; a score tie counts one half. With `gold`
    [N, K], `gold_ceiling_accuracy` is the noiseless gold's accuracy on the same labels: the best
    the annotators' noise allows. Calibration bins pairs by |score gap| (edges `gap_edges`, last
    bin open) and compares the accuracy with the Bradley-Terry probability the model gives its
    own pick, sigmoid(|raw gap|) (`raw`: unnormalised scores, e.g. the RM's raw head or DPO's
    implicit reward; default `scores`).
    """
    scores = np.asarray(scores, np.float64)
    raw = scores if raw is None else np.asarray(raw, np.float64)
    row, w, l = ranked_pairs(ranks)
    diff = scores[row, w] - scores[row, l]
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


def judge_agreement(score_diff: np.ndarray, gold_diff: np.ndarray) -> dict[str, float]:
    """How often a scorer orders a pair as a gold judge does (gold ties left out)."""
    score_diff, gold_diff = np.asarray(score_diff), np.asarray(gold_diff)
    keep = gold_diff != 0
    return {"agreement": _acc(score_diff[keep] * np.sign(gold_diff[keep])),
            "pairs": int(keep.sum())}


@dataclasses.dataclass
class PreferenceEval:
    """A scorer's held-out preference accuracy with its ceiling, calibration and breakdowns.

    `records` are the held-out comparisons (their `rank`, `gold`, `annotator`, `bucket`);
    calling it with the scorer's `scores` [N, K] (and `raw`, unnormalised) gives the metrics.
    """

    ranks: np.ndarray
    gold: np.ndarray | None = None
    annotators: list[str] | None = None
    buckets: list[str] | None = None
    annotator_names: dict | None = None
    gap_edges: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0)

    @classmethod
    def from_records(cls, records: Sequence[dict], ranks: np.ndarray, *, annotator_names=None,
                     gap_edges=(0.0, 0.25, 0.5, 1.0, 2.0)) -> "PreferenceEval":
        from rlhf_jax.data.preferences import gold_array

        return cls(ranks=np.asarray(ranks), gold=gold_array(records),
                   annotators=[r.get("annotator", "") for r in records],
                   buckets=[r.get("bucket", "") for r in records],
                   annotator_names=annotator_names, gap_edges=tuple(gap_edges))

    def __call__(self, scores: np.ndarray, raw: np.ndarray | None = None) -> dict:
        return preference_metrics(self.ranks, scores, raw=raw, gold=self.gold,
                                  annotators=self.annotators, buckets=self.buckets,
                                  annotator_names=self.annotator_names,
                                  gap_edges=self.gap_edges)


__all__ = ["PolicyEval", "PreferenceEval", "decode_responses", "get_judges", "gold_scores",
           "judge_agreement", "preference_metrics", "ranked_pairs", "sample_table",
           "sample_texts", "sequence_kl", "text_scorer", "win_rate"]
