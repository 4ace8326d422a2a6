"""The failure-mode experiment's `:tiny` preset, end to end (issue 16).

One run of `:tiny,failure=typos` in a fresh model cache, work dir and JAX compilation cache (a
module fixture): the variant world's tiny base model (zoo), SFT, the fixed-data RM and the typo
RM, and PPO against each (sweep trials, two at a time). A second run of the same preset must
find every stage and trial finished (SFT reused, trials skipped: their keys are their resolved
configs) and write the same outputs. Nothing needs to learn at this budget: the test checks that
every piece runs and reports, not the verdict. The other failures' reports (CSV, PNG, verdict)
come from the same code on other probe keys and are checked without training in
tests/test_failure_modes.py (`test_report_writes_csv_png_verdict_per_failure`).

Cost: six JAX processes (base model, SFT, 2 RMs, 2 PPO runs), each dominated by compilation;
measured ~6 min on 2 shared cores under load ~10 (see the report of issue 16, part 4).
"""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

# In CI: 75 s under tcmalloc on the idle 2-core machine (it was ~6 minutes of page-faulting,
# compilation-bound stage processes under glibc's malloc at a higher load).

ROOT = Path(__file__).resolve().parents[1]
KEYS = ["probe/typo_rate", "probe/refusal_boundary", "probe/refusal_harmful",
        "probe/group_gold_gap", "probe/length_gain_total", "probe/length_words"]


def _run(shared):
    cmd = [sys.executable, "-m", "experiments.failure_modes",
           "--config=configs/failure_modes.py:tiny,failure=typos",
           f"--config.workdir={shared['workdir']}"]
    return subprocess.run(cmd, cwd=ROOT, env=shared["env"], capture_output=True, text=True,
                          timeout=1800)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("failure_modes")
    env = {**os.environ, "RLHF_JAX_CACHE": str(root / "cache"),
           "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
    shared = {"env": env, "workdir": root / "run"}
    proc = _run(shared)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shared["first"] = proc
    return shared


def test_tiny_typos_writes_points_plot_verdict(shared):
    proc = shared["first"]
    assert "[sft] running" in proc.stdout
    # Two RMs (fixed, bug_typos) and two PPO runs, each trained once.
    assert proc.stderr.count("[sweep] done") == 4, proc.stderr[-3000:]
    assert "== typos:" in proc.stdout and "REPRODUCED" in proc.stdout
    out = shared["workdir"] / "typos"
    rows = list(csv.DictReader(open(out / "points.csv")))
    by = {}
    for r in rows:
        by.setdefault((r["condition"], r["method"]), []).append(r)
    assert set(by) == {("fixed", "ppo"), ("bug_typos", "ppo")}
    for pts in by.values():
        assert [int(p["step"]) for p in pts] == [0, 2, 4]  # SFT, then an eval every 2 updates
        assert float(pts[0]["kl"]) == 0.0
        for key in KEYS:  # every probe is measured at every eval point
            vals = [float(p[key]) for p in pts]
            assert all(math.isfinite(v) for v in vals), key
        assert all(0 <= float(p["probe/typo_rate"]) <= 1 for p in pts)
    # Both runs start from the same SFT policy, probed on the same prompts with the same key.
    assert by[("fixed", "ppo")][0]["probe/typo_rate"] == by[("bug_typos", "ppo")][0][
        "probe/typo_rate"]
    assert 5_000 < (out / "typos.png").stat().st_size < 100_000
    verdict = json.loads((out / "verdict.json").read_text())
    assert isinstance(verdict["reproduced"], bool)
    assert verdict["reproduced"] == verdict["ppo"]["reproduced"]
    for cond in ("fixed", "bug_typos"):
        probes = verdict["rm"][cond]
        assert math.isfinite(probes["probe/rm_typo_margin"])
        assert 0 <= probes["probe/rm_typo_prefers_typo"] <= 1
    summary = json.loads((shared["workdir"] / "summary.json").read_text())
    assert summary["failures"] == ["typos"]
    assert summary["reproduced"] == {"typos": verdict["reproduced"]}


def test_tiny_rerun_reuses_every_stage_and_trial(shared):
    before = (shared["workdir"] / "typos" / "points.csv").read_text()
    proc = _run(shared)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[sft] reusing" in proc.stdout
    assert proc.stderr.count("2 of 2 trials finished earlier: skipped") == 2, proc.stderr
    assert "[sweep] done" not in proc.stderr
    assert (shared["workdir"] / "typos" / "points.csv").read_text() == before
