"""The offline stage driver: comparisons -> encoded rows -> train -> evaluate -> summary.

The reward model, DPO and KTO learn from a fixed data set of comparisons (or labelled
examples) and share one path, which lives here:

    st = offline.Stage(config, "dpo")      # data source, ONE mesh, the SFT policy, tokenizer
    records, stats = st.comparisons()       # the source's comparisons or labelled policy samples
    ... the method encodes its rows (pairs, rankings, labelled examples) ...
    state = st.train(train_rows, init, axes, loss_fn, held_out=offline.HeldOut(eval_rows, ...))
    st.finish({**st.policy_summary(), ...})

`Stage.train` sets `train.steps` from the data (`train.epochs`), opens the Trainer on the
stage's one Placement (the data needed the mesh first: policy candidates are sampled on it),
builds the optimizer and state, and fits with one evaluation: the loss's metric sums on the
held-out rows (padded to whole batches) and, when asked, the policy evaluation (samples, gold,
KL from the SFT policy) with the SFT policy's own numbers as the baseline. A method supplies
only its settings, the tree it trains and its axes, its loss, and its rows. `fit` (the loop
with that one evaluation) is also what SFT trains with.

`pair_logprobs` and `precompute_reference` are the sequence log-probs every method that
scores K responses per row (`tokens` [N, K, L]) against a frozen reference takes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from rlhf_jax import candidates, config_utils, evaluation, handoff, models, onpolicy, ops, optim
from rlhf_jax import trainer as trainer_lib
from rlhf_jax.data import preferences, sources
from rlhf_jax.data.iterators import ArrayIterator
from rlhf_jax.rng import Purpose

SEQ_FIELDS = ("tokens", "mask", "response_mask")


def pair_logprobs(cfg: models.ModelConfig, params, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(summed response log-probs [N, K], response token counts [N, K]) of a batch of K
    sequences per row (`tokens`, `mask`, `response_mask` [N, K, L]). Any padding gives the same
    numbers."""
    N, K, L = batch["tokens"].shape
    flat = {k: batch[k].reshape(N * K, L) for k in SEQ_FIELDS}
    logp = ops.sequence_logprobs(cfg, params, flat["tokens"], flat["mask"],
                                 flat["response_mask"]).sum(-1)
    count = flat["response_mask"][:, 1:].sum(-1).astype(jnp.float32)
    return logp.reshape(N, K), count.reshape(N, K)


def precompute_reference(cfg, ref_params, arrays: dict, batch_size: int, place) -> dict:
    """`arrays` plus `ref_logp` [N, K]: the reference's log-probs of every row, computed once
    (a method's `reference="precompute"`; the same numbers as computing them every step)."""
    fn = jax.jit(lambda p, b: pair_logprobs(cfg, p, b)[0])

    def one(chunk, start):
        return fn(ref_params, place.shard_rows({k: chunk[k] for k in SEQ_FIELDS}))

    return {**arrays, "ref_logp": ops.batched(one, arrays, batch_size, place.batch_shards)}


@dataclasses.dataclass
class HeldOut:
    """The held-out rows a stage evaluates its loss on: padded with weight-0 rows to whole
    batches of about `batch_size`; at most `max_batches` of them (0 = all); metrics passed
    through `derive` and named `<prefix><metric>`."""

    arrays: dict
    batch_size: int
    prefix: str = ""
    max_batches: int = 0
    derive: Callable[[dict], dict] | None = None  # metrics -> metrics (e.g. + perplexity)


def fit(tr: trainer_lib.Trainer, cfg: models.ModelConfig, init, axes, loss_fn,
        train_rows: dict, held_out: HeldOut, *, policy_eval=None, frozen=None,
        write_final: bool = True):
    """The training loop of a stage that learns from fixed rows (the offline stages and SFT):
    optimizer, state from `init` (params or a function making them, logical `axes`), the step
    of `loss_fn(params, frozen, batch, key) -> (loss, metric sums)`, and one evaluation: the
    loss's metrics on the held-out rows plus, with a `PolicyEval`, the policy's samples
    (written to `samples.md`). -> (final state, (policy metrics, per-row results) of the last
    evaluation or None)."""
    config = tr.config
    optimizer = optim.make_optimizer(config.optim, config.train.steps)
    state, _ = tr.create_state(init, axes, optimizer)
    step = trainer_lib.make_train_step(loss_fn, optimizer, config.train.accum_steps)
    eval_step = tr.jit_eval(trainer_lib.make_eval_step(loss_fn), frozen)
    rows, bs = preferences.pad_to_batches(held_out.arrays, held_out.batch_size, tr.batch_shards)
    last: list = [None]

    def eval_fn(st):
        it = ArrayIterator(rows, bs, seed=0, shuffle=False)
        n = min(held_out.max_batches or it.batches_per_epoch, it.batches_per_epoch)
        m = tr.evaluate(eval_step, st.params, it, n, frozen)
        m = {held_out.prefix + k: v for k, v in (held_out.derive or dict)(m).items()}
        if policy_eval is not None:
            pm, per_row = policy_eval(cfg, st.params, tr.key(Purpose.POLICY_EVAL))
            policy_eval.write_table(tr.workdir, int(st.step), per_row, pm)
            last[0] = (pm, per_row)
            m.update(pm)
        return m

    train_iter = ArrayIterator(train_rows, config.train.batch_size, seed=config.seed)
    state = tr.fit(state, step, train_iter, eval_fn=eval_fn, frozen=frozen,
                   write_final=write_final)
    return state, last[0]


class Stage:
    """One offline stage: its data source, its one Placement, the SFT policy and tokenizer
    (`init_from`), then `train` and `finish`. `self.tr` is the Trainer once `train` opened it."""

    def __init__(self, config, name: str):
        self.config, self.name = config, name
        self.source = sources.from_config(config.data.source)
        self.place = trainer_lib.Placement(config)
        self.policy, self.tokenizer, self.tok_dir = handoff.load_policy_and_tokenizer(
            config, self.place, self.source.spec)
        self.cfg = self.policy.cfg
        self.tr: trainer_lib.Trainer | None = None
        self.policy_eval: evaluation.PolicyEval | None = None
        self.sft_result: tuple[dict, dict] | None = None
        self.last: tuple[dict, dict] | None = None  # the policy evaluation of the last eval

    def comparisons(self) -> tuple[dict, dict]:
        """Comparison records and stats per split (`data.candidates`: the source's own, or
        policy samples labelled by its annotators, drawn on this stage's mesh)."""
        return preferences.load_comparisons(
            self.source, self.config.data.candidates,
            candidates.policy_candidates(self.config, self.policy, self.tokenizer, self.place))

    def precompute_reference(self, arrays: dict) -> dict:
        """`precompute_reference` of every split with the SFT policy as the reference."""
        return {s: precompute_reference(self.cfg, self.policy.params, a,
                                        self.config.eval.batch_size, self.place)
                for s, a in arrays.items()}

    def train(self, train_rows: dict, init, axes, loss_fn, *, held_out: HeldOut,
              data_stats: dict, frozen=None, policy_eval: bool = False,
              write_final: bool = True):
        """Fit `loss_fn(params, frozen, batch, key) -> (loss, metric sums)` over `train_rows`
        from `init` (a params tree with logical `axes`); returns the final state. With
        `policy_eval`, every evaluation also samples the policy (`config.eval`), against the SFT
        policy's own evaluation as the baseline."""
        n_train = len(next(iter(train_rows.values())))
        config = config_utils.with_epoch_steps(self.config, n_train)
        self.tr = tr = trainer_lib.Trainer(config, self.name, place=self.place)
        tr.metadata.update(model_config=self.cfg.to_dict(), tokenizer_dir=self.tok_dir,
                           init_from=str(config.init_from), data_stats=data_stats)
        if policy_eval:
            self.policy_eval = evaluation.PolicyEval.from_config(
                config.eval, self.source.prompts("eval"), self.tokenizer, reference=self.policy,
                place=tr, world=self.source.world())
            self.sft_result = self.policy_eval(self.cfg, self.policy.params,
                                               tr.key(Purpose.POLICY_EVAL))
        state, self.last = fit(tr, self.cfg, init, axes, loss_fn, train_rows, held_out,
                               policy_eval=self.policy_eval, frozen=frozen,
                               write_final=write_final)
        return state

    def held_out_metrics(self, prefix: str) -> dict:
        """The final evaluation's held-out loss metrics, without their prefix."""
        ev = self.tr.summary.get("eval", {})
        return {k[len(prefix):]: v for k, v in ev.items() if k.startswith(prefix)}

    def policy_summary(self) -> dict:
        """{"sft", <stage>, "gold_judge", "win_rate_vs_sft"}: the trained policy against the SFT
        policy on the same held-out prompts (`onpolicy.summarize`)."""
        return onpolicy.summarize(self.policy_eval, self.sft_result, self.last, self.name)

    def finish(self, summary: dict[str, Any]) -> dict:
        """Write `summary` into summary.json, close the Trainer; the whole summary."""
        self.tr.write_summary(summary)
        out = dict(self.tr.summary)
        self.tr.close()
        return out
