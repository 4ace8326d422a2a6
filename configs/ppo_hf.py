"""PPO on real prompts (Anthropic HH-RLHF by default) for imported Hugging Face models.

    python -m rlhf_jax.ppo --config=configs/ppo_hf.py \
        --config.init_from=hf:/models/gpt2-sft --config.reward_from=runs/rm_hh \
        --config.data.source.train=/data/hh-rlhf/helpful-base/train.jsonl.gz \
        --config.data.source.eval=/data/hh-rlhf/helpful-base/test.jsonl.gz
    python -m rlhf_jax.ppo --config=configs/ppo_hf.py:smoke ...     # two updates, for tests

Preset keys: smoke, format (a `rlhf_jax.data.preference_formats` format, or "jsonl" for an SFT
JSONL whose prompts are used), steps.

`init_from` is `hf:<dir>` (a local Hugging Face SFT checkpoint and its tokenizer) or the work dir
of an SFT stage; `reward_from` is the work dir of an RM stage on the same tokenizer (e.g.
`configs/rm_hh.py`). The prompts are the distinct prompts of the preference files. Hyper-
parameters follow InstructGPT (Ouyang et al. 2022): fixed beta = 0.02, one PPO epoch, clip 0.2,
no discount, value from the RM; Huang et al. 2024 for the response length (53 tokens) and the
EOS trick. No gold judge exists for real data, so only the RM score, KL and diagnostics are
logged.
"""

import ml_collections

from rlhf_jax import config_utils


def get_config(arg: str | None = None):
    preset = config_utils.parse_preset(arg)
    config_utils.check_preset_keys(preset, ("smoke", "format", "steps", "preset"), __file__)
    smoke = config_utils.is_smoke(preset)
    fmt = preset.get("format", "hh_rlhf")

    c = config_utils.base_config()
    c.workdir = "runs/ppo_hf"
    c.init_from = "hf:models/sft"  # SFT policy: "hf:<dir>" or an SFT stage's work dir
    c.reward_from = "runs/rm_hh"  # RM stage work dir (same tokenizer as the policy)
    c.value_from = "rm"  # InstructGPT: the value function starts from the RM

    if fmt == "jsonl":
        source = dict(kind="jsonl", train="data/sft/train.jsonl", eval="data/sft/eval.jsonl",
                      skip_malformed=False)
    else:
        source = dict(kind="preference_files", format=fmt,
                      train=("data/hh-rlhf/helpful-base/train.jsonl.gz",),
                      eval=("data/hh-rlhf/helpful-base/test.jsonl.gz",),
                      train_split="", eval_split="", skip_bad_rows=False, data_dir="")
    c.data = ml_collections.ConfigDict(dict(
        source=source,
        max_prompt_len=32 if smoke else 448,  # long prompts keep their last tokens
    ))
    c.rollout = ml_collections.ConfigDict(dict(
        max_new_tokens=8 if smoke else 53,  # Huang et al. 2024 (TL;DR): 53 tokens
        temperature=0.7,
        eos_trick=True,
        no_eos_score=-1.0,
    ))
    c.ppo = ml_collections.ConfigDict(dict(
        epochs=1,  # InstructGPT: one PPO epoch over each batch
        minibatches=2 if smoke else 8,  # InstructGPT: batch 512, minibatch 64
        clip=0.2,
        value_clip=0.2,
        vf_coef=0.1,
        ent_coef=0.0,
        gamma=1.0,
        lam=0.95,
        whiten_rewards=False,
        whiten_advantages=True,
    ))
    c.kl = ml_collections.ConfigDict(dict(
        mode="reward", loss_estimator="k3",
        beta=0.02,  # InstructGPT
        adaptive=False, target=6.0, horizon=10000,  # Ziegler's controller when adaptive
    ))
    c.ptx = ml_collections.ConfigDict(dict(
        coef=0.0,  # InstructGPT's PPO-ptx used 27.8 with its pretraining mix
        rows_per_minibatch=2 if smoke else 8,
        seq_len=32 if smoke else 512,
        source=dict(kind="jsonl", train="data/pretrain/train.jsonl",
                    eval="data/pretrain/eval.jsonl", skip_malformed=False),
    ))
    c.eval = config_utils.policy_eval_config(
        num_prompts=4 if smoke else 256, batch_size=4 if smoke else 64,
        judges=(), gold="",  # no gold judge for real data
        sample_rows=4 if smoke else 8)
    c.eval.temperature = c.rollout.get_ref("temperature")
    c.eval.max_new_tokens = c.rollout.get_ref("max_new_tokens")
    c.eval.max_prompt_len = c.data.get_ref("max_prompt_len")

    c.optim.lr = 1e-3 if smoke else 1e-5
    c.optim.schedule = "linear"
    c.optim.end_lr_ratio = 0.0
    c.optim.warmup_steps = 0
    c.optim.b2 = 0.999
    c.optim.eps = 1e-5
    c.train.steps = int(preset.get("steps", 2 if smoke else 500))
    c.train.batch_size = 8 if smoke else 512  # episodes per update (InstructGPT: 512)
    c.train.log_every = 1
    c.train.eval_every = 0 if smoke else 50
    c.train.ckpt_every = 50
    c.lock()
    return c
