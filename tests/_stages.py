"""SFT -> RM -> PPO -> DPO -> KTO -> online DPO on tiny smoke configs of the simulated world, in one process, for the
multi-process test: `python tests/_stages.py ROOT [--config.* overrides for every stage]`.

Every stage writes its summary.json under ROOT/<stage>; the test runs this as two
`jax.distributed` processes (4 CPU devices each) and as one 8-device process, and compares.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def run_all(root: Path, extra: list[str]) -> None:
    from rlhf_jax import config_utils, dpo, kto, online_dpo, ppo, rm, sft

    def config(file, stage_dir, *args):
        return config_utils.parse_config_argv(
            ["stage", f"--config={CONFIGS / file}", f"--config.workdir={root / stage_dir}",
             *args, *extra])

    sft.run(config("sft_sim.py:smoke", "sft", "--config.model.preset=sim-0.1m"))
    rm.run(config("rm_sim.py:smoke", "rm", f"--config.init_from={root / 'sft'}"))
    ppo.run(config("ppo_sim.py:smoke", "ppo", f"--config.init_from={root / 'sft'}",
                   f"--config.reward_from={root / 'rm'}"))
    dpo.run(config("dpo_sim.py:smoke", "dpo", f"--config.init_from={root / 'sft'}"))
    kto.run(config("kto_sim.py:smoke", "kto", f"--config.init_from={root / 'sft'}"))
    online_dpo.run(config("online_dpo_sim.py:smoke", "online_dpo",
                          f"--config.init_from={root / 'sft'}",
                          f"--config.reward_from={root / 'rm'}"))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    run_all(Path(sys.argv[1]), sys.argv[2:])
