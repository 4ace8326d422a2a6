"""DPO on real preference data (Anthropic HH-RLHF by default) from an imported HF model.

    python -m rlhf_jax.dpo --config=configs/dpo_hh.py --config.init_from=hf:/models/gpt2-sft \
        --config.data.source.train=/data/hh-rlhf/helpful-base/train.jsonl.gz \
        --config.data.source.eval=/data/hh-rlhf/helpful-base/test.jsonl.gz
    python -m rlhf_jax.dpo --config=configs/dpo_hh.py:format=ultrafeedback ...
    python -m rlhf_jax.dpo --config=configs/dpo_hh.py:smoke ...      # two steps, for tests

Preset keys: smoke, format (hh_rlhf | summarize_comparisons | ultrafeedback | jsonl), loss.

Rafailov et al. 2023 used beta = 0.1 and lr 1e-6 with batch 64 on HH; the files are read in
their published formats (`rlhf_jax.data.preference_formats`) exactly as the RM stage reads them.
No gold judge exists for real data, so the policy evaluation reports KL and lengths, and the
held-out pairs report implicit-reward accuracy.
"""

import ml_collections

from rlhf_jax import config_utils

ENTRY = "rlhf_jax.dpo"


def get_config(arg: str | None = None):
    preset = config_utils.parse_preset(arg)
    config_utils.check_preset_keys(preset, ("smoke", "format", "loss", "preset"), __file__)
    smoke = config_utils.is_smoke(preset)

    c = config_utils.base_config()
    c.workdir = "runs/dpo_hh"
    c.init_from = "hf:models/sft"  # a local HF checkpoint directory (weights + tokenizer)
    c.tokenizer = ""
    c.data = ml_collections.ConfigDict(dict(
        source=dict(kind="preference_files", format=preset.get("format", "hh_rlhf"),
                    train=("data/hh-rlhf/helpful-base/train.jsonl.gz",),
                    eval=("data/hh-rlhf/helpful-base/test.jsonl.gz",),
                    train_split="", eval_split="", skip_bad_rows=False, data_dir=""),
        candidates="dataset",
        pairs="all_pairs",
        max_len=64 if smoke else 512,  # the prompt loses tokens from the left to fit
    ))
    c.policy_data = ml_collections.ConfigDict(dict(  # unused with candidates=dataset
        max_prompt_len=32, max_new_tokens=8, temperature=1.0, batch_size=8))
    c.dpo = ml_collections.ConfigDict(dict(loss=preset.get("loss", "sigmoid"), beta=0.1,
                                           label_smoothing=0.0, reference="precompute"))
    c.eval = config_utils.policy_eval_config(
        num_prompts=4 if smoke else 256, max_prompt_len=48 if smoke else 384,
        max_new_tokens=8 if smoke else 128, batch_size=4 if smoke else 32,
        judges=(), gold="", sample_rows=4 if smoke else 8)

    c.optim.lr = 1e-3 if smoke else 1e-6
    c.optim.schedule = "linear"
    c.optim.warmup_steps = 0 if smoke else 150
    c.optim.end_lr_ratio = 0.0
    c.train.epochs = 0.0 if smoke else 1.0
    c.train.steps = 2
    c.train.batch_size = 8 if smoke else 64
    c.train.eval_every = 0 if smoke else 500
    c.train.ckpt_every = 500
    c.train.log_every = 1 if smoke else 20
    c.lock()
    return c
