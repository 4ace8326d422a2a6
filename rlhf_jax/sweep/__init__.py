"""Sweeps over config overrides: definitions, a local worker pool, SLURM arrays, TPU pods.

    from rlhf_jax.sweep import product, sweep, fixed, zipit, chainit      # in a config file
    trials = expand("configs/ppo_sim.py", None, workdir="runs/sweeps/kl")  # from code
    rows = run_pool(trials, local_slots(workers=2), "runs/sweeps/kl")

The command line is `python -m rlhf_jax.sweep` (`rlhf_jax/sweep/cli.py`).
"""

from rlhf_jax.sweep.define import (Sweep, Trial, chain, chainit, config_key, entry_command,
                                   entry_of, expand, fixed, format_value, load_sweep, product,
                                   resolve, sweep, zipit)
from rlhf_jax.sweep.local import (Slot, collect, cpu_slots, finished, local_slots, run_pool,
                                  run_trial, write_table)

__all__ = ["Sweep", "Trial", "chain", "chainit", "config_key", "entry_command", "entry_of",
           "expand", "fixed", "format_value", "load_sweep", "product", "resolve", "sweep",
           "zipit", "Slot", "collect", "cpu_slots", "finished", "local_slots", "run_pool",
           "run_trial", "write_table"]
