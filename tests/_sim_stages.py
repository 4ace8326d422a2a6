"""Tiny random "SFT" and "RM" work dirs of the simulated world's tokenizer, for the smoke tests
of stages and experiments that start from them (critic-free RL, best-of-n, the pipeline).

The policy's tied EOS embedding is scaled up so that some responses end within 20 tokens and
the RM scores of a group differ (with none ending, the EOS trick gives every response -1).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from rlhf_jax import models
from rlhf_jax.data import tokenize

from tests.test_ppo_stage import _stage_dirs


def sim_stage_dirs(root: Path) -> tuple[Path, Path]:
    """(sft_dir, rm_dir) under `root`."""
    from rlhf_jax.sim.tokenizer import world_tokenizer

    tok, tok_dir = world_tokenizer(0)
    cfg = models.ModelConfig(vocab_size=len(tok), d_model=32, n_layers=1, n_heads=2, d_ff=64,
                             max_len=64)
    _, eos = tokenize.special_ids(tok)
    policy = jax.tree.map(np.array, models.init_params(cfg, jax.random.key(0), ("lm",)))
    policy["embed"]["embedding"][eos] *= 20.0
    return _stage_dirs(root, cfg, tok_dir, policy)
