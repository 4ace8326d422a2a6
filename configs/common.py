"""Pieces shared by the config files (each file still has its own `get_config`)."""

import ml_collections

from rlhf_jax import config_utils

# Pretraining steps per base-model preset (batch 64 packed rows of 64 tokens).
PRETRAIN_STEPS = {"sim-0.1m": 600, "sim-0.4m": 800, "sim-1.6m": 1200, "sim-4m": 1600}


def lm_stage_config(objective: str, model: str, smoke: bool) -> ml_collections.ConfigDict:
    """Config of an LM-loss stage (pretraining or SFT) on the simulated world."""
    c = config_utils.base_config()
    c.objective = objective  # "pretrain": every token a target; "sft": response tokens only
    c.tokenizer = ""  # "" = from init_from's metadata, else the simulated world's tokenizer
    # Used only when init_from is "" (training from scratch).
    c.model = ml_collections.ConfigDict(dict(preset=model, dropout=0.0, remat="none",
                                             scan_layers=True))
    pretrain = objective == "pretrain"
    c.data = ml_collections.ConfigDict(dict(
        source=dict(kind="sim", seed=0,
                    num_train=200 if smoke else (60_000 if pretrain else 20_000),
                    num_eval=64 if smoke else 512),
        max_len=64 if pretrain else 32,
        pack=pretrain,  # packed rows with segment ids: no attention across documents
    ))
    c.optim.lr = 3e-3 if pretrain else 5e-4
    c.optim.warmup_steps = 0 if smoke else 50
    c.optim.schedule = "cosine"
    c.optim.end_lr_ratio = 0.1
    c.optim.weight_decay = 0.01 if pretrain else 0.0
    c.train.batch_size = 8 if smoke else 64
    c.train.eval_every = 0 if smoke else 200
    c.train.eval_batches = 2 if smoke else 8
    c.train.ckpt_every = 200
    c.train.log_every = 1 if smoke else 20
    c.eval = ml_collections.ConfigDict(dict(
        judge="vader",  # gold judge for sample quality (rlhf_jax.sim.judges), "" = none
        num_prompts=16 if smoke else 256,
        max_prompt_len=8,
        max_new_tokens=20,
        temperature=1.0,
        batch_size=16 if smoke else 128,
        log_samples=8,  # rows of the sample table written to workdir/samples.md each eval
    ))
    return c
