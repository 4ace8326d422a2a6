"""Supervised fine-tuning (and base-model pretraining): next-token loss on target tokens only.

InstructGPT step 1 (Ouyang et al. 2022): the policy learns from demonstrations with the prompt
masked out of the loss (`loss_mask`: 1 on response tokens and the EOS; the first response token,
predicted from the last prompt token, is trained — DESIGN.md pitfall 13). Pretraining the
simulated world's base model is the same loss with every token a target, so both run here:

    python -m rlhf_jax.sft --config=configs/sft_sim.py
    python -m rlhf_jax.sft --config=configs/pretrain_sim.py
"""

from __future__ import annotations

import logging

import numpy as np

from rlhf_jax import config_utils, handoff, models, offline
from rlhf_jax import trainer as trainer_lib
from rlhf_jax.data import sources, tokenize
from rlhf_jax.evaluation import PolicyEval
from rlhf_jax.ops import lm_loss_sums
from rlhf_jax.rng import Purpose

log = logging.getLogger(__name__)

OBJECTIVES = ("sft", "pretrain")


def _model(config, trainer):
    """(cfg, init params or a fresh-init function, tokenizer, tokenizer dir)."""
    source = sources.as_dict(config.data.source)
    if config.init_from:
        loaded = handoff.load_policy(config.init_from, shardings=trainer.model_shardings)
        cfg, init, meta = loaded.cfg, loaded.params, loaded.meta
    else:
        cfg, init, meta = models.preset(config.model.preset), None, {}
    tokenizer, tok_dir = handoff.tokenizer_for(config.tokenizer, meta, source)
    if init is None:  # from scratch: the vocabulary is the tokenizer's
        cfg = cfg.replace(vocab_size=len(tokenizer))
        init = lambda: models.init_params(cfg, trainer.key(Purpose.INIT), ("lm",))  # noqa: E731
    cfg = cfg.replace(dropout=float(config.model.dropout), remat=config.model.remat,
                      scan_layers=bool(config.model.scan_layers))
    handoff.check_vocab(tokenizer, cfg, "config.tokenizer")
    return cfg, init, tokenizer, tok_dir


def _encode(config, source, tokenizer, split):
    d = config.data
    if config.objective == "pretrain":
        texts, stats = source.pretrain_texts(split)
        batch, enc = tokenize.encode_lm(tokenizer, texts, d.max_len, pack=d.pack)
        return batch, {**stats, **enc}
    prompts, completions, stats = source.demonstrations(split)
    batch, enc = tokenize.encode_sft(tokenizer, prompts, completions, d.max_len, pack=d.pack)
    return batch, {**stats, **enc}


def run(config) -> dict:
    """(config, init checkpoint, data) -> `workdir/final` params + metrics + summary.json."""
    config_utils.check_choice(config, "objective", OBJECTIVES)
    tr = trainer_lib.Trainer(config, config.objective)
    cfg, init, tokenizer, _ = _model(config, tr)
    source = sources.from_config(config.data.source)
    train_batch, train_stats = _encode(config, source, tokenizer, "train")
    eval_batch, eval_stats = _encode(config, source, tokenizer, "eval")
    log.info("%s data: train %s, eval %s", config.objective, train_stats, eval_stats)

    # The stage's output is self-contained: its tokenizer travels with it, so a later stage
    # never depends on a cache directory that may have been cleaned.
    tok_dir = tr.workdir / "tokenizer"
    if tr.is_main:
        tokenizer.save_pretrained(str(tok_dir))
    tr.metadata.update(model_config=cfg.to_dict(), tokenizer_dir=str(tok_dir.absolute()),
                       data_stats={"train": train_stats, "eval": eval_stats})

    def loss_fn(params, frozen, batch, rng):
        del frozen, rng  # nothing frozen; dropout (off by default) would take the key
        return lm_loss_sums(cfg, params, batch)

    # Held-out loss on the same fixed batches every eval, and sample quality on held-out
    # prompts (the base model is judged on the RL prompts).
    held_out = offline.HeldOut(eval_batch, config.train.batch_size,
                               max_batches=config.train.eval_batches,
                               derive=lambda m: {**m, "perplexity": float(np.exp(m["loss"]))})
    policy_eval = None
    if config.eval.num_prompts > 0:
        policy_eval = PolicyEval.from_config(config.eval, source.prompts("eval"), tokenizer,
                                             place=tr, world=source.world())
    offline.fit(tr, cfg, init, models.param_axes(cfg, ("lm",)), loss_fn, train_batch, held_out,
                policy_eval=policy_eval)
    final = tr.summary.get("eval", {})
    # The numbers the next stages are compared against, at the top level of summary.json.
    tr.write_summary({k: final[k] for k in ("loss", "perplexity", "gold", "eos_rate",
                                            "response_length") if k in final})
    summary = dict(tr.summary)
    tr.close()
    return summary


if __name__ == "__main__":
    config_utils.run_stage(run, None)
