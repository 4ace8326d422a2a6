"""experiments/best_of_n.py :tiny on tiny random SFT / RM stages: every n <= N estimated, the
files written, the numbers consistent with the samples' own statistics, and a verdict printed."""

import csv
import json

import numpy as np
import pytest

from rlhf_jax import bon, config_utils

from tests._sim_stages import sim_stage_dirs
from tests.test_ppo_stage import ROOT

N, PROMPTS = 8, 16


def test_best_of_n_tiny(tmp_path, capsys, monkeypatch):
    from experiments import best_of_n

    sft, rmd = sim_stage_dirs(tmp_path / "stages")
    work = tmp_path / "bon"
    config = config_utils.parse_config_argv([
        "best_of_n", f"--config={ROOT / 'configs' / 'best_of_n_sim.py'}:tiny",
        f"--config.workdir={work}", f"--config.sft_from={sft}", f"--config.rm_from={rmd}",
        f"--config.n={N}", f"--config.num_prompts={PROMPTS}", "--config.n_boot=200",
        "--config.eval.batch_size=64"])
    # Keep the samples the experiment draws, to check its numbers against them.
    seen = {}
    real = best_of_n.sample_and_score
    monkeypatch.setattr(best_of_n, "sample_and_score",
                        lambda *a: seen.setdefault("s", real(*a)))
    summary = best_of_n.run(config)
    s = seen["s"]
    assert s.proxy.shape == (PROMPTS, N) and s.primary == "vader"
    with open(work / "bon.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["n"]) for r in rows] == list(range(1, N + 1))
    assert (work / "bon.png").stat().st_size > 1000
    col = {k: np.array([float(r[k]) for r in rows]) for k in ("kl_bon", "kl_empirical", "gold",
                                                               "proxy", "gold_se")}
    # n = 1 is the plain mean of all samples; n = N the mean of each prompt's proxy-best
    # (ties share their mean); in between, the brute-force estimator of rlhf_jax.bon.
    assert col["gold"][0] == pytest.approx(s.gold["vader"].mean())
    best = np.argmax(s.proxy, axis=1)
    assert not np.any(np.sum(s.proxy == s.proxy.max(1, keepdims=True), axis=1) > 1)  # no ties
    assert col["gold"][-1] == pytest.approx(s.gold["vader"][np.arange(PROMPTS), best].mean())
    np.testing.assert_allclose(col["gold"],
                               bon.expected_best_of_n(s.proxy, s.gold["vader"]).mean(0))
    assert np.all(np.diff(col["proxy"]) >= -1e-9)  # E[max of n] grows with n
    np.testing.assert_allclose(col["kl_bon"], np.log(np.arange(1, N + 1))
                               - (np.arange(N)) / np.arange(1, N + 1), atol=1e-12)
    assert np.all(col["kl_empirical"] <= col["kl_bon"] + 1e-9) and col["kl_empirical"][0] == 0
    assert np.all(col["gold_se"][1:] > 0)
    # The verdict: best-of-N vs n = 1 on the same samples, a paired difference.
    v = summary["verdict"]
    assert v["n"] == N and v["diff"] == pytest.approx(col["gold"][-1] - col["gold"][0])
    on_disk = json.loads((work / "summary.json").read_text())
    assert on_disk["verdict"] == v and set(on_disk["judges_by_n"]) == {"vader", "vader_trap"}
    out = capsys.readouterr().out
    assert f"verdict: best-of-{N} gold" in out and "KL_bon" in out

    # Both stage dirs or neither.
    bad = config_utils.parse_config_argv([
        "best_of_n", f"--config={ROOT / 'configs' / 'best_of_n_sim.py'}:tiny",
        f"--config.workdir={work}", f"--config.sft_from={sft}"])
    with pytest.raises(ValueError, match="config.sft_from: only one of"):
        best_of_n.run(bad)
