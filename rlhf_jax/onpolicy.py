"""The on-policy stage driver (PPO, RLOO / GRPO / Dr. GRPO / REINFORCE, online DPO): inputs,
data, evaluation and the loop rollout -> score -> update -> evaluate -> summary.

* `load_models`: the SFT policy (the initial trained params and the frozen reference), the
  reward model and the tokenizer, placed on the trainer's mesh, with the checks that they fit
  together and that the RM's normalisation was fit at the stage's sampling settings.
* `prompt_data`: train / eval prompt texts of `config.data.source` and the resumable batches
  (plus PPO-ptx pretraining rows when `config.ptx.coef > 0`).
* `policy_eval`: the held-out evaluation (RM, KL, gold judges, failure-mode probes).
* `RolloutJudge`: gold scores of each update's rollout texts, for the metrics only.
* `summarize`: the final policy vs the SFT policy on the same held-out prompts.

* `validate_config`: the fields every on-policy stage reads.
* `run(config, name, build)`: the stage. `build(config, models, trainer)` returns the method's
  `Method` (its settings, trained tree and axes, jitted rollout, update, host hooks); the driver
  does the rest: optimizer, state, frozen reference / RM trees as jit arguments, prompts, the
  SFT baseline, the eval cadence, metadata, the loop and the summary.

A method keeps its own algorithm (rewards, advantages, loss) in its own file; the jitted pieces
every method shares (the rollout's front half, the epochs x minibatches scan) are in
`rlhf_jax.rollout`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from rlhf_jax import config_utils, evaluation, handoff, models, optim, sharding
from rlhf_jax import trainer as trainer_lib
from rlhf_jax.data import preferences, sources, tokenize
from rlhf_jax.data.iterators import ArrayIterator, PromptBatches
from rlhf_jax.errors import UserError
from rlhf_jax.rng import Purpose, StepUse, step_key


@dataclasses.dataclass
class Models:
    policy: handoff.Loaded  # the SFT policy: initial params and the frozen reference
    reward: handoff.Loaded  # the reward model, with its reward_norm
    tokenizer: Any
    tokenizer_dir: str
    pad_id: int
    eos_id: int


def load_models(config, tr) -> Models:
    """Policy (init_from) and RM (reward_from) on the trainer's mesh, and their tokenizer."""
    policy = handoff.load_policy(config.init_from, shardings=tr.model_shardings)
    reward = handoff.load_reward_model(config.reward_from, shardings=tr.model_shardings)
    if reward.cfg.vocab_size != policy.cfg.vocab_size:
        raise UserError("config.reward_from", f"the RM's vocab_size {reward.cfg.vocab_size} "
                        f"differs from the policy's {policy.cfg.vocab_size}",
                        "policy and RM must share one tokenizer")
    if not policy.tokenizer_dir:
        raise UserError("config.init_from", f"{config.init_from!r} records no tokenizer_dir",
                        "give an SFT stage's work dir or an hf:<dir> with tokenizer files")
    tokenizer, tok_dir = handoff.tokenizer_for("", policy.meta)
    handoff.check_vocab(tokenizer, policy.cfg, "config.init_from")
    handoff.check_norm_sampling(reward.reward_norm, config.rollout.temperature,
                                config.rollout.max_new_tokens, "config.rollout")
    pad_id, eos_id = tokenize.special_ids(tokenizer)
    return Models(policy, reward, tokenizer, tok_dir, pad_id, eos_id)


def prompt_data(config, tokenizer, batch_size: int, ptx_rows: int = 0):
    """(batches, train prompt texts, eval prompt texts). Each batch holds `prompt_tokens`,
    `prompt_mask` and `prompt_index` (the row of its text); with `ptx_rows` > 0 also
    `ptx_<field>` pretraining rows of `config.ptx.source` (PPO-ptx)."""
    source = sources.from_config(config.data.source)
    train_texts, eval_texts = source.prompts("train"), source.prompts("eval")
    arrays, _ = preferences.encode_prompts(tokenizer, train_texts, config.data.max_prompt_len,
                                           "train prompts")
    arrays["prompt_index"] = np.arange(len(train_texts), dtype=np.int32)
    prompts = ArrayIterator(arrays, batch_size, seed=config.seed)
    ptx = None
    if ptx_rows > 0:
        texts, _ = sources.from_config(config.ptx.source, "config.ptx.source").pretrain_texts(
            "train")
        lm, _ = tokenize.encode_lm(tokenizer, texts, config.ptx.seq_len, pack=True)
        ptx = ArrayIterator(lm, ptx_rows, seed=config.seed + 1)
    return PromptBatches(prompts, ptx), train_texts, eval_texts


def policy_eval(config, m: Models, eval_texts: list[str], place) -> evaluation.PolicyEval:
    """The stage's `PolicyEval` (config.eval) on its held-out prompts: RM score, KL from the SFT
    reference, gold judges, and the failure-mode probes when `eval.probes > 0`."""
    world = sources.from_config(config.data.source).world()
    return evaluation.PolicyEval.from_config(config.eval, eval_texts, m.tokenizer, reward=m.reward,
                                             reference=m.policy, place=place, world=world)


class RolloutJudge:
    """Gold scores of a rollout's texts (measurement only: gold never enters the reward)."""

    def __init__(self, ev, tokenizer, train_texts: list[str]):
        self.judges = evaluation.get_judges(tuple(ev.judges))
        self.primary = ev.gold or None
        self.tokenizer, self.texts = tokenizer, train_texts

    def scores(self, prompt_index, response_tokens, response_mask) -> dict[str, np.ndarray]:
        """{judge: gold score per row} of the rollout's texts ({} without judges)."""
        if not self.judges:
            return {}
        idx, toks, mask = sharding.to_host((prompt_index, response_tokens, response_mask))
        responses = evaluation.decode_responses(self.tokenizer, toks, mask)
        return evaluation.gold_scores(self.judges, [self.texts[i] for i in idx], responses)

    def __call__(self, prompt_index, response_tokens, response_mask,
                 scores: dict | None = None) -> dict[str, float]:
        """Batch means `gold/<judge>` (and `gold`, the primary judge's), of `scores` when the
        rows were judged already."""
        gold = self.scores(prompt_index, response_tokens, response_mask) if scores is None \
            else scores
        if not gold:
            return {}
        out = {f"gold/{n}": float(v.mean()) for n, v in gold.items()}
        if self.primary:
            out["gold"] = out[f"gold/{self.primary}"]
        return out


def summarize(policy_eval: evaluation.PolicyEval, sft: tuple[dict, dict],
              final: tuple[dict, dict] | None, name: str) -> dict:
    """{"sft": metrics, name: metrics, "win_rate_vs_sft"}: the final policy against the SFT
    policy on the same held-out prompts (pairwise by the primary gold judge, ties one half)."""
    out = {"sft": sft[0], name: final[0] if final else {}, "gold_judge": policy_eval.gold}
    if policy_eval.gold and final:
        key = f"gold/{policy_eval.gold}"
        out["win_rate_vs_sft"] = evaluation.win_rate(final[1][key], sft[1][key])
    return out


# ----------------------------------------------------------------------------------------------
# Shared validation.


def validate_config(config, block: str, samples_per_prompt: int = 1) -> None:
    """The fields every on-policy stage reads, checked before anything loads or compiles (the
    Trainer checks the shared training fields): the SFT / RM work dirs, sampling, epochs x
    minibatches of `config.<block>`, and the evaluation judges."""
    for field, what in (("init_from", "SFT"), ("reward_from", "reward model")):
        if not config[field]:
            raise UserError(f"config.{field}", "is empty",
                            f"give the work dir of the {what} stage (--config.{field}=<dir>)")
    check = functools.partial(config_utils.check_number, config)
    check("rollout.max_new_tokens", int)
    check("rollout.temperature")  # > 0: log-probs are those of the sampling distribution
    check(f"{block}.epochs", int)
    check(f"{block}.minibatches", int)
    prompts, n_mb = config.train.batch_size, config[block].minibatches
    episodes = prompts * samples_per_prompt
    if episodes % n_mb:
        per = f"{prompts} prompts x {samples_per_prompt} samples = " \
            if samples_per_prompt > 1 else ""
        raise UserError(f"config.{block}.minibatches", f"{per}{episodes} episodes per update do "
                        f"not split into config.{block}.minibatches={n_mb}",
                        "use a count that divides the episodes per update")
    if config.train.accum_steps != 1:
        raise UserError("config.train.accum_steps", f"{config.train.accum_steps} is not 1",
                        f"split updates with config.{block}.minibatches")
    check("eval.num_prompts", int)
    evaluation.get_judges(tuple(config.eval.judges))
    if config.eval.gold and config.eval.gold not in config.eval.judges:
        raise UserError("config.eval.gold", f"{config.eval.gold!r} is not one of "
                        f"config.eval.judges={tuple(config.eval.judges)}", "or set '' for none")


# ----------------------------------------------------------------------------------------------
# The stage driver.


@dataclasses.dataclass
class Method:
    """What an on-policy method gives the driver; everything else is the driver's.

    rollout(params, frozen, prompts, key, extra) -> (data, rows, metrics): one jitted program
        (`frozen` = {"ref": SFT params, "rm": RM params}, placed once; `prompts` the batch with
        `prompt_tokens` / `prompt_mask`). `rows` needs `response_tokens` and `response_mask`.
    update(optimizer, params, opt_state, data, ptx, extra, shuffle_key, update_index, *,
        batch_sharding) -> (params, opt_state, metrics): jitted by the driver, params and
        optimizer state donated.
    """

    settings: Any  # a `rollout.Settings`: static, with `policy`, `epochs`, `minibatches`
    params: Any  # the trained tree (initial values) and its logical axes
    axes: Any
    rollout: Callable
    update: Callable
    extra: dict = dataclasses.field(default_factory=dict)  # TrainState.extra (checkpointed)
    samples_per_prompt: int = 1  # rollout rows per prompt (groups in adjacent rows)
    ptx_rows: int = 0  # pretraining rows per update (PPO-ptx)
    # Host work after each update: (extra, rollout metrics) -> (next extra, metrics to log).
    after_update: Callable = lambda extra, metrics: (extra, {})
    # Host work between rollout and update: (data, {judge: per-row gold scores}, place) -> data
    # (e.g. a gold judge that labels the rollout); None: the gold scores are metrics only.
    rescore: Callable | None = None
    policy_of: Callable = lambda params: params  # the policy in the trained tree
    summary: Callable = lambda state: {}  # stage-specific summary entries of the final state
    finite_metrics: tuple[str, ...] = ("loss", "kl", "rm_score", "grad_norm")


def policy_method(s, m: Models, tr, rollout_jit: Callable, update: Callable, **fields) -> Method:
    """The `Method` of a method that trains the policy alone (no value model, no state of its
    own), given its jitted `rollout_jit(s, params, ref, rm, prompt_tokens, prompt_mask, key, *,
    batch_sharding)` and `update(s, optimizer, params, opt_state, data, shuffle_key,
    update_index, *, batch_sharding)`; `fields`: the rest of the `Method`."""
    return Method(
        settings=s, params=m.policy.params, axes=models.param_axes(s.policy, ("lm",)),
        rollout=lambda params, frozen, b, key, extra: rollout_jit(
            s, params, frozen["ref"], frozen["rm"], b["prompt_tokens"], b["prompt_mask"], key,
            batch_sharding=tr.batch_sharding),
        update=lambda opt, params, opt_state, data, ptx, extra, *a, **kw: update(
            s, opt, params, opt_state, data, *a, **kw), **fields)


class Evaluator:
    """The stage's held-out evaluation at the rollout's settings (`config.eval`): the SFT
    baseline, and `eval_fn` for the trainer's cadence, which keeps the latest (metrics, rows)."""

    def __init__(self, policy_eval: evaluation.PolicyEval, method: Method, tr):
        self.policy_eval, self.method, self.tr = policy_eval, method, tr
        self.latest: tuple[dict, dict] | None = None

    def __call__(self, policy_params, step: int) -> tuple[dict, dict]:
        # Fixed prompts and sampling key, at the rollout temperature (what the method optimises).
        metrics, rows = self.policy_eval(self.method.settings.policy, policy_params,
                                         self.tr.key(Purpose.POLICY_EVAL))
        self.policy_eval.write_table(self.tr.workdir, step, rows, metrics)
        return metrics, rows

    def eval_fn(self, state) -> dict:
        self.latest = self(self.method.policy_of(state.params), int(jax.device_get(state.step)))
        return self.latest[0]


def run(config, name: str, build: Callable) -> dict:
    """rollout -> score -> update -> evaluate -> summary for the method `build(config, models,
    trainer) -> Method`, from the SFT policy in `config.init_from` against the RM in
    `config.reward_from`. Returns the run summary (`name` keys the final policy's metrics)."""
    tr = trainer_lib.Trainer(config, name)
    m = load_models(config, tr)
    method = build(config, m, tr)
    s, K = method.settings, method.samples_per_prompt
    # The schedule counts optimizer steps (epochs x minibatches per update); warmup is given in
    # updates like every other `train` count.
    per_update = s.epochs * s.minibatches
    optim_cfg = ml_collections.ConfigDict(config.optim.to_dict())
    optim_cfg.warmup_steps = int(config.optim.warmup_steps) * per_update
    optimizer = optim.make_optimizer(optim_cfg, int(config.train.steps) * per_update)
    state, _ = tr.create_state(method.params, method.axes, optimizer, extra=method.extra)
    # Frozen trees: the SFT reference and the RM, placed once, jit arguments of every rollout.
    frozen = {"ref": m.policy.params, "rm": m.reward.params}
    batches, train_texts, eval_texts = prompt_data(config, m.tokenizer,
                                                   int(config.train.batch_size), method.ptx_rows)
    judge = RolloutJudge(config.eval, m.tokenizer, train_texts)
    evaluator = Evaluator(policy_eval(config, m, eval_texts, tr), method, tr)
    # Params and optimizer state donated; under LoRA only the adapter trains (the base is shared
    # with the reference and not donated).
    update_jit = tr.jit_update(functools.partial(method.update, optimizer,
                                                 batch_sharding=tr.batch_sharding))
    shuffle_key = tr.key(Purpose.SHUFFLE)

    def step_fn(state, frozen, batch, key):
        t0 = time.perf_counter()
        data, rows, metrics = method.rollout(state.params, frozen, batch,
                                             step_key(key, StepUse.SAMPLE), state.extra)
        prompt_index = np.repeat(sharding.to_host(batch["prompt_index"]), K)
        judged = None
        if method.rescore is not None:  # the judge labels the rollout before the update
            judged = judge.scores(prompt_index, rows["response_tokens"], rows["response_mask"])
            data = method.rescore(data, judged, tr)
        ptx = {k[4:]: v for k, v in batch.items() if k.startswith("ptx_")} or None
        params, opt_state, upd = update_jit(state.params, state.opt_state, data, ptx,
                                            state.extra, shuffle_key, state.step)
        # While the update runs: decode and judge the rollout on the host (metrics only).
        gold = judge(prompt_index, rows["response_tokens"], rows["response_mask"], judged)
        extra, host = method.after_update(state.extra, metrics)
        out = {**metrics, **upd, **gold, **host}
        jax.block_until_ready(upd)
        out["time/update_s"] = time.perf_counter() - t0
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             extra=extra), out

    # The SFT policy's numbers on the eval prompts (step 0 of the curves; the win-rate baseline).
    sft = evaluator(m.policy.params, 0)
    if int(jax.device_get(state.step)) == 0:
        tr.writer.write(0, {f"eval/{k}": v for k, v in sft[0].items()})
    tr.metadata.update(model_config=s.policy.to_dict(), tokenizer_dir=m.tokenizer_dir,
                       init_from=str(config.init_from), reward_from=str(config.reward_from))
    state = tr.fit(state, step_fn, batches, eval_fn=evaluator.eval_fn, jit=False, frozen=frozen,
                   final_params=lambda st: method.policy_of(st.params),
                   finite_metrics=method.finite_metrics)
    summary = summarize(evaluator.policy_eval, sft, evaluator.latest, name)
    summary.update(method.summary(state))
    tr.write_summary(summary)
    tr.close()
    return dict(tr.summary)
