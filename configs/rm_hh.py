"""Reward model on real preference data (Anthropic HH-RLHF by default) from an imported HF model.

    python -m rlhf_jax.rm --config=configs/rm_hh.py \
        --config.init_from=hf:/models/gpt2-sft \
        --config.data.source.train=/data/hh-rlhf/helpful-base/train.jsonl.gz \
        --config.data.source.eval=/data/hh-rlhf/helpful-base/test.jsonl.gz
    python -m rlhf_jax.rm --config=configs/rm_hh.py:format=summarize_comparisons \
        --config.data.source.train=/data/comparisons/batch3.json \
        --config.data.source.train_split=train --config.data.source.eval_split=valid1 ...
    python -m rlhf_jax.rm --config=configs/rm_hh.py:smoke ...      # two steps, for tests

Preset keys: smoke, format (hh_rlhf | summarize_comparisons | ultrafeedback | jsonl), loss, norm.

`init_from` is `hf:<dir>` (a local Hugging Face checkpoint and its tokenizer, e.g. an SFT model
exported with `rlhf_jax.models.hf.save_hf`) or the work dir of an SFT stage run on real data.
Files are read from local paths in their published formats (see
`rlhf_jax.data.preference_formats`); rows that are malformed stop the run with file:line unless
`skip_bad_rows=True`, identical chosen/rejected pairs are dropped, and over-long examples lose
prompt tokens from the left; every count is in summary.json under `data`.
"""

import ml_collections

from rlhf_jax import config_utils


def get_config(arg: str | None = None):
    preset = config_utils.parse_preset(arg)
    config_utils.check_preset_keys(preset, ("smoke", "format", "loss", "norm", "preset"),
                                   __file__)
    smoke = config_utils.is_smoke(preset)

    c = config_utils.base_config()
    c.workdir = "runs/rm_hh"
    c.init_from = "hf:models/sft"  # a local HF checkpoint directory (weights + tokenizer)
    c.tokenizer = ""  # "" = the checkpoint's own tokenizer

    c.data = ml_collections.ConfigDict(dict(
        source=dict(
            kind="preference_files",
            format=preset.get("format", "hh_rlhf"),
            train=("data/hh-rlhf/helpful-base/train.jsonl.gz",),
            eval=("data/hh-rlhf/helpful-base/test.jsonl.gz",),
            train_split="",  # keep only rows whose "split" field equals this ("" = all rows)
            eval_split="",
            skip_bad_rows=False,  # True: skip malformed rows and count them, instead of failing
            data_dir="",  # where the TFDS dataset is written ("" = the rlhf_jax cache)
        ),
        candidates="dataset",  # real data: the responses in the files
        max_len=64 if smoke else 512,  # prompt is cut from the left to fit
    ))
    # Sampling settings for candidates=policy / mixed (real data has no simulated annotator, so
    # only the RM's reference normalisation samples the policy here).
    c.policy_data = ml_collections.ConfigDict(dict(
        max_prompt_len=48 if smoke else 384, max_new_tokens=8 if smoke else 128,
        temperature=1.0, batch_size=8 if smoke else 64))
    c.loss = ml_collections.ConfigDict(dict(kind=preset.get("loss", "pairwise"), margin=0.0))
    c.norm = ml_collections.ConfigDict(dict(
        method=preset.get("norm", "reference"),  # reference (Ziegler) | demonstrations | none
        num_samples=16 if smoke else 1024,  # reference samples on the training prompts
        temperature=0.7,
        max_prompt_len=48 if smoke else 384,
        max_new_tokens=8 if smoke else 128,
        batch_size=8 if smoke else 64,
        target_mean=0.0,
        target_std=1.0,
    ))
    c.eval = ml_collections.ConfigDict(dict(
        judges=(),  # no gold judge for real data
        fresh_world_pairs=0,
        fresh_policy_pairs=0,
        gap_edges=(0.0, 0.25, 0.5, 1.0, 2.0),
        batch_size=8 if smoke else 64,
    ))

    # InstructGPT's 6B RM: lr 9e-6, batch 64 prompts, one epoch, cosine.
    c.optim.lr = 1e-3 if smoke else 9e-6
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 0 if smoke else 50
    c.optim.end_lr_ratio = 0.1
    c.optim.b2 = 0.999
    c.train.epochs = 0.0 if smoke else 1.0
    c.train.steps = 2
    c.train.batch_size = 8 if smoke else 64
    c.train.accum_steps = 1
    c.train.eval_every = 0 if smoke else 500
    c.train.eval_batches = 1 if smoke else 16
    c.train.ckpt_every = 500
    c.train.log_every = 1 if smoke else 20
    c.lock()
    return c
