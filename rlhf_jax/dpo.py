"""Direct preference optimisation: the policy learns from comparisons with no reward model.

    python -m rlhf_jax.dpo --config=configs/dpo_sim.py --config.init_from=runs/sft_sim

With h = [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)] (sequence log-probs summed
over response tokens; π_ref the frozen SFT policy), the losses (config `dpo.loss`) are:

* `sigmoid` (Rafailov et al. 2023): −log σ(β h); with `dpo.label_smoothing` ε > 0 the
  conservative DPO of Mitchell (2023): −(1 − ε) log σ(β h) − ε log σ(−β h), for labels that
  are flipped with probability ε;
* `ipo` (Azar et al. 2023): (h − 1/(2β))², with h from length-averaged log-probs (IPO's
  regression target is per token, so long responses do not dominate).

The implicit reward of a response is β (log π(y) − log π_ref(y)); at step 0 (π = π_ref) it is
exactly 0 and the sigmoid loss is log 2 (DESIGN.md pitfall 16). Reference log-probs are computed
on the fly (the reference is a frozen jit argument) or once over the data set before training
(`dpo.reference="precompute"`); both give the same numbers.

Data are the comparisons every preference method reads (`data/preferences`): the simulated
world's candidates, SFT-policy samples ranked by the simulated annotators (`data.candidates=
policy`), or preference files in the published formats. K-wise rankings become pairs
(`data.pairs`: all C(K, 2) pairs, or best vs each of the rest).
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import config_utils, evaluation, handoff, models, ops, optim
from rlhf_jax import trainer as trainer_lib
from rlhf_jax.data import preferences, sources
from rlhf_jax.data.iterators import ArrayIterator
from rlhf_jax.errors import UserError
from rlhf_jax.pref_losses import LOSSES, dpo_loss
from rlhf_jax.rng import Purpose

log = logging.getLogger(__name__)

REFERENCES = ("on_the_fly", "precompute")

# ----------------------------------------------------------------------------------------------
# Sequence log-probs of pairs (the loss is `pref_losses.dpo_loss`).


def pair_logprobs(cfg: models.ModelConfig, params, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(summed response log-probs [N, 2], response token counts [N, 2]) of a pair batch
    (`tokens`, `mask`, `response_mask` [N, 2, L]). Any padding gives the same numbers."""
    N, K, L = batch["tokens"].shape
    flat = {k: batch[k].reshape(N * K, L) for k in ("tokens", "mask", "response_mask")}
    logp = ops.sequence_logprobs(cfg, params, flat["tokens"], flat["mask"],
                                 flat["response_mask"]).sum(-1)
    count = flat["response_mask"][:, 1:].sum(-1).astype(jnp.float32)
    return logp.reshape(N, K), count.reshape(N, K)


# ----------------------------------------------------------------------------------------------
# The stage.


def validate_config(config) -> None:
    if not config.init_from:
        raise UserError("config.init_from", "is empty", "give the SFT stage's work dir")
    d = config.dpo
    config_utils.check_choice(config, "dpo.loss", LOSSES)
    config_utils.check_choice(config, "dpo.reference", REFERENCES)
    config_utils.check_number(config, "dpo.beta")
    config_utils.check_number(config, "dpo.label_smoothing", strict=False, upper=0.5)
    if d.loss == "ipo" and d.label_smoothing:
        raise UserError("config.dpo.label_smoothing", "applies to the sigmoid loss", "set 0")
    config_utils.check_choice(config, "data.candidates", preferences.CANDIDATES)
    config_utils.check_choice(config, "data.pairs", preferences.PAIR_MODES)
    if config.train.epochs < 0:
        raise UserError("config.train.epochs", f"{config.train.epochs} must be >= 0", "")


def load_pairs(config, source, policy, tokenizer, place) -> tuple[dict, dict, dict]:
    """(arrays per split with `tokens`, `mask`, `response_mask` [N, 2, L] and `weight`, records
    per split, stats): the comparisons as (chosen, rejected) pairs."""
    records, stats = preferences.load_comparisons(
        source, config.data.candidates,
        evaluation.policy_candidates(config, policy, tokenizer, place))
    arrays, pairs = {}, {}
    for split in ("train", "eval"):
        pairs[split], pst = preferences.to_pairs(records[split], config.data.pairs)
        enc, est = preferences.encode_records(tokenizer, pairs[split], config.data.max_len,
                                              f"{split} pairs")
        arrays[split] = {k: enc[k] for k in ("tokens", "mask", "response_mask")}
        arrays[split]["weight"] = np.ones(len(pairs[split]), np.float32)
        stats[split] = {**stats[split], **pst, **est}
    return arrays, pairs, stats


def precompute_reference(cfg, ref_params, arrays: dict, batch_size: int, place) -> dict:
    """Reference log-probs of every pair, computed once (`dpo.reference="precompute"`)."""
    fn = jax.jit(lambda p, b: pair_logprobs(cfg, p, b)[0])

    def one(chunk, start):
        g = place.shard_rows({k: chunk[k] for k in ("tokens", "mask", "response_mask")})
        return fn(ref_params, g)

    return {**arrays, "ref_logp": ops.batched(one, arrays, batch_size, place.batch_shards)}


def run(config) -> dict:
    """(config, SFT checkpoint, comparisons) -> `workdir/final` policy + summary.json."""
    validate_config(config)
    source = sources.from_config(config.data.source)
    place = trainer_lib.Placement(config)
    policy, tokenizer, tok_dir = handoff.load_policy_and_tokenizer(config, place, source.spec)
    cfg, d = policy.cfg, config.dpo
    arrays, pairs, data_stats = load_pairs(config, source, policy, tokenizer, place)
    if d.reference == "precompute":
        arrays = {s: precompute_reference(cfg, policy.params, a, config.eval.batch_size, place)
                  for s, a in arrays.items()}
    config = config_utils.with_epoch_steps(config, len(pairs["train"]))

    tr = trainer_lib.Trainer(config, "dpo")
    optimizer = optim.make_optimizer(config.optim, config.train.steps)
    state, _ = tr.create_state(policy.params, models.param_axes(cfg, ("lm",)), optimizer)
    frozen = None if d.reference == "precompute" else policy.params
    tr.metadata.update(model_config=cfg.to_dict(), tokenizer_dir=tok_dir,
                       init_from=str(config.init_from), data_stats=data_stats)

    def loss_fn(params, ref_params, batch, key):
        del key  # dropout is off
        logp, count = pair_logprobs(cfg, params, batch)
        ref = batch["ref_logp"] if ref_params is None else jax.lax.stop_gradient(
            pair_logprobs(cfg, ref_params, batch)[0])
        return dpo_loss(logp, ref, count, kind=d.loss, beta=float(d.beta),
                        label_smoothing=float(d.label_smoothing), weight=batch["weight"])

    step = trainer_lib.make_train_step(loss_fn, optimizer, config.train.accum_steps)
    eval_step = tr.jit_eval(trainer_lib.make_eval_step(loss_fn), frozen)
    train_iter = ArrayIterator(arrays["train"], config.train.batch_size, seed=config.seed)
    held_out, eval_bs = preferences.pad_to_batches(arrays["eval"], config.eval.batch_size,
                                                   tr.batch_shards)
    policy_eval = evaluation.PolicyEval.from_config(config.eval, source.prompts("eval"),
                                                    tokenizer, reference=policy, place=tr,
                                                    world=source.world())

    def eval_fn(st):
        it = ArrayIterator(held_out, eval_bs, seed=0, shuffle=False)
        m = {f"pairs/{k}": v for k, v in tr.evaluate(eval_step, st.params, it,
                                                      it.batches_per_epoch, frozen).items()}
        pm, rows = policy_eval(cfg, st.params, tr.key(Purpose.POLICY_EVAL))
        policy_eval.write_table(tr.workdir, int(st.step), rows, pm)
        last[:] = [(pm, rows)]
        return {**m, **pm}

    sft = policy_eval(cfg, policy.params, tr.key(Purpose.POLICY_EVAL))
    last: list = []
    tr.fit(state, step, train_iter, eval_fn=eval_fn, frozen=frozen)
    summary: dict[str, Any] = {"sft": sft[0], "dpo": last[0][0] if last else {},
                               "data": data_stats, "train_pairs": len(pairs["train"])}
    if policy_eval.gold and last:
        key = f"gold/{policy_eval.gold}"
        summary["win_rate_vs_sft"] = evaluation.win_rate(last[0][1][key], sft[1][key])
    summary["held_out"] = {k[6:]: v for k, v in tr.summary.get("eval", {}).items()
                           if k.startswith("pairs/")}
    tr.write_summary(summary)
    tr.close()
    return dict(tr.summary)


if __name__ == "__main__":
    config_utils.run_stage(run, ("sft", "dpo", "win_rate_vs_sft", "held_out"))
