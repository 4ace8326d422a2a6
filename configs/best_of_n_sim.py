"""Best-of-n curves of the pipeline's SFT policy against its RM (experiments/best_of_n.py).

    python -m experiments.best_of_n                                   # N = 16, 512 prompts
    python -m experiments.best_of_n --config.n=256 --config.num_prompts=128   # Gao et al. Fig. 1
    python -m experiments.best_of_n --config=configs/best_of_n_sim.py:tiny    # a test-sized run
    python -m experiments.best_of_n --config.sft_from=<dir> --config.rm_from=<dir>

Preset keys: tiny, model. The SFT and RM stages are the pipeline's (`pipeline` holds
configs/pipeline_sim.py with the same preset), run or reused from `pipeline.workdir`; give
`sft_from` and `rm_from` to use other finished stages instead.
"""

import ml_collections

from configs import pipeline_sim
from rlhf_jax import config_utils


def get_config(arg: str | None = None):
    preset = config_utils.parse_preset(arg)
    config_utils.check_preset_keys(preset, ("tiny", "model", "preset"), __file__)
    tiny = bool(preset.get("tiny")) or preset.get("preset") == "tiny"
    pipe_arg = ",".join(f"{k}={v}" for k, v in (("tiny", tiny), ("model", preset.get("model")))
                        if v)

    c = ml_collections.ConfigDict()
    c.workdir = "runs/best_of_n"
    c.seed = 0
    c.overwrite = True  # replace the CSV / PNG of an earlier run in workdir
    c.pipeline = pipeline_sim.get_config(pipe_arg or None).copy_and_resolve_references()
    c.pipeline.unlock()
    c.sft_from = ""  # "" = the pipeline's SFT stage
    c.rm_from = ""  # "" = the pipeline's RM stage
    c.n = 16  # samples per prompt: estimates for every n <= N (256 for Gao et al.'s range)
    c.num_prompts = 64 if tiny else 512
    c.n_boot = 1000  # bootstrap resamples of the prompts for the SEs
    # The pipeline's held-out prompts (the first num_prompts of them), sampled at the settings
    # the RM was normalised at (PPO's rollout).
    c.prompts = c.pipeline.eval.prompts
    c.eval = config_utils.policy_eval_config(
        num_prompts=c.get_ref("num_prompts"), batch_size=256,
        judges=("vader", "vader_trap"), gold="vader", sample_rows=0)
    c.eval.temperature = c.pipeline.ppo.rollout.temperature
    c.eval.max_new_tokens = c.pipeline.ppo.rollout.max_new_tokens
    c.eval.max_prompt_len = c.pipeline.ppo.data.max_prompt_len
    c.lock()
    return c
