"""rlhf_jax: SFT, reward models and PPO in JAX/Flax over a device mesh."""

import flax

# Parameters carry logical axis names as metadata only; `rlhf_jax.sharding` alone turns them into
# mesh placements (one rules table for every stage). Flax's eager sharding would instead need a
# mesh at construction time, including inside `eval_shape`.
flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
