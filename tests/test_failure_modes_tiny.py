"""The failure-mode experiments' `:tiny` presets, end to end (issue 16).

A session fixture runs `:tiny,failure=all` once in a shared work dir, model cache and JAX
compilation cache: the variant world's tiny base model (zoo cache), SFT, the fixed-data RM and
the four bug RMs, and PPO against each (sweep trials, two at a time). Each failure's own `:tiny`
preset then runs in that work dir: it must find every stage and trial finished (SFT reused,
trials skipped: their keys are their resolved configs) and write its CSV, PNG and verdict.
Nothing here needs to learn: the tiny budget checks that every piece runs and reports, not the
verdicts.
"""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PANELS = {"typos": ["probe/typo_rate"],
          "refusal": ["probe/refusal_boundary", "probe/refusal_harmful"],
          "group": ["probe/group_gold_gap"],
          "length": ["probe/length_gain_total", "probe/length_words"]}
RM_PROBE = {"typos": "probe/rm_typo_margin", "refusal": "probe/rm_refusal_boundary_margin",
            "group": "probe/rm_group_positive_margin", "length": "probe/rm_typo_margin"}


def _run(shared, failure):
    cmd = [sys.executable, "-m", "experiments.failure_modes",
           f"--config=configs/failure_modes.py:tiny,failure={failure}",
           f"--config.workdir={shared['workdir']}"]
    return subprocess.run(cmd, cwd=ROOT, env=shared["env"], capture_output=True, text=True,
                          timeout=1800)


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("failure_modes")
    env = {**os.environ, "RLHF_JAX_CACHE": str(root / "cache"),
           "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
    shared = {"env": env, "workdir": root / "run"}
    proc = _run(shared, "all")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shared["all"] = proc
    return shared


def test_tiny_all_runs_every_trial_once(shared):
    out = shared["all"]
    for f in PANELS:
        assert f"== {f}:" in out.stdout
    summary = json.loads((shared["workdir"] / "summary.json").read_text())
    assert summary["failures"] == list(PANELS)
    assert set(summary["reproduced"]) == set(PANELS)
    # The fixed-data RM and RL run serve every failure: 5 RMs and 5 PPO runs in all.
    assert out.stderr.count("[sweep] done") == 10, out.stderr


@pytest.mark.parametrize("failure", list(PANELS))
def test_tiny_failure_mode_preset(shared, failure):
    proc = _run(shared, failure)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Everything was finished by the fixture's run: reused, nothing trained again.
    assert "[sft] reusing" in proc.stdout
    assert proc.stderr.count("2 of 2 trials finished earlier: skipped") == 2, proc.stderr
    assert f"== {failure}:" in proc.stdout and "REPRODUCED" in proc.stdout
    out = shared["workdir"] / failure
    rows = list(csv.DictReader(open(out / "points.csv")))
    by = {}
    for r in rows:
        by.setdefault((r["condition"], r["method"]), []).append(r)
    assert set(by) == {("fixed", "ppo"), (f"bug_{failure}", "ppo")}
    for pts in by.values():
        assert [int(p["step"]) for p in pts] == [0, 2, 4]  # SFT, then an eval every 2 updates
        assert float(pts[0]["kl"]) == 0.0
        for key in PANELS[failure]:
            assert all(math.isfinite(float(p[key])) for p in pts), key
    png = out / f"{failure}.png"
    assert 5_000 < png.stat().st_size < 100_000
    verdict = json.loads((out / "verdict.json").read_text())
    assert isinstance(verdict["reproduced"], bool)
    assert isinstance(verdict["ppo"]["reproduced"], bool)
    for cond in ("fixed", f"bug_{failure}"):
        assert math.isfinite(verdict["rm"][cond][RM_PROBE[failure]])
