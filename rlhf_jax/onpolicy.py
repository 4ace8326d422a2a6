"""What every on-policy RL stage shares (PPO, RLOO / GRPO): its inputs, data and evaluation.

* `load_models`: the SFT policy (the initial trained params and the frozen reference), the
  reward model and the tokenizer, placed on the trainer's mesh, with the checks that they fit
  together and that the RM's normalisation was fit at the stage's sampling settings.
* `prompt_data`: train / eval prompt texts of `config.data.source` and the resumable batches
  (plus PPO-ptx pretraining rows when `config.ptx.coef > 0`).
* `policy_eval`: the held-out evaluation (RM, KL, gold judges, failure-mode probes).
* `RolloutJudge`: gold scores of each update's rollout texts, for the metrics only.
* `summarize`: the final policy vs the SFT policy on the same held-out prompts.

A stage keeps its own algorithm (rollout, advantages, update) in its own file.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from rlhf_jax import evaluation, handoff, sharding
from rlhf_jax.data import preferences, sources, tokenize
from rlhf_jax.data.iterators import ArrayIterator, PromptBatches
from rlhf_jax.errors import UserError


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

    def __call__(self, prompt_index, response_tokens, response_mask) -> dict[str, float]:
        if not self.judges:
            return {}
        idx, toks, mask = sharding.to_host((prompt_index, response_tokens, response_mask))
        responses = evaluation.decode_responses(self.tokenizer, toks, mask)
        gold = evaluation.gold_scores(self.judges, [self.texts[i] for i in idx], responses)
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
