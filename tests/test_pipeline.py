"""End to end: base model → SFT → RM → PPO on a tiny budget, and the gold score rises."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_pipeline_raises_gold_score(tmp_path):
    workdir = tmp_path / "pipe"
    env = {**os.environ, "RLHF_JAX_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "experiments.pipeline", "--config=configs/pipeline_sim.py:tiny",
           f"--config.workdir={workdir}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((workdir / "summary.json").read_text())
    sft, ppo = summary["sft"], summary["ppo"]
    # PPO must beat SFT by the gold judge, which never entered its reward, by a clear margin
    # (several standard errors), with a KL from SFT that is positive but bounded by the penalty.
    assert ppo["gold"] - sft["gold"] > 3 * max(ppo["gold_sem"], sft["gold_sem"])
    assert ppo["win_rate_vs_sft"] > 0.55 and sft["win_rate_vs_sft"] == 0.5
    assert ppo["rm_score"] > sft["rm_score"]
    assert 0.0 < ppo["kl"] < 20.0 and abs(sft["kl"]) < 1e-6
    for plot in summary["plots"].values():
        assert Path(plot).stat().st_size > 1000
    assert "win rate vs SFT" in proc.stdout and "PPO" in proc.stdout

    # A second run with the same config reuses every finished stage.
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stdout.count("reusing") == 3
