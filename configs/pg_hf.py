"""Critic-free policy gradients on real prompts (Anthropic HH-RLHF by default) for imported
Hugging Face models.

    python -m rlhf_jax.pg --config=configs/pg_hf.py:method=grpo \
        --config.init_from=hf:/models/gpt2-sft --config.reward_from=runs/rm_hh \
        --config.data.source.train=/data/hh-rlhf/helpful-base/train.jsonl.gz \
        --config.data.source.eval=/data/hh-rlhf/helpful-base/test.jsonl.gz
    python -m rlhf_jax.pg --config=configs/pg_hf.py:smoke,method=rloo ...   # two updates (tests)

Preset keys: method (rloo | grpo | dr_grpo | reinforce), smoke, format (a
`rlhf_jax.data.preference_formats` format, or "jsonl" for an SFT JSONL whose prompts are used),
steps.

`init_from` is `hf:<dir>` or an SFT stage's work dir; `reward_from` an RM stage on the same
tokenizer (e.g. configs/rm_hh.py). `train.batch_size` counts prompts; each is sampled
`pg.group_size` times. Each method's estimator, KL placement, aggregation and KL coefficient are
its paper's (the table in configs/pg_sim.py; beta: RLOO 0.05, Ahmadian et al. 2024 / TRL; GRPO
0.04, Shao et al. 2024; Dr. GRPO 0, Liu et al. 2025); one pass over each rollout batch in
minibatches, clip 0.2, lr 1e-6 (Shao et al. 2024), 53-token responses with the EOS trick (Huang
et al. 2024). No gold judge exists for real data: only the RM score, KL and diagnostics are
logged.
"""

import ml_collections

from configs.pg_sim import PAPER, method_name
from rlhf_jax import config_utils


def get_config(arg: str | None = None):
    preset = config_utils.parse_preset(arg)
    config_utils.check_preset_keys(preset, ("method", "smoke", "format", "steps", "preset"),
                                   __file__)
    smoke = config_utils.is_smoke(preset)
    fmt = preset.get("format", "hh_rlhf")
    name = method_name(preset)
    if name not in PAPER:
        raise ValueError(f"{__file__}: method {name!r} is not a method; use one of "
                         f"{tuple(PAPER)}")
    method = PAPER[name]

    c = config_utils.base_config()
    c.workdir = f"runs/{name}_hf"
    c.init_from = "hf:models/sft"  # SFT policy: "hf:<dir>" or an SFT stage's work dir
    c.reward_from = "runs/rm_hh"  # RM stage work dir (same tokenizer as the policy)
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
    c.pg = ml_collections.ConfigDict(dict(
        estimator=method["estimator"],
        group_size=2 if smoke else 4,  # K samples per prompt (RLOO: k = 4)
        std_eps=1e-6,
        aggregation=method["aggregation"],
        loss_normalizer=0.0,  # "constant" only; 0 = episodes per minibatch x max_new_tokens
        clip_low=0.2,
        clip_high=0.2,  # DAPO's clip-higher: 0.28
        epochs=1,  # one pass over each rollout batch
        minibatches=2 if smoke else 8,
    ))
    c.kl = ml_collections.ConfigDict(dict(
        mode=method["kl_mode"], loss_estimator="k3", beta=method["beta"]))
    c.eval = config_utils.policy_eval_config(
        num_prompts=4 if smoke else 256, batch_size=4 if smoke else 64,
        judges=(), gold="",  # no gold judge for real data
        sample_rows=4 if smoke else 8)
    c.eval.temperature = c.rollout.get_ref("temperature")
    c.eval.max_new_tokens = c.rollout.get_ref("max_new_tokens")
    c.eval.max_prompt_len = c.data.get_ref("max_prompt_len")

    c.optim.lr = 1e-3 if smoke else 1e-6
    c.optim.schedule = "linear"
    c.optim.end_lr_ratio = 0.0
    c.optim.warmup_steps = 0
    c.optim.b2 = 0.999
    c.optim.eps = 1e-5
    c.train.steps = int(preset.get("steps", 2 if smoke else 500))
    # Prompts per update (x group_size episodes); a multiple of the mesh's batch shards.
    c.train.batch_size = 8 if smoke else 128
    c.train.log_every = 1
    c.train.eval_every = 0 if smoke else 50
    c.train.ckpt_every = 50
    c.lock()
    return c
