"""SFT, RM, PPO, DPO, KTO and online DPO as two `jax.distributed` processes (gloo, 4 CPU devices each) give the
same final metrics as one process on the same 8-device global mesh: every host-side step reads
its own rows or gathers explicitly, never `device_get`s a global array (DESIGN.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests._stages import run_all
from tests.test_multiprocess import _free_port

ROOT = Path(__file__).resolve().parents[1]
MESH = ["--config.mesh.data=4", "--config.mesh.fsdp=2"]


def _scalars(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[prefix + k] = float(v)
    return out


# Three runs of five stages (two processes plus the one-process reference) take 4-5 minutes on
# 2 cores, a third of CI's budget; tests/test_multiprocess.py keeps the trainer's two-process
# checks in CI. Run before changing a stage's host-side data path: pytest -m slow.
@pytest.mark.slow
def test_stages_on_two_processes_match_one_process(tmp_path):
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", RLHF_JAX_CACHE=str(tmp_path / "cache"))
    logs = [open(tmp_path / f"process{i}.log", "w+") for i in range(2)]
    procs = [subprocess.Popen(
        [sys.executable, "tests/_stages.py", str(tmp_path / "multi"), *MESH,
         f"--config.distributed.coordinator_address=127.0.0.1:{port}",
         "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
        cwd=ROOT, env=env, stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]
    try:
        run_all(tmp_path / "single", MESH)  # meanwhile: one process, 8 devices
    finally:
        for p in procs:
            p.wait(timeout=900)
    for i, (p, log) in enumerate(zip(procs, logs)):
        log.seek(0)
        assert p.returncode == 0, f"process {i}:\n{log.read()[-4000:]}"

    compare_summaries(tmp_path)


# The RM's score-head bias is unidentifiable under a pairwise / K-wise loss (a constant shift
# of every score leaves the loss unchanged), so its gradient is float noise whose sign depends
# on the reduction order, and Adam turns that noise into lr-sized steps: the raw scores of the
# two topologies differ by a constant (2.9e-3 after 2 smoke steps, measured), every other RM
# metric matches, and `reward_norm/bias` absorbs the constant (gain matched to 1e-7). What the
# next stage reads, the normalised reward, is the same: PPO's metrics match to 1e-5.
UNIDENTIFIABLE = {"rm": {"reward_norm/bias"}}


def compare_summaries(root: Path) -> None:
    for stage in ("sft", "rm", "ppo", "dpo", "kto", "online_dpo"):
        got = _scalars(json.loads((root / "multi" / stage / "summary.json").read_text()))
        want = _scalars(json.loads((root / "single" / stage / "summary.json").read_text()))
        keys = {k for k in want if "seconds" not in k and "steps_per_sec" not in k
                and not k.startswith("data/") and "build" not in k and "time/" not in k
                and k not in UNIDENTIFIABLE.get(stage, ())}
        assert keys <= set(got), (stage, sorted(keys - set(got)))
        assert len(keys) > 5, (stage, sorted(keys))
        for k in sorted(keys):
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5,
                                       err_msg=f"{stage}: {k}")
