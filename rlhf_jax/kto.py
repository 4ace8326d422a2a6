"""KTO (Ethayarajh et al. 2024): the policy learns from unpaired desirable / undesirable examples.

    python -m rlhf_jax.kto --config=configs/kto_sim.py --config.init_from=runs/sft_sim
    python -m rlhf_jax.kto --config=configs/kto_sim.py --config.init_from=runs/sft_sim \
        --config.data.source="{'kind': 'feedback_jsonl', 'train': ('a.jsonl',), 'eval': ('b.jsonl',)}"

With r = log π(y|x) − log π_ref(y|x) summed over the response tokens (π_ref the frozen SFT
policy) and the reference point z₀ (below), the loss of an example is
λ_D (1 − σ(β (r − z₀))) when it is desirable and λ_U (1 − σ(β (z₀ − r))) when it is not,
averaged over the batch (`pref_losses.kto_loss`). The paper advises λ_D n_D / (λ_U n_U) in
[1, 4/3]; the stage warns outside it.

The reference point: z₀ = max(0, the batch mean of log π(y'|x) − log π_ref(y'|x)) over
*mismatched* rows (x, y'), each example's prompt with another example's completion, as in the
paper (a Monte-Carlo estimate of KL(π || π_ref) on off-target completions; not
back-propagated). The pairing is drawn once per split (`data.feedback.mismatched`, a random cycle
seeded by `config.seed`); rows are shuffled each epoch, so each batch averages its own
mismatched rows. With gradient accumulation each microbatch has its own z₀.

Data (`rlhf_jax.data.feedback`): the comparisons every preference method reads, each ranking's
best response desirable and its worst undesirable (the RM's and DPO's comparisons in the
pipeline), or binary-feedback JSONL files (`{"prompt": str, "completion": str, "label": bool}`
a line) through a `feedback_jsonl` source. Reference log-probs are computed once before training
(`kto.reference="precompute"`) or every step (`on_the_fly`); both give the same numbers.
"""

from __future__ import annotations

import logging

import jax
import numpy as np

from rlhf_jax import config_utils, models, offline
from rlhf_jax.data import feedback, preferences
from rlhf_jax.errors import UserError
from rlhf_jax.offline import SEQ_FIELDS, pair_logprobs
from rlhf_jax.pref_losses import kto_loss

log = logging.getLogger(__name__)

REFERENCES = ("on_the_fly", "precompute")


def validate_config(config) -> None:
    if not config.init_from:
        raise UserError("config.init_from", "is empty", "give the SFT stage's work dir")
    config_utils.check_choice(config, "kto.reference", REFERENCES)
    for name in ("beta", "desirable_weight", "undesirable_weight"):
        config_utils.check_number(config, f"kto.{name}")
    config_utils.check_choice(config, "data.candidates", preferences.CANDIDATES)
    if config.train.epochs < 0:
        raise UserError("config.train.epochs", f"{config.train.epochs} must be >= 0", "")


def load_examples(st: offline.Stage) -> tuple[dict, dict]:
    """(examples per split, stats per split): the source's binary feedback when it has some,
    else the best and worst response of each of the stage's comparisons."""
    if hasattr(st.source, "feedback"):
        pairs = {s: st.source.feedback(s) for s in ("train", "eval")}
        return {s: p[0] for s, p in pairs.items()}, {s: p[1] for s, p in pairs.items()}
    records, stats = st.comparisons()
    examples = {}
    for split in ("train", "eval"):
        examples[split], est = feedback.from_comparisons(records[split])
        stats[split] = {**stats[split], **est}
    return examples, stats


def encode(st: offline.Stage, examples: list[dict], split: str) -> tuple[dict, dict]:
    """Rows with `tokens`, `mask`, `response_mask` [N, 2, L] (column 0 the example, column 1
    its prompt with a mismatched completion), `desirable` and `weight` [N]; encoding stats."""
    other = feedback.mismatched(examples, st.config.seed + (split == "eval"))
    recs = [{"prompt": e["prompt"], "responses": [e["completion"], y], "ranks": [0, 1]}
            for e, y in zip(examples, other)]
    enc, est = preferences.encode_records(st.tokenizer, recs, st.config.data.max_len,
                                          f"{split} examples")
    rows = {k: enc[k] for k in SEQ_FIELDS}
    rows["desirable"] = np.array([e["desirable"] for e in examples], np.float32)
    rows["weight"] = np.ones(len(examples), np.float32)
    return rows, est


def check_weights(k, n_desirable: int, n_undesirable: int) -> None:
    ratio = k.desirable_weight * n_desirable / max(k.undesirable_weight * n_undesirable, 1e-9)
    if not 1.0 <= ratio <= 4 / 3:
        log.warning("kto: desirable_weight * n_D / (undesirable_weight * n_U) = %.3f (n_D %d, "
                    "n_U %d) lies outside the paper's advised [1, 4/3]", ratio, n_desirable,
                    n_undesirable)


def run(config) -> dict:
    """(config, SFT checkpoint, comparisons or labelled examples) -> `workdir/final` policy +
    summary.json."""
    validate_config(config)
    st, k = offline.Stage(config, "kto"), config.kto
    cfg = st.cfg
    examples, stats = load_examples(st)
    arrays = {}
    for split in ("train", "eval"):
        arrays[split], est = encode(st, examples[split], split)
        stats[split] = {**stats[split], **est}
    n_d = int(arrays["train"]["desirable"].sum())
    check_weights(k, n_d, len(examples["train"]) - n_d)
    if k.reference == "precompute":
        arrays = st.precompute_reference(arrays)
    frozen = None if k.reference == "precompute" else st.policy.params

    def loss_fn(params, ref_params, batch, key):
        del key  # dropout is off
        col = [{f: batch[f][:, j:j + 1] for f in SEQ_FIELDS} for j in (0, 1)]
        logp = pair_logprobs(cfg, params, col[0])[0][:, 0]
        kl_logp = jax.lax.stop_gradient(pair_logprobs(cfg, params, col[1])[0][:, 0])
        ref = batch["ref_logp"] if ref_params is None else jax.lax.stop_gradient(
            pair_logprobs(cfg, ref_params, batch)[0])
        return kto_loss(logp, ref[:, 0], kl_logp, ref[:, 1], batch["desirable"],
                        beta=float(k.beta), desirable_weight=float(k.desirable_weight),
                        undesirable_weight=float(k.undesirable_weight), weight=batch["weight"])

    st.train(arrays["train"], st.policy.params, models.param_axes(cfg, ("lm",)), loss_fn,
             held_out=offline.HeldOut(arrays["eval"], config.eval.batch_size, "examples/"),
             data_stats=stats, frozen=frozen, policy_eval=True)
    return st.finish({**st.policy_summary(), "data": stats,
                      "train_examples": len(examples["train"]),
                      "held_out": st.held_out_metrics("examples/")})


if __name__ == "__main__":
    config_utils.run_stage(run, ("sft", "kto", "win_rate_vs_sft", "held_out"))
