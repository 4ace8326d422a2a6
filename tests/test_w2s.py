"""Weak-to-strong (rlhf_jax/w2s.py): losses, head, PGR, data, and the tiny protocol end to end."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import w2s_stats as S
from rlhf_jax import handoff, models, w2s
from rlhf_jax.data import classification as C
from rlhf_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "w2s_classification.jsonl"


def _logit(p):
    return math.log(p / (1 - p))


def _ce(t, p):
    return -(t * math.log(p) + (1 - t) * math.log(1 - p))


# ----------------------------------------------------------------------------------------- losses


def test_soft_ce_is_the_binary_cross_entropy():
    p = [0.9, 0.2, 0.6]
    t = [1.0, 0.3, 0.5]
    got = w2s.soft_ce(jnp.asarray([_logit(x) for x in p]), jnp.asarray(t))
    np.testing.assert_allclose(got, [_ce(a, b) for a, b in zip(t, p)], rtol=1e-5)


def test_threshold_is_the_linear_quantile_at_the_weak_mean():
    # sorted p0 = [0.1, 0.3, 0.4, 0.6, 0.8]; mean(weak) = 0.3 -> position 0.3 * 4 = 1.2
    # -> 0.3 + 0.2 * (0.4 - 0.3) = 0.32 (linear interpolation, as torch.quantile).
    p0 = jnp.asarray([0.1, 0.8, 0.4, 0.6, 0.3])
    weak = jnp.asarray([0.0, 0.5, 1.0, 0.0, 0.0])
    assert float(w2s.hardening_threshold(p0, weak)) == pytest.approx(0.32, abs=1e-6)


def test_aux_loss_against_the_formula_on_hand_values():
    # Student P(1) = [0.9, 0.2, 0.6, 0.4] -> P(0) = [0.1, 0.8, 0.4, 0.6].
    # Weak P(1) = [1, 0, 0.5, 0.5], mean 0.5 -> threshold = quantile(P(0), 0.5) = 0.5
    # (sorted [0.1, 0.4, 0.6, 0.8], position 1.5). Hardened: class 0 where P(0) >= 0.5 (rows 1
    # and 3), class 1 otherwise -> h = [1, 0, 1, 0].
    p = [0.9, 0.2, 0.6, 0.4]
    weak = [1.0, 0.0, 0.5, 0.5]
    c = 0.25
    target = [(1 - c) * w + c * h for w, h in zip(weak, [1, 0, 1, 0])]
    assert target == [1.0, 0.0, 0.625, 0.375]
    z = jnp.asarray([_logit(x) for x in p], jnp.float32)
    np.testing.assert_allclose(w2s.aux_target(z, jnp.asarray(weak), c), target, atol=1e-6)
    # c = 0.25 is the reference schedule's alpha * 1 at alpha 0.25 (step_frac 0.5 > 0.1).
    frac = jnp.full((4,), 0.5)
    loss, sums = w2s.w2s_loss(z, jnp.asarray(weak), frac, kind="aux", alpha=0.25)
    assert float(loss) == pytest.approx(sum(_ce(t, x) for t, x in zip(target, p)), rel=1e-5)
    assert float(sums["count"]) == 4 and float(sums["coef"]) / 4 == pytest.approx(0.25)
    assert float(sums["hardened"]) == 2
    # The target is detached: d loss / d z = p - target (sigmoid + CE), nothing through h or c.
    grad = jax.grad(lambda zz: w2s.w2s_loss(zz, jnp.asarray(weak), frac, kind="aux",
                                            alpha=0.25)[0])(z)
    np.testing.assert_allclose(grad, np.asarray(p) - np.asarray(target), atol=1e-5)
    # naive = soft-label CE against the weak labels.
    loss_n, _ = w2s.w2s_loss(z, jnp.asarray(weak), frac, kind="naive")
    assert float(loss_n) == pytest.approx(sum(_ce(t, x) for t, x in zip(weak, p)), rel=1e-5)


def test_warmup_schedules_reference_jumps_ramp_does_not():
    fr = np.asarray([0.0, 0.05, 0.1, 0.1001, 0.5, 1.0])
    ref = w2s.aux_coef(fr, 0.5, 0.1, "reference")
    np.testing.assert_allclose(ref, [0.0, 0.025, 0.05, 0.5, 0.5, 0.5])  # 0.05 -> 0.5 jump
    ramp = w2s.aux_coef(fr, 0.5, 0.1, "ramp")
    np.testing.assert_allclose(ramp, [0.0, 0.25, 0.5, 0.5, 0.5, 0.5])
    np.testing.assert_allclose(w2s.aux_coef(fr, 0.5, 0.0, "ramp"), 0.5)
    # The same values in the jitted loss (step_frac traced).
    got = jax.jit(lambda f: w2s.aux_coef(f, 0.5, 0.1, "reference"))(jnp.asarray(fr))
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    with pytest.raises(ValueError, match="schedule"):
        w2s.aux_coef(fr, 0.5, 0.1, "cosine")


def test_step_fraction_feeds_the_reference_step_frac_and_resumes():
    from rlhf_jax.data.iterators import ArrayIterator

    it = w2s.StepFraction(ArrayIterator({"x": np.arange(8)}, 2, seed=0), total_steps=10)
    fracs = [float(next(it)["step_frac"][0]) for _ in range(3)]
    assert fracs == pytest.approx([0.0, 0.1, 0.2])  # batch of step s: (s - 1) / steps
    state = it.get_state()
    a = next(it)
    again = w2s.StepFraction(ArrayIterator({"x": np.arange(8)}, 2, seed=0), total_steps=10)
    again.set_state(json.loads(json.dumps(state)))
    b = next(again)
    np.testing.assert_array_equal(a["x"], b["x"])
    assert float(b["step_frac"][0]) == pytest.approx(0.3)


# ------------------------------------------------------------------------------------------ head


def test_scratch_is_an_init_scheme_with_the_sources_tokenizer():
    a = handoff.resolve_init("scratch:sim-0.1m", seed=3)
    b = handoff.resolve_init("scratch:sim-0.1m", seed=3)
    c = handoff.resolve_init("scratch:sim-0.1m", seed=4, source={"kind": "sim", "seed": 0})
    tok, tok_dir = handoff.tokenizer_for("", a.meta)
    assert a.cfg.vocab_size == len(tok) and tok_dir == a.meta["tokenizer_dir"]
    assert a.cfg == models.preset("sim-0.1m", vocab_size=len(tok))
    leaves = [jax.tree.leaves(x.params) for x in (a, b, c)]
    assert all(isinstance(x, np.ndarray) for x in leaves[0])  # host arrays without shardings
    assert all(np.array_equal(x, y) for x, y in zip(leaves[0], leaves[1]))
    assert not all(np.array_equal(x, y) for x, y in zip(leaves[0], leaves[2]))
    with pytest.raises(UserError, match="unknown preset"):
        handoff.resolve_init("scratch:nope")
    with pytest.raises(UserError, match="has none"):
        handoff.resolve_init("scratch:sim-0.1m", source={"kind": "jsonl", "train": "x"})


def test_w2s_evaluates_on_placed_params():
    """No `jax.device_get` of a (global) params tree: scores run on the mesh (many hosts)."""
    import inspect

    assert "device_get" not in inspect.getsource(w2s)


def test_zero_initialised_head_predicts_one_half():
    cfg = models.ModelConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                             max_len=16)
    trunk = models.init_params(cfg, jax.random.key(0), ("lm",))
    params = w2s.classifier_params(cfg, trunk)
    assert "lm_head" not in params and float(jnp.abs(params["score_head"]["kernel"]).sum()) == 0
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 40, (5, 12)).astype(np.int32)
    mask = (np.arange(12)[None] < rng.integers(1, 13, 5)[:, None]).astype(np.int32)
    np.testing.assert_array_equal(w2s.predict_probs(cfg, params, tokens, mask), 0.5)
    z = w2s.classifier_logits(cfg, params, jnp.asarray(tokens), jnp.asarray(mask))
    np.testing.assert_array_equal(z, 0.0)
    # ...and the trunk is trained through the head: the gradient reaches the kernel.
    g = jax.jit(jax.grad(lambda p: w2s.w2s_loss(w2s.classifier_logits(cfg, p, tokens, mask),
                                                jnp.ones(5), jnp.zeros(5))[0]))(params)
    assert float(jnp.abs(g["score_head"]["kernel"]).sum()) > 0


# ------------------------------------------------------------------------------------------- PGR


def test_pgr_on_hand_numbers():
    assert w2s.pgr(0.6, 0.7, 0.8) == pytest.approx(0.5)
    assert w2s.pgr(0.6, 0.55, 0.8) == pytest.approx(-0.25)
    assert math.isnan(w2s.pgr(0.6, 0.7, 0.6))


def test_student_t_quantiles_match_the_table():
    for df, t in ((1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042)):
        assert S.student_t_quantile(0.975, df) == pytest.approx(t, abs=1e-3)
    assert S.student_t_quantile(0.95, 5) == pytest.approx(2.015, abs=1e-3)


def test_pgr_ci_on_hand_numbers():
    # gaps 0.2 each, gains [0.1, 0.12, 0.08] -> R = 0.5; d = gain - R * gap = [0, .02, -.02],
    # std(d, ddof=1) = 0.02, se = 0.02 / sqrt(3) / 0.2 = 0.057735; t(0.975, 2) = 4.3027.
    out = S.pgr_ci([0.6, 0.6, 0.6], [0.7, 0.72, 0.68], [0.8, 0.8, 0.8])
    assert out["pgr"] == pytest.approx(0.5)
    assert out["se"] == pytest.approx(0.057735, rel=1e-4)
    assert out["lo"] == pytest.approx(0.5 - 4.3027 * 0.057735, abs=1e-3)
    assert out["hi"] == pytest.approx(0.5 + 4.3027 * 0.057735, abs=1e-3)
    assert out["per_seed"] == pytest.approx([0.5, 0.6, 0.4]) and out["gap_resolved"]
    # Ratio of means, not mean of ratios: a seed with a tiny gap does not dominate.
    skew = S.pgr_ci([0.6, 0.6], [0.61, 0.7], [0.61, 0.8])
    assert skew["pgr"] == pytest.approx((0.005 + 0.05) / (0.005 + 0.1))
    assert math.isnan(S.pgr_ci([0.6], [0.7], [0.8])["lo"])


# ------------------------------------------------------------------------------------------ data


def test_jsonl_loader_names_the_bad_line_or_skips_and_counts():
    with pytest.raises(UserError, match=r"w2s_classification\.jsonl:6: missing field 'label'"):
        C.load_jsonl(FIXTURE)
    texts, labels, stats = C.load_jsonl(FIXTURE, skip_bad_rows=True)
    assert texts[0] == "the movie was wonderful." and texts[-1] == "the last good row."
    assert labels.tolist() == [1, 0, 0, 1, 1]
    assert stats["rows"] == 11 and stats["kept"] == 5 and stats["bad"] == 6
    lines = [m.split(": ")[0].rsplit(":", 1)[1] for m in stats["bad_examples"]]
    assert lines == ["6", "7", "8", "9", "10", "11"]
    assert "must be 0 or 1" in stats["bad_examples"][1]
    assert "must be 0 or 1" in stats["bad_examples"][2]  # `true` is not a label
    assert "invalid JSON" in stats["bad_examples"][4]
    with pytest.raises(UserError, match="no such file"):
        C.load_jsonl(FIXTURE.parent / "missing.jsonl")


def test_world_tasks_are_balanced_deterministic_and_follow_the_gold():
    from rlhf_jax.sim.judges import get_judge

    texts, labels, stats = C.world_task("sentiment", "test", 40)
    assert labels.sum() == 20 and stats["dropped_no_label"] >= 0
    again, labels2, _ = C.world_task("sentiment", "test", 40)
    assert again == texts and labels2.tolist() == labels.tolist()
    v = get_judge("vader").score(texts, texts)
    assert np.all((v > 0) == (labels == 1)) and np.all(np.abs(v) >= C.VADER_NEUTRAL)
    train, _, _ = C.world_task("sentiment", "train", 40)
    assert not set(train) & set(texts)

    from rlhf_jax.sim.world import get_world

    pairs, y, _ = C.world_task("preference", "test", 20, judge="vader", sep="<eos>")
    judge = get_judge("vader")
    gold = {f"{p} {rs[0]} <eos> {p} {rs[1]}": judge.score([p, p], rs)
            for p, rs, _ in get_world(0).comparison_candidates(0, 1024, 2, "test")}
    for text, label in zip(pairs, y):
        g = gold[text]  # label 1: the gold judge prefers the second response
        assert (g[1] > g[0]) == bool(label)

    form, yf, _ = C.world_task("form", "test", 20)
    trap = get_judge("vader_trap")
    penalty = {f"{p} {rs[0]}": trap.penalties(rs)[0]  # of the response alone, as the gold sees
               for p, rs, _ in get_world(0).comparison_candidates(0, 1024, 1, "test")}
    assert yf.sum() == 10 and all((penalty[t] == 0) == bool(y) for t, y in zip(form, yf))


def test_encode_keeps_the_end_and_counts_truncation():
    from rlhf_jax.sim.tokenizer import world_tokenizer

    tok, _ = world_tokenizer(0)
    arrays, stats = C.encode(tok, ["the movie was great.", "a b c d e f g h i j k l"], 6)
    assert stats["truncated"] == 1
    assert arrays["tokens"][0, int(arrays["mask"][0].sum()) - 1] == tok.eos_token_id
    assert arrays["mask"][1].sum() == 6 and arrays["tokens"][1, -1] == tok.eos_token_id


# ------------------------------------------------------------------------------------ configs


def test_sweep_lists_every_pair_loss_and_seed_and_each_override_applies():
    from configs import w2s_sim

    sweep = w2s_sim.get_sweep("seeds=3")
    n = len(w2s_sim.SIZES)
    assert len(sweep) == n * (n + 1) // 2 * 2 * 3
    order = {s if ":" in s else f"zoo:{s}": i for i, s in enumerate(w2s_sim.SIZES)}
    assert set(order) == {t["weak"] for t in sweep} | {t["strong"] for t in sweep}
    assert all(order[t["weak"]] <= order[t["strong"]] for t in sweep)
    # No trial names its workdir (rlhf_jax.sweep gives each its own); the experiment names one
    # per trial, all different.
    assert not any("workdir" in t for t in sweep)
    from experiments import weak_to_strong

    ts = weak_to_strong.trials("configs/w2s_sim.py", "seeds=3", ["--config.train.epochs=3.0"],
                               Path("runs/x"))
    assert len({t.workdir for t in ts}) == len(sweep) and {t.entry for t in ts} == {"rlhf_jax.w2s"}
    assert all("--config.train.epochs=3.0" in t.args for t in ts)  # the command line's flags
    assert Path(ts[0].workdir).name.startswith("scratch-sim-0.1m_to_scratch-sim-0.1m-naive-seed0-")
    # The tiny preset trains scratch models (no zoo pretraining) and leaves out weak == strong.
    tiny = w2s_sim.get_sweep("tiny")
    assert len(tiny) == 2 * 2 and all(t["weak"] == "scratch:sim-0.1m" for t in tiny)
    assert w2s_sim.get_config("tiny").strong == "scratch:sim-0.4m"
    base = w2s_sim.get_config()
    for t in sweep[:4]:
        for key in t:
            node = base
            for part in key.split("."):
                node = node[part]  # every override names a field


def test_w2s_config_is_a_sweep_of_its_own_entry(tmp_path):
    """`python -m rlhf_jax.sweep --config=configs/w2s_sim.py` runs every trial through
    rlhf_jax.w2s, each in its own work dir, the models shared through shared_dir."""
    from rlhf_jax.sweep import define

    trials = define.expand("configs/w2s_sim.py", "seeds=2", workdir=tmp_path)
    assert len(trials) == 6 * 2 * 2 and {t.entry for t in trials} == {"rlhf_jax.w2s"}
    assert len({t.workdir for t in trials}) == len(trials)
    assert all(t.args[-1] == f"--config.workdir={t.workdir}" for t in trials)
    assert {t.overrides["shared_dir"] for t in trials} == {"runs/w2s/shared"}


def test_aux_loss_refuses_gradient_accumulation():
    from configs import w2s_sim

    c = w2s_sim.get_config("loss=aux")
    with c.unlocked():
        c.train.accum_steps = 2
    with pytest.raises(UserError, match="accum_steps"):
        w2s.validate(c)


# ------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_trials(tmp_path_factory):
    """The tiny protocol, in process, on models trained from scratch (no zoo pretraining in CI):
    a naive and an aux trial sharing one weak supervisor and ceiling, then a rerun."""
    from configs import w2s_sim

    root = tmp_path_factory.mktemp("w2s")

    def config(loss, name, medium=""):
        c = w2s_sim.get_config(f"tiny,loss={loss}")
        c.weak, c.strong, c.medium = "scratch:sim-0.1m", "scratch:sim-0.4m", medium
        c.shared_dir, c.workdir = str(root / "shared"), str(root / name)
        c.task.num_train, c.task.num_test = 128, 64
        return c

    naive = w2s.run(config("naive", "naive"))
    mtime = (root / "naive" / "summary.json").stat().st_mtime_ns
    aux = w2s.run(config("aux", "aux"))
    again = w2s.run(config("naive", "naive"))
    assert (root / "naive" / "summary.json").stat().st_mtime_ns == mtime  # nothing rerun
    chain = w2s.run(config("naive", "chain", medium="scratch:sim-0.1m"))
    return root, naive, aux, again, chain


def test_tiny_protocol_end_to_end(tiny_trials):
    root, naive, aux, again, chain = tiny_trials
    for s in (naive, aux):
        for k in ("acc_weak", "acc_w2s", "acc_ceiling", "student_supervisor_agreement"):
            assert 0.0 <= s[k] <= 1.0
        if s["acc_ceiling"] != s["acc_weak"]:
            assert s["pgr"] == pytest.approx(w2s.pgr(s["acc_weak"], s["acc_w2s"],
                                                     s["acc_ceiling"]))
        else:
            assert s["pgr"] is None
        assert s["test_rows"] == 64 and s["half_rows"] == 64
        assert s["runs"]["weak"]["params"] < s["runs"]["strong"]["params"]
        assert (root / s["runs"]["strong"]["workdir"] / "summary.json").exists()
    # The aux trial reused the weak supervisor and the ceiling the naive trial trained.
    assert aux["runs"]["weak"]["reused"] and aux["runs"]["ceiling"]["reused"]
    assert not aux["runs"]["strong"]["reused"]
    assert aux["acc_weak"] == naive["acc_weak"] and aux["acc_ceiling"] == naive["acc_ceiling"]
    # Each model is a Trainer run with its own metrics; the aux student logged its coefficient.
    student = Path(aux["runs"]["strong"]["workdir"])
    assert student.parent == root / "aux"
    records = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]
    assert any("coef" in r for r in records)
    assert (student / "final").is_dir() and (student / "probs_test.npy").exists()
    labels = np.load(Path(aux["runs"]["weak"]["workdir"]) / "probs_labels.npy")
    assert labels.shape == (64,) and np.all((labels > 0) & (labels < 1))
    # A rerun of a finished trial (same config) trains nothing and returns the same numbers.
    assert again == {**naive, "trial_reused": True}
    # Bootstrapping: weak -> medium -> strong; the medium trained on the weak labels, the
    # strong student on the medium's (its soft labels on B), weak and ceiling reused.
    assert set(chain["runs"]) == {"weak", "medium", "strong", "ceiling"}
    assert chain["runs"]["weak"]["reused"] and not chain["runs"]["medium"]["reused"]
    medium = Path(chain["runs"]["medium"]["workdir"])
    assert np.load(medium / "probs_labels.npy").shape == (64,) and 0 <= chain["acc_medium"] <= 1


def test_experiment_writes_csv_json_png_and_verdicts(tiny_trials, tmp_path):
    sys.path.insert(0, str(ROOT))
    from experiments import weak_to_strong as E

    _, naive, aux, _, _ = tiny_trials
    # Two seeds of the same numbers give a zero-width interval; enough to exercise the outputs.
    runs = [dict(s, seed=k) for s in (naive, aux) for k in (0, 1)]
    result = E.analyse(runs)
    assert [c["loss"] for c in result["cells"]] == ["aux", "naive"]
    assert result["sizes"] == ["scratch:sim-0.1m", "scratch:sim-0.4m"]
    diff = result["aux_vs_naive"][0]["aux_minus_naive"]
    gap = naive["acc_ceiling"] - naive["acc_weak"]
    if gap:
        assert diff["pgr"] == pytest.approx((aux["acc_w2s"] - naive["acc_w2s"]) / gap)
    from experiments import lib

    lib.write_points([E.trial_row(s) for s in runs], tmp_path / "t.csv")
    assert len((tmp_path / "t.csv").read_text().splitlines()) == 5
    assert E.plot(result, tmp_path / "a.png", "tiny").stat().st_size > 1000
    text = E.report(result, runs, 1.0)
    assert "scratch:sim-0.1m -> scratch:sim-0.4m" in text
    claims = [v["claim"] for v in result["verdicts"]]
    assert claims == [E.NAIVE_CLAIM, E.AUX_CLAIM]
    assert "scratch:sim-0.1m -> scratch:sim-0.4m" in result["verdicts"][0]["evidence"]
    assert "NaN" not in json.dumps(E._jsonable(result))


def test_cli_reports_a_user_error_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_jax.w2s", "--config=configs/w2s_sim.py:tiny",
         "--config.task.kind=jsonl", f"--config.task.train={FIXTURE}",
         f"--config.task.test={FIXTURE}", f"--config.workdir={tmp_path / 'x'}",
         f"--config.shared_dir={tmp_path / 's'}"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "w2s_classification.jsonl:6" in proc.stderr
