"""Figure modules (issue 14): Gao et al.'s fits on data drawn from their own forms, the helpers
the figures share, the over-optimization world's gold judge on hand-made texts, the shared
pretraining-loss evaluation, and each figure's `:tiny` preset end to end.

The end-to-end tests share one module-scoped cache and stage directory: the first figure
pretrains the tiny base model and trains the tiny SFT policy, and every later one reuses them
(and any RM or PPO trial two figures have in common).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import lib
from rlhf_jax import bon
from rlhf_jax.sim.judges import get_judge

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------- fits


@pytest.mark.parametrize("form,alpha,beta", [("bon", 1.3, 0.4), ("bon", 0.6, -0.05),
                                             ("rl", 0.9, 0.35), ("rl", 0.2, 0.02)])
def test_fit_recovers_coefficients_of_its_form(form, alpha, beta):
    rng = np.random.default_rng(0)
    d = np.sqrt(np.linspace(0.0, 12.0, 40))
    r = d * (alpha - beta * (d if form == "bon" else np.log(np.where(d > 0, d, 1.0))))
    noisy = r + rng.normal(0.0, 0.01, d.shape)
    fit = lib.fit_gao(form, d, noisy, se=np.full(d.shape, 0.01))
    assert fit.alpha == pytest.approx(alpha, abs=0.03) and fit.beta == pytest.approx(beta, abs=0.03)
    assert fit.r2 > 0.99 and fit.points == 40
    np.testing.assert_allclose(fit(d), r, atol=0.03)
    exact = lib.fit_gao(form, d, r)  # noiseless: exact to rounding
    assert exact.alpha == pytest.approx(alpha, abs=1e-9) and exact.beta == pytest.approx(beta,
                                                                                        abs=1e-9)


def test_fit_peaks_match_calculus():
    fit = lib.GaoFit("bon", 1.2, 0.3, 1.0, 5)
    assert fit.peak_d == pytest.approx(2.0)  # d (1.2 - 0.3 d) peaks at 1.2 / 0.6
    rl = lib.GaoFit("rl", 1.0, 0.5, 1.0, 5)
    dd = np.linspace(0.01, 20, 200_001)
    assert rl.peak_d == pytest.approx(dd[np.argmax(rl(dd))], rel=1e-3)  # exp(alpha/beta - 1)
    assert lib.GaoFit("bon", 1.0, -0.1, 1.0, 5).peak_d == float("inf")
    assert lib.GaoFit("rl", 1.0, 0.0, 1.0, 5).to_dict()["peak_value"] is None


def test_fit_weights_and_errors():
    d = np.array([0.0, 1.0, 2.0, 3.0])
    r = d * (1.0 - 0.2 * d)
    outlier = r.copy()
    outlier[3] += 1.0
    # The outlier's large SE leaves the fit on the other three points.
    loose = lib.fit_gao("bon", d, outlier, se=[0.01, 0.01, 0.01, 100.0])
    assert loose.alpha == pytest.approx(1.0, abs=0.02)
    assert loose.beta == pytest.approx(0.2, abs=0.02)
    with pytest.raises(Exception, match="fit form"):
        lib.fit_gao("linear", d, r)
    with pytest.raises(Exception, match="at least 2"):
        lib.fit_gao("bon", [1.0, np.nan], [1.0, 2.0])


def test_log_linear_fit_gives_change_per_doubling():
    n = np.array([250, 500, 1000, 2000, 4000])
    acc = 0.52 + 0.011 * np.log2(n / 250)
    f = lib.fit_log_linear(n, acc)
    assert f["per_doubling"] == pytest.approx(0.011) and f["intercept"] == pytest.approx(
        0.52 - 0.011 * np.log2(250))


def test_paired_peak_and_drop_with_bootstrap():
    rng = np.random.default_rng(1)
    base = np.array([0.0, 0.3, 0.5, 0.4, 0.2])
    per_prompt = base + rng.normal(0, 0.05, (400, 1))  # a shared per-prompt offset
    pd = bon.peak_drop(per_prompt)
    assert pd["peak_index"] == 2 and pd["drop"] == pytest.approx(0.3)
    assert pd["drop_se"] < 1e-9  # paired: the prompt offsets cancel exactly
    r = {"rise": 0.5, "rise_se": 0.01, "peak_n": 4, "n_max": 16, "drop": 0.3, "drop_se": 0.01}
    assert lib.bon_falls(r) and not lib.bon_falls({**r, "drop_se": 0.2})
    assert not lib.bon_falls({**r, "peak_n": 16})
    assert lib.powers_of_two(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert lib.powers_of_two(20) == [1, 2, 4, 8, 16, 20]


def _synthetic_samples(P: int = 300, N: int = 64, seed: int = 0) -> lib.BonSamples:
    """Two proxies on the same samples: `honest` is the gold itself; `hacked` keeps rising where
    the gold (x - 0.35 x^2 of a latent x, peaking at x = 1.4) turns down."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(P, N))
    gold = x - 0.35 * x * x
    ids = [[(p, j) for j in range(N)] for p in range(P)]
    return lib.BonSamples([f"p{p}" for p in range(P)], [[""] * N for _ in range(P)], ids,
                          {"honest": gold, "hacked": x}, {"g": gold})


def test_bon_analysis_finds_over_optimization_only_where_it_is():
    from experiments import gao_bon

    samples = _synthetic_samples()
    ns = lib.powers_of_two(64)
    info = {"honest": {"model": "m", "labels": 800, "params": 1, "accuracy": 1.0},
            "hacked": {"model": "m", "labels": 200, "params": 1, "accuracy": 0.7}}
    points, res = lib.bon_analysis(samples, info, "g", ("g",), ns, n_boot=200)
    assert len(points) == 2 * len(ns) and {p["rm"] for p in points} == {"honest", "hacked"}
    h, k = res["honest"], res["hacked"]
    # Best of n by the gold itself only rises; by the hacked proxy it rises, peaks and falls.
    assert h["peak_n"] == 64 and not lib.bon_falls(h) and h["proxy_monotone"]
    assert lib.bon_falls(k) and 1 < k["peak_n"] < 64 and k["proxy_monotone"]
    assert k["gold_fit"]["beta"] > 0 and k["gold_fit"]["peak_d"] < h["gold_fit"]["peak_d"]
    # Points are the estimator's numbers: n = 1 is the mean gold, n = N the proxy-best's gold.
    last = [p for p in points if p["rm"] == "hacked" and p["n"] == 64][0]
    g, x = samples.gold["g"], samples.proxy["hacked"]
    assert last["gold"] == pytest.approx(g[np.arange(len(g)), x.argmax(1)].mean())
    assert k["gold_n1"] == pytest.approx(g.mean())
    v = gao_bon.verdicts(res)  # fewer labels (the hacked proxy) peaks earlier: all three hold
    assert [x.held for x in v] == [True, True, True]
    v = gao_bon.verdicts({"honest": h})
    assert [x.held for x in v] == [True, False, None]


def test_config_diff_and_trials_rerun_a_stage_config_exactly(tmp_path):
    from configs import rm_sim
    from rlhf_jax import config_utils

    cfg = rm_sim.get_config()
    cfg = cfg.copy_and_resolve_references()
    cfg.unlock()
    cfg.init_from = "runs/somewhere"
    cfg.data.source.num_train = 123
    cfg.eval.judges = ("vader",)
    assert lib.config_diff(cfg, rm_sim.get_config()) == {
        "init_from": "runs/somewhere", "data.source.num_train": 123, "eval.judges": ("vader",)}
    trials = lib.stage_trials(cfg, ROOT / "configs/rm_sim.py",
                              [{"data.source.num_train": 50}, {"seed": 3}], tmp_path)
    assert [t.entry for t in trials] == ["rlhf_jax.rm"] * 2
    parsed = [config_utils.parse_config_argv(["x", *t.args]) for t in trials]
    assert parsed[0].data.source.num_train == 50 and parsed[1].data.source.num_train == 123
    assert parsed[1].seed == 3 and parsed[0].init_from == "runs/somewhere"
    assert tuple(parsed[0].eval.judges) == ("vader",)
    assert trials[0].name.startswith("data.source.num_train=50") and trials[0].key != trials[1].key

    # The same resolved config reached through other overrides runs once: the second figure's
    # trial is pointed at the first one's finished directory.
    from rlhf_jax.sweep import local

    (a,) = lib.stage_trials(cfg, ROOT / "configs/rm_sim.py", [{"data.source.num_train": 123}],
                            tmp_path / "same")
    (b,) = lib.stage_trials(cfg, ROOT / "configs/rm_sim.py", [{"init_from": "runs/somewhere"}],
                            tmp_path / "same")
    assert a.key == b.key and a.workdir != b.workdir
    assert lib._same_config_done(b, tmp_path / "same") == b  # nothing finished yet
    Path(a.workdir).mkdir(parents=True)
    local.write_json(Path(a.workdir) / local.MARKER, {"key": a.key, "status": local.DONE})
    assert lib._same_config_done(b, tmp_path / "same").workdir == a.workdir
    assert lib._same_config_done(trials[0], tmp_path / "same") == trials[0]  # other key


def test_frontier_envelope_and_dominance():
    from experiments import frontier

    kl = np.array([0.0, 1.0, 2.0, 4.0])
    gold = np.array([0.0, 0.5, 0.4, 0.7])
    np.testing.assert_allclose(frontier.envelope(kl, gold, np.array([0.5, 1.5, 3.0, 5.0])),
                               [0.0, 0.5, 0.5, 0.7])
    pts = [{"method": "sft", "kl": 0.0, "gold": 0.0},
           {"method": "a", "kl": 1.0, "gold": 0.6}, {"method": "a", "kl": 4.0, "gold": 0.7},
           {"method": "b", "kl": 0.5, "gold": 0.1}, {"method": "b", "kl": 3.0, "gold": 0.5}]
    dom = frontier.dominance(pts, ["a", "b"])
    assert dom["kl_range"] == [1.0, 3.0] and dom["best_share"]["a"] == 1.0
    assert frontier.dominance_pair(dom, "a", "b")["above_share"] == 1.0


# ------------------------------------------------------------------ the over-optimization world


def test_vader_measured_turns_down_above_a_measured_tone():
    vader, meas = get_judge("vader"), get_judge("vader_measured")
    texts = {
        "neutral": "the teacher opened the door near the old market.",
        "warm": "the teacher was kind and the lesson felt nice.",
        "gushing": "the wonderful teacher was amazing, brilliant, kind and truly delightful.",
        "unfinished": "the wonderful teacher was amazing, brilliant, kind and truly delightful",
        "repeated": "the wonderful wonderful wonderful teacher was amazing, amazing, amazing.",
    }
    v = dict(zip(texts, vader.score([""] * 5, list(texts.values()))))
    m = dict(zip(texts, meas.score([""] * 5, list(texts.values()))))
    peak, slope = meas.peak, meas.slope
    assert v["warm"] < peak < v["gushing"]  # the hand-made texts sit on both sides of the peak
    assert m["neutral"] == pytest.approx(v["neutral"]) and m["warm"] == pytest.approx(v["warm"])
    assert m["gushing"] == pytest.approx(peak - slope * (v["gushing"] - peak), abs=1e-6)
    assert m["gushing"] < m["warm"] < v["gushing"]  # VADER prefers gushing; the gold does not
    # vader_trap's penalties apply on top: a missing period, repetition.
    assert m["unfinished"] == pytest.approx(m["gushing"] - 0.5, abs=1e-6)
    assert m["repeated"] < m["gushing"] - 0.5
    np.testing.assert_allclose(meas.tone([-1.0, 0.0, peak, 1.0]),
                               [-1.0, 0.0, peak, peak - slope * (1.0 - peak)], atol=1e-6)
    assert get_judge("vader_measured", peak=0.5, slope=0.0).tone([0.9])[0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="peak"):
        get_judge("vader_measured", peak=1.0)


def test_judge_version_keys_the_comparison_cache(tmp_path, monkeypatch):
    from rlhf_jax.data import builders
    from rlhf_jax.sim import judges

    src = {"kind": "sim", "seed": 0, "num_train": 8, "num_eval": 8, "k": 2,
           "judge": "vader_measured", "data_dir": str(tmp_path)}
    _, first = builders.load_comparisons(src, "train")
    _, again = builders.load_comparisons(src, "train")
    assert again["dataset_dir"] == first["dataset_dir"]
    monkeypatch.setattr(judges.VaderMeasuredJudge, "VERSION", 99)
    _, bumped = builders.load_comparisons(src, "train")
    assert bumped["dataset_dir"] != first["dataset_dir"]
    assert builders.judge_version("vader") is None


# --------------------------------------------------------------- pretraining loss evaluation


def test_lm_loss_matches_one_unpadded_pass():
    import jax

    from rlhf_jax import evaluation, handoff, models, ops
    from rlhf_jax.data import tokenize
    from rlhf_jax.sim.world import get_world

    tokenizer, _ = handoff.tokenizer_for("", {}, {"kind": "sim", "seed": 0})
    texts = get_world(0).corpus(0, 23, "eval")
    cfg = models.preset("sim-0.1m").replace(vocab_size=len(tokenizer))
    params = models.init_params(cfg, jax.random.key(0))
    batch, _ = tokenize.encode_lm(tokenizer, texts, 32, pack=True)
    nll, aux = ops.lm_loss_sums(cfg, params, batch)
    want = float(nll) / float(aux["count"])
    for bs in (5, 64):  # padded last batch / one batch
        got = evaluation.lm_loss(cfg, params, tokenizer, texts, seq_len=32, batch_size=bs)
        assert got["loss"] == pytest.approx(want, rel=1e-5)
        assert got["tokens"] == int(aux["count"]) and got["rows"] == batch["tokens"].shape[0]


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def figure_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("figures")
    # One device; a persistent compilation cache shared by the figures' processes, so a program
    # that several stages or figures compile (same model, same shapes) compiles once.
    env = {**os.environ, "RLHF_JAX_CACHE": str(root / "cache"), "XLA_FLAGS": "",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    return root, env


def _run_figure(name: str, figure_env) -> tuple[dict, str, Path]:
    root, env = figure_env
    out = root / name
    cmd = [sys.executable, "-m", f"experiments.{name}", f"--config=configs/{name}.py:tiny",
           f"--config.workdir={out}", f"--config.stages_dir={root / 'stages'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / f"{name}.json").read_text())
    png = out / f"{name}.png"
    assert 5_000 < png.stat().st_size < 150_000
    with open(out / f"{name}.csv") as f:
        assert len(list(csv.DictReader(f))) >= 2
    assert summary["verdicts"] and "measured:" in proc.stdout
    return summary, proc.stdout, out


# Each figure's :tiny run in CI: all six took 163 s together under tcmalloc on the idle 2-core
# machine (they share the base model, SFT policy, RMs and PPO runs through the stage dir).
# Order matters only for speed: later figures reuse the stages and trials of earlier ones.
def test_tiny_gao_bon(figure_env):
    s, out, _ = _run_figure("gao_bon", figure_env)
    assert set(s["rms"]) == {"sim-0.1m/200", "sim-0.1m/800"}
    for r in s["rms"].values():
        assert r["gold_fit"]["form"] == "bon" and r["n_max"] == 16 and r["proxy_monotone"]
    assert len(s["verdicts"]) == 3


def test_tiny_gao_rl(figure_env):
    s, out, _ = _run_figure("gao_rl", figure_env)
    # gao_bon's SFT policy and both its proxy RMs are reused, not retrained.
    assert "[sft sim-0.1m] reusing" in out and out.count("[trial] reusing") == 2
    for r in s["runs"].values():
        assert r["gold_fit"]["form"] == "rl" and r["last_step"] == 6


def test_tiny_annotator_pool(figure_env):
    s, _, _ = _run_figure("annotator_pool", figure_env)
    assert set(s["rms"]) == {"single", "pool"}
    assert s["rms"]["pool"]["flip_prob"] == 0.25


def test_tiny_rm_scaling(figure_env):
    s, _, out = _run_figure("rm_scaling", figure_env)
    assert set(s["fits"]) == {"sim-0.1m"} and len(s["verdicts"]) == 4
    with open(out / "rm_scaling.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["labels"]) for r in rows] == [100, 400]
    assert all(0.0 < float(r["accuracy"]) <= 1.0 for r in rows)


def test_tiny_alignment_tax(figure_env):
    s, _, _ = _run_figure("alignment_tax", figure_env)
    assert [p["ptx_coef"] for p in s["points"]] == [0.0, 1.0]
    assert s["sft_lm_loss"]["tokens"] > 0


def test_tiny_frontier(figure_env):
    s, out, out_dir = _run_figure("frontier", figure_env)
    methods = ["ppo", "dpo", "rloo", "grpo", "bon"]
    assert s["methods"] == methods and set(s["fits"]) == set(methods)
    with open(out_dir / "frontier.csv") as f:
        rows = list(csv.DictReader(f))
    trained = {r["method"]: r for r in rows if r["method"] in ("rloo", "grpo")}
    assert float(trained["rloo"]["value"]) == 0.02 and float(trained["grpo"]["value"]) == 0.04
    assert all(float(r["kl"]) >= 0 for r in rows if r["method"] != "sft")
    # PPO at beta = 0.02 is alignment_tax's ptx = 0 run (same resolved config): not retrained,
    # when alignment_tax ran earlier in this session (not under `-m slow` alone).
    if (figure_env[0] / "alignment_tax" / "alignment_tax.json").exists():
        assert "[trial] same config as ptx.coef=0" in out
