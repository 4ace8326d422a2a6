"""Where rlhf_jax keeps derived files (tokenizers, TFDS datasets): one cache directory."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$RLHF_JAX_CACHE` if set, else `~/.cache/rlhf_jax` (not created here)."""
    env = os.environ.get("RLHF_JAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rlhf_jax"
