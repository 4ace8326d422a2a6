"""Supervised fine-tuning (and base-model pretraining): next-token loss on target tokens only.

InstructGPT step 1 (Ouyang et al. 2022): the policy learns from demonstrations with the prompt
masked out of the loss. Pretraining the simulated world's base model is the same loss with every
token a target, so both run through this module:

    python -m rlhf_jax.sft --config=configs/sft_sim.py
    python -m rlhf_jax.sft --config=configs/pretrain_sim.py
"""

from __future__ import annotations

import jax

from rlhf_jax import handoff, models
from rlhf_jax.errors import UserError
from rlhf_jax.ops import lm_loss_sums


# ----------------------------------------------------------------------------------- the stage


def _tokenizer_for(config, meta):
    from transformers import AutoTokenizer

    if config.tokenizer:
        return AutoTokenizer.from_pretrained(config.tokenizer), str(config.tokenizer)
    if meta.get("tokenizer_dir"):
        return AutoTokenizer.from_pretrained(meta["tokenizer_dir"]), meta["tokenizer_dir"]
    if config.data.source.kind != "sim":
        raise UserError("config.tokenizer", "is empty and init_from gives none",
                        "set --config.tokenizer=<a Hugging Face tokenizer directory>")
    from rlhf_jax.sim.tokenizer import world_tokenizer

    tok, path = world_tokenizer(int(config.data.source.seed))
    return tok, str(path)


def _encode(config, tokenizer, split):
    from rlhf_jax.data import builders, tokenize

    d = config.data
    if config.objective == "pretrain":
        texts, load_stats = builders.load_pretrain_texts(d.source, split)
        batch, stats = tokenize.encode_lm(tokenizer, texts, d.max_len, pack=d.pack)
        return batch, {**load_stats, **stats}, None
    prompts, completions, load_stats = builders.load_sft_texts(d.source, split)
    batch, stats = tokenize.encode_sft(tokenizer, prompts, completions, d.max_len, pack=d.pack)
    return batch, {**load_stats, **stats}, prompts


def run(config) -> dict:
    """(config, init checkpoint, data) → `workdir/final` params + metrics + summary.json."""
    import logging

    import numpy as np

    from rlhf_jax import trainer as trainer_lib
    from rlhf_jax.data.iterators import ArrayIterator
    from rlhf_jax.evaluation import judge, sample_table, sample_texts
    from rlhf_jax.sim.judges import get_judge

    if config.objective not in ("sft", "pretrain"):
        raise UserError("config.objective", f"{config.objective!r} must be 'sft' or 'pretrain'")
    fallback = None
    if not config.init_from:
        fallback = models.preset(config.model.preset)
    cfg, init_params, meta = handoff.resolve_init(config.init_from, model_cfg_fallback=fallback)
    tokenizer, tok_dir = _tokenizer_for(config, meta)
    if init_params is None:
        cfg = cfg.replace(vocab_size=len(tokenizer))
    cfg = cfg.replace(dropout=float(config.model.dropout), remat=config.model.remat,
                      scan_layers=bool(config.model.scan_layers))
    if len(tokenizer) > cfg.vocab_size:
        raise UserError("config.tokenizer" if config.tokenizer else "config.init_from",
                        f"the tokenizer at {tok_dir} has {len(tokenizer)} tokens but the model's "
                        f"vocab_size is {cfg.vocab_size}", "use the model's own tokenizer")

    train_batch, train_stats, _ = _encode(config, tokenizer, "train")
    eval_batch, eval_stats, eval_prompts = _encode(config, tokenizer, "eval")
    logging.info("%s data: train %s, eval %s", config.objective, train_stats, eval_stats)

    tr = trainer_lib.Trainer(config, config.objective)
    # The stage's output is self-contained: its tokenizer travels with it, so a later stage
    # never depends on a cache directory that may have been cleaned.
    own_tok_dir = tr.workdir / "tokenizer"
    if tr.is_main:
        tokenizer.save_pretrained(str(own_tok_dir))
    tok_dir = str(own_tok_dir.absolute())
    tr.metadata.update(model_config=cfg.to_dict(), tokenizer_dir=tok_dir,
                       data_stats={"train": train_stats, "eval": eval_stats})
    optimizer = trainer_lib.make_optimizer(config.optim, config.train.steps)
    axes = models.param_axes(cfg, ("lm",))
    if init_params is None:
        init = lambda: models.init_params(cfg, jax.random.key(config.seed), ("lm",))  # noqa: E731
    else:
        # Keep the trunk and LM head; a scalar head from an RM checkpoint is not an LM's.
        init = {k: v for k, v in init_params.items() if k != "score_head"}
    state, _ = tr.create_state(init, axes, optimizer)

    def loss_fn(params, batch, rng):
        del rng  # dropout is off by default; with dropout > 0 it would take this key
        return lm_loss_sums(cfg, params, batch)

    step = trainer_lib.make_train_step(loss_fn, optimizer, config.train.accum_steps)
    eval_step = tr.jit_eval(trainer_lib.make_eval_step(loss_fn))
    train_iter = ArrayIterator(train_batch, config.train.batch_size, seed=config.seed)

    ev = config.eval
    gold_judge = get_judge(ev.judge) if ev.judge else None
    if eval_prompts is None and config.data.source.kind == "sim":
        # Pretraining has no demonstrations; the base model is judged on the RL prompts.
        from rlhf_jax.data import builders

        eval_prompts, _ = builders.load_prompts(config.data.source, "eval")

    def eval_fn(st):
        # Fixed-shape batches (one compile); the held-out set is the same every eval.
        it = ArrayIterator(eval_batch, config.train.batch_size, seed=0, shuffle=False)
        n = min(config.train.eval_batches, it.batches_per_epoch)
        m = tr.evaluate(eval_step, st.params, it, num_batches=n)
        m["perplexity"] = float(np.exp(m["loss"]))
        if eval_prompts and ev.num_prompts > 0:
            m.update(_sample_metrics(st.params, int(st.step)))
        return m

    def _sample_metrics(params, step_num):
        prompts = eval_prompts[: ev.num_prompts]
        samples = sample_texts(cfg, params, tokenizer, prompts, jax.random.fold_in(tr.eval_rng, 7),
                               max_prompt_len=ev.max_prompt_len, max_new_tokens=ev.max_new_tokens,
                               temperature=ev.temperature, batch_size=ev.batch_size)
        out = {"eos_rate": float(np.mean(samples["ended"])),
               "response_length": float(np.mean(samples["lengths"]))}
        cols = {}
        if gold_judge is not None:
            j = judge(gold_judge, prompts, samples)
            out["gold_mean"] = j["gold_mean"]
            cols["gold"] = j["_gold"]
        table = sample_table(prompts, samples["responses"], n=ev.log_samples, **cols)
        if tr.is_main:
            with open(tr.workdir / "samples.md", "a") as f:
                f.write(f"\n## step {step_num}\n\n{table}\n")
        return out

    tr.fit(state, step, train_iter, eval_fn=eval_fn)
    final_eval = tr.summary.get("eval", {})
    # The numbers the next stages are compared against, at the top level of summary.json.
    tr.write_summary({k: final_eval[k] for k in ("loss", "perplexity", "gold_mean", "eos_rate",
                                                 "response_length") if k in final_eval})
    summary = dict(tr.summary)
    tr.close()
    return summary


def main(config) -> dict:
    import json

    summary = run(config)
    print(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    from rlhf_jax import config_utils

    config_utils.run_with_config(main)
