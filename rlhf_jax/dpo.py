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

import jax
import numpy as np

from rlhf_jax import config_utils, models, offline
from rlhf_jax.data import preferences
from rlhf_jax.errors import UserError
from rlhf_jax.offline import pair_logprobs
from rlhf_jax.pref_losses import LOSSES, dpo_loss

log = logging.getLogger(__name__)

REFERENCES = ("on_the_fly", "precompute")
__all__ = ["LOSSES", "REFERENCES", "dpo_loss", "pair_logprobs", "run", "validate_config"]


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


def load_pairs(st: offline.Stage) -> tuple[dict, dict, dict]:
    """(arrays per split with `tokens`, `mask`, `response_mask` [N, 2, L] and `weight`, records
    per split, stats): the stage's comparisons as (chosen, rejected) pairs."""
    records, stats = st.comparisons()
    arrays, pairs = {}, {}
    for split in ("train", "eval"):
        pairs[split], pst = preferences.to_pairs(records[split], st.config.data.pairs)
        enc, est = preferences.encode_records(st.tokenizer, pairs[split], st.config.data.max_len,
                                              f"{split} pairs")
        arrays[split] = {k: enc[k] for k in offline.SEQ_FIELDS}
        arrays[split]["weight"] = np.ones(len(pairs[split]), np.float32)
        stats[split] = {**stats[split], **pst, **est}
    return arrays, pairs, stats


def run(config) -> dict:
    """(config, SFT checkpoint, comparisons) -> `workdir/final` policy + summary.json."""
    validate_config(config)
    st, d = offline.Stage(config, "dpo"), config.dpo
    cfg = st.cfg
    arrays, pairs, data_stats = load_pairs(st)
    if d.reference == "precompute":
        arrays = st.precompute_reference(arrays)
    frozen = None if d.reference == "precompute" else st.policy.params

    def loss_fn(params, ref_params, batch, key):
        del key  # dropout is off
        logp, count = pair_logprobs(cfg, params, batch)
        ref = batch["ref_logp"] if ref_params is None else jax.lax.stop_gradient(
            pair_logprobs(cfg, ref_params, batch)[0])
        return dpo_loss(logp, ref, count, kind=d.loss, beta=float(d.beta),
                        label_smoothing=float(d.label_smoothing), weight=batch["weight"])

    st.train(arrays["train"], st.policy.params, models.param_axes(cfg, ("lm",)), loss_fn,
             held_out=offline.HeldOut(arrays["eval"], config.eval.batch_size, "pairs/"),
             data_stats=data_stats, frozen=frozen, policy_eval=True)
    return st.finish({**st.policy_summary(), "data": data_stats,
                      "train_pairs": len(pairs["train"]),
                      "held_out": st.held_out_metrics("pairs/")})


if __name__ == "__main__":
    config_utils.run_stage(run, ("sft", "dpo", "win_rate_vs_sft", "held_out"))
