"""Issue 16 wiring: probes in the shared policy evaluation, the RM's counterfactual probes,
configs of the failure-mode world whose new fields keep every cache key, the zoo's world
variants, and the experiment's pieces (flags for sweep trials, eval points, verdicts)."""

import json

import jax
import ml_collections
import numpy as np
import pytest

from experiments import failure_modes as FM
from experiments import lib
from rlhf_jax import config_utils, evaluation, handoff, models, provenance, registry, rm, zoo
from rlhf_jax.data import sources, tokenize
from rlhf_jax.errors import UserError
from rlhf_jax.sim import probes as P
from rlhf_jax.sim.world import get_world
from rlhf_jax.sweep import define

WORLD = "failure_modes"


# ------------------------------------------------------------------- keys of neutral fields
def _without_neutral(config) -> ml_collections.ConfigDict:
    """The config as it was before the newer fields existed (the issue-16 fields and the
    `lora` block at their neutral values removed, a block whose every field is neutral whole)."""
    return ml_collections.ConfigDict(
        provenance.strip_neutral(config.copy_and_resolve_references().to_dict()))


def _shipped():
    from configs import dpo_sim, pipeline_sim, ppo_sim, pretrain_sim, rm_sim, sft_sim

    out = {f"{m.__name__}:{a}": m.get_config(a) for m in (pretrain_sim, sft_sim, rm_sim, ppo_sim,
                                                           dpo_sim) for a in (None, "smoke")}
    from configs import pg_sim

    out.update({f"pg_sim:{a}": pg_sim.get_config(a) for a in ("method=rloo", "smoke,method=grpo")})
    out["pipeline"] = pipeline_sim.get_config()
    return out


def test_new_fields_at_their_defaults_keep_every_cache_key():
    for name, c in _shipped().items():
        old = _without_neutral(c)
        assert len(lib._leaves(c)) > len(lib._leaves(old)), f"{name} has none of the new fields"
        assert zoo.config_key(c) == zoo.config_key(old), name
        assert lib.stage_key(c, "x") == lib.stage_key(old, "x"), name
        assert define.config_key(c, "e") == define.config_key(old, "e"), name
        assert provenance.config_hash(c) == provenance.config_hash(old), name
        # A work dir recorded before the fields existed resumes under the new config.
        assert provenance.diff(provenance.canonical(old), provenance.canonical(c)) == {}, name


def test_a_field_off_its_default_changes_the_keys():
    from configs import pretrain_sim, rm_sim

    base = pretrain_sim.get_config("model=sim-0.1m")
    variant = pretrain_sim.get_config(f"model=sim-0.1m,world={WORLD}")
    assert variant.data.source.world == WORLD and variant.workdir.endswith(WORLD)
    assert zoo.config_key(base) != zoo.config_key(variant)
    a, b = rm_sim.get_config(), rm_sim.get_config()
    with b.unlocked():
        b.data.source.group_bias = 0.5
    assert lib.stage_key(a) != lib.stage_key(b)
    d = provenance.diff(provenance.canonical(a), provenance.canonical(b))
    assert d == {"data.source.group_bias": (0.0, 0.5)}
    # Missing on one side and off its neutral value on the other: a real difference.
    old = {"data": {"source": {"kind": "sim"}}}
    assert provenance.diff(old, {"data": {"source": {"kind": "sim", "world": WORLD}}}) == {
        "data.source.world": ("<absent>", WORLD)}
    assert not provenance.is_neutral("train.steps", 0)
    assert not provenance.is_neutral("data.source.group_bias", False)


# ------------------------------------------------------------------------- configs and zoo
def test_world_presets_of_the_stage_configs():
    from configs import dpo_sim, ppo_sim, rm_sim, sft_sim

    s = sft_sim.get_config(f"model=sim-0.1m,world={WORLD}")
    assert s.init_from == f"zoo:sim-0.1m@{WORLD}" and s.data.source.world == WORLD
    assert sft_sim.get_config().init_from == "zoo:sim-0.4m"
    r = rm_sim.get_config(f"world={WORLD}")
    assert r.data.source.world == WORLD and r.data.source.judge == "spec"
    assert "spec" in r.eval.judges and r.data.source.refusals == ""
    p = ppo_sim.get_config(f"world={WORLD}")
    assert p.data.source.world == WORLD and p.ptx.source.world == WORLD
    assert p.eval.probes == 64 and "spec" in p.eval.judges
    assert ppo_sim.get_config().eval.probes == 0
    from configs import pg_sim

    g = pg_sim.get_config(f"method=rloo,world={WORLD}")
    assert g.data.source.world == WORLD and g.eval.probes == 64 and "spec" in g.eval.judges
    assert pg_sim.get_config("method=rloo").eval.probes == 0
    assert dpo_sim.get_config(f"smoke,world={WORLD}").eval.probes == 8
    with pytest.raises(UserError, match="unknown world variant 'nope'"):
        rm_sim.get_config("world=nope")


def test_zoo_scheme_names_world_variants(monkeypatch):
    calls = []
    monkeypatch.setattr(zoo, "ensure_pretrained", lambda c: calls.append(c) or "dir")
    assert zoo.resolve(f"sim-0.1m@{WORLD}") == "dir"
    assert zoo.resolve("sim-0.1m") == "dir"
    assert zoo.resolve("sim-0.1m@default") == "dir"
    assert [c.data.source.world for c in calls] == [WORLD, "", ""]
    assert zoo.config_key(calls[1]) == zoo.config_key(calls[2])
    with pytest.raises(UserError, match="unknown world 'nope'"):
        zoo.resolve("sim-0.1m@nope")
    with pytest.raises(UserError, match="is not a base model"):
        zoo.resolve(f"sim-9m@{WORLD}")


# ----------------------------------------------------------------- probes in PolicyEval / RM
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from rlhf_jax.sim import tokenizer as simtok

    world = get_world(0, WORLD)
    # A tokenizer from a small corpus sample (its vocabulary list covers the rest).
    tok = simtok._wrap(simtok.build_tokenizer(world, num_docs=2000))
    cfg = models.preset("sim-0.1m", vocab_size=len(tok), max_len=64)
    policy = handoff.Loaded(cfg, models.init_params(cfg, jax.random.key(0), ("lm",)), {}, "p")
    reward = handoff.Loaded(cfg, models.init_params(cfg, jax.random.key(1), ("score",)),
                            {"reward_norm": {"gain": 2.0, "bias": 0.5}}, "rm")
    return world, tok, cfg, policy, reward


def _ev(**kw):
    return config_utils.policy_eval_config(**{
        "num_prompts": 8, "batch_size": 8, "max_new_tokens": 8, "judges": ("vader", "spec"),
        "gold": "vader", "sample_rows": 0, **kw})


def test_policy_eval_probes_and_length_gain(setup):
    world, tok, cfg, policy, reward = setup
    prompts = world.prompts(0, 8, "eval")
    pe = evaluation.PolicyEval.from_config(_ev(probes=4), prompts, tok, reward=reward,
                                           reference=policy, world=world)
    key = jax.random.key(3)
    m0, rows0 = pe(cfg, policy.params, key)
    for k in ("typo_rate", "refusal_harmful", "refusal_boundary", "refusal_ordinary",
              "spec_pass", "group_gold_gap", "group_gold_gap_se", "length_words",
              "distinct_1", "gold_ordinary"):
        assert f"probe/{k}" in m0, k
    assert 0 <= m0["probe/typo_rate"] <= 1 and 0 <= m0["probe/spec_pass"] <= 1
    # The reference against itself: no gain, within buckets or across.
    assert m0["probe/length_gain_total"] == 0 and m0["probe/length_gain_within"] == 0
    # Same values, another object: the reference rows come from the first call, and the same
    # key draws the same samples, so the probes repeat exactly.
    same = jax.tree.map(lambda x: x + 0, policy.params)
    m1, _ = pe(cfg, same, key)
    assert {k: v for k, v in m1.items() if k.startswith("probe/")} == {
        k: v for k, v in m0.items() if k.startswith("probe/")}
    # Another policy: the total gain is the plain difference of mean RM scores.
    other = jax.tree.map(lambda x: x * 1.5, policy.params)
    m2, rows2 = pe(cfg, other, key)
    assert m2["probe/length_gain_total"] == pytest.approx(
        rows2["rm_score"].mean() - rows0["rm_score"].mean(), abs=1e-9)
    words = lambda rs: np.array([P.mean_words([r]) for r in rs["response"]])  # noqa: E731
    want = P.length_stratified_gain(words(rows0), rows0["rm_score"], words(rows2),
                                    rows2["rm_score"])
    assert m2["probe/length_gain_within"] == pytest.approx(want["within"], nan_ok=True)
    # A fresh PolicyEval whose first call is another policy samples the reference itself.
    pe2 = evaluation.PolicyEval.from_config(_ev(probes=4), prompts, tok, reward=reward,
                                            reference=policy, world=world)
    m3, _ = pe2(cfg, other, key)
    assert m3["probe/length_gain_total"] == pytest.approx(m2["probe/length_gain_total"])
    # Off: no probe keys, and no sampling of the probe prompts.
    plain = evaluation.PolicyEval.from_config(_ev(), prompts, tok, reward=reward,
                                              reference=policy, world=world)
    assert not any(k.startswith("probe/") for k in plain(cfg, policy.params, key)[0])


def test_policy_eval_probe_errors(setup):
    world, tok, *_ = setup
    with pytest.raises(UserError, match="config.eval.probes: is 4, but the data source has no "
                                        "simulated world"):
        evaluation.PolicyEval.from_config(_ev(probes=4), ["a b"], tok, world=None)
    with pytest.raises(UserError, match="config.eval.probes"):
        evaluation.PolicyEval.from_config(_ev(probes=-1), ["a b"], tok, world=world)
    # Real data sources have no world; the simulated one gives its variant.
    assert sources.from_config({"kind": "jsonl", "train": "x"}).world() is None
    assert sources.from_config({"kind": "sim", "world": WORLD}).world() is world


def test_text_scorer_matches_the_rm_training_encoding(setup):
    world, tok, cfg, _, reward = setup
    prompts = world.prompts(0, 6, "eval")
    pairs = [world.candidates(p, 2, P._rand(world, 9))[0] for p in prompts]
    enc, _ = tokenize.encode_comparisons(tok, prompts, pairs, [[0, 1]] * 6, 32)
    from rlhf_jax import rewards

    want = rewards.score_batches(cfg, reward.params, enc["tokens"], enc["mask"],
                                 reward.reward_norm, 8)
    score = evaluation.text_scorer(reward, tok, 32, 8)
    got = score([p for p in prompts for _ in range(2)], [r for rs in pairs for r in rs])
    np.testing.assert_allclose(got, np.asarray(want).reshape(-1), rtol=1e-5, atol=1e-5)


def test_rm_stage_probes_only_where_the_world_has_features(setup):
    world, tok, cfg, _, reward = setup
    config = ml_collections.ConfigDict({"data": {"max_len": 32}, "eval": {"batch_size": 64}})
    assert rm.rm_probes(config, sources.from_config({"kind": "sim"}), reward, tok, None) == {}
    got = rm.rm_probes(config, sources.from_config({"kind": "sim", "world": WORLD}), reward, tok,
                       None)["probes"]
    for kind, (x, y) in {"typo": ("clean", "typo"), "refusal_harmful": ("refusal", "answer"),
                         "refusal_boundary": ("refusal", "answer"),
                         "group_positive": ("a", "b"), "group_negative": ("a", "b")}.items():
        px, py = got[f"probe/rm_{kind}_prefers_{x}"], got[f"probe/rm_{kind}_prefers_{y}"]
        assert 0 <= px <= 1 and 0 <= py <= 1 and px + py <= 1 + 1e-9
    # The margin is the RM's own score difference on the counterfactual pairs.
    cf = {c.kind: c for c in P.counterfactual_pairs(world, 64)}["typo"]
    score = evaluation.text_scorer(reward, tok, 32, 64)
    want = np.mean(score(cf.prompts_x, cf.responses_x) - score(cf.prompts_y, cf.responses_y))
    assert got["probe/rm_typo_margin"] == pytest.approx(want, rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------------- experiment pieces
def test_override_flags_reproduce_the_stage_config():
    from configs import failure_modes

    for tiny in ("", "tiny,"):
        c = failure_modes.get_config(f"{tiny}failure=typos")
        for m in FM.methods(failure_modes.get_config("failure=typos")):
            (file, arg), field, method = FM.stage_file(m), m.block, m.name
            flags = lib.override_flags(c[field], file, arg, init_from="/x/sft", seed=3)
            if method == "ppo":
                assert "--config.kl.adaptive=false" in flags
                assert "--config.kl.beta=0.05" in flags
            got = config_utils.parse_config_argv(["prog", f"--config={file}:{arg}", *flags])
            want = lib.child_config(c[field], init_from="/x/sft", seed=3).to_dict()
            got = got.to_dict()
            got.pop("workdir"), want.pop("workdir")
            assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True), method
            # Both methods are probed at the same points, with a fixed KL coefficient.
            assert c[field].eval.probes == c.ppo.eval.probes > 0
            assert c[field].kl.beta == c.ppo.kl.beta
            assert c[field].train.eval_every == c.ppo.train.eval_every
            assert c[field].data.source.world == FM.WORLD
    c = failure_modes.get_config("failure=typos")
    file, arg = FM.stage_file(registry.METHODS["ppo"])
    # Skipped fields stay as the stock config has them.
    skipped = lib.override_flags(c.ppo, file, arg, skip={"kl.beta"})
    assert not any(f.startswith("--config.kl.beta=") for f in skipped)
    with pytest.raises(ValueError, match="not fields"):
        bad = c.ppo.copy_and_resolve_references()
        with bad.unlocked():
            bad.nope = 1
        lib.override_flags(bad, file, arg)


def test_conditions_differ_from_fixed_in_their_bug_only():
    from configs import failure_modes

    c = failure_modes.get_config()
    conds = FM.conditions(c)
    assert set(conds) == {"fixed"} | {f"bug_{f}" for f in FM.FAILURES}
    fixed = conds["fixed"]
    assert fixed["data.source.refusals"] == "paired"
    for f in FM.FAILURES:
        diff = {k for k in fixed if conds[f"bug_{f}"][k] != fixed[k]}
        assert diff == {f"data.source.{k}" for k in c.bugs[f]}, f


def test_eval_points_read_each_evaluation_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    recs = [{"step": 0, "eval/kl": 0.0, "eval/probe/typo_rate": 0.03},
            {"step": 1, "loss": 1.0},
            {"step": 2, "eval/kl": 1.0, "eval/probe/typo_rate": 0.05},
            {"step": 2, "eval/kl": 1.5, "eval/probe/typo_rate": 0.06}]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert lib.eval_points(path) == [{"step": 0, "kl": 0.0, "probe/typo_rate": 0.03},
                                     {"step": 2, "kl": 1.5, "probe/typo_rate": 0.06}]


def _curve(key, values, extra=None):
    return [{"step": 10 * i, "kl": float(i), key: v, **(extra or {})}
            for i, v in enumerate(values)]


def test_verdicts_on_hand_made_curves():
    t = "probe/typo_rate"
    up = {("bug_typos", "ppo"): _curve(t, [0.03, 0.05, 0.08, 0.09]),
          ("fixed", "ppo"): _curve(t, [0.03, 0.03, 0.028, 0.03])}
    v = FM.verdict_typos(up, 2)
    assert v["reproduced"] and v["ppo"]["bug"]["end"] == pytest.approx(0.085)
    assert v["ppo"]["bug"]["delta"] == pytest.approx(0.055)
    assert not FM.verdict_typos({**up, ("bug_typos", "ppo"): _curve(t, [0.03, 0.03, 0.04])},
                                2)["reproduced"]
    assert not FM.verdict_typos({**up, ("fixed", "ppo"): _curve(t, [0.03, 0.06, 0.07])},
                                2)["reproduced"]

    def ref(bound_naive, bound_paired, harm_paired):
        n = len(bound_naive)
        mk = lambda b, h: [{"step": i, "kl": float(i), "probe/refusal_boundary": b[i],  # noqa
                            "probe/refusal_harmful": h[i]} for i in range(n)]
        return {("bug_refusal", "ppo"): mk(bound_naive, [0.7] * n),
                ("fixed", "ppo"): mk(bound_paired, harm_paired)}

    assert FM.verdict_refusal(ref([0.05, 0.3, 0.6], [0.05, 0.02, 0.0], [0.7, 0.8, 0.9]),
                              1)["reproduced"]
    assert not FM.verdict_refusal(ref([0.05, 0.3, 0.6], [0.05, 0.02, 0.0], [0.7, 0.5, 0.3]),
                                  1)["reproduced"]
    g = "probe/group_gold_gap"
    se = {"probe/group_gold_gap_se": 0.03}
    grp = {("bug_group", "ppo"): _curve(g, [0.0, 0.1, 0.2], se),
           ("fixed", "ppo"): _curve(g, [0.0, 0.03, -0.02], se)}
    assert FM.verdict_group(grp, 1)["reproduced"]
    grp[("fixed", "ppo")] = _curve(g, [0.0, 0.1, 0.15], se)
    assert not FM.verdict_group(grp, 1)["reproduced"]

    def lg(total, within, words):
        return [{"step": 0, "kl": 0.0, "probe/length_gain_total": 0.0,
                 "probe/length_gain_within": 0.0, "probe/length_words": 9.0},
                {"step": 1, "kl": 2.0, "probe/length_gain_total": total,
                 "probe/length_gain_within": within, "probe/length_words": words}]

    ln = {("bug_length", "ppo"): lg(1.0, 0.2, 13.0), ("fixed", "ppo"): lg(0.8, 0.7, 9.5)}
    v = FM.verdict_length(ln, 1)
    assert v["reproduced"] and v["ppo"]["bug_length"]["within_share"] == pytest.approx(0.2)
    ln[("bug_length", "ppo")] = lg(1.0, 0.8, 13.0)
    assert not FM.verdict_length(ln, 1)["reproduced"]
    # Two methods: reproduced only if it is for both.
    two = {**up, ("bug_typos", "rloo"): _curve(t, [0.03, 0.03]),
           ("fixed", "rloo"): _curve(t, [0.03, 0.03])}
    v = FM.verdict_typos(two, 1)
    assert v["ppo"]["reproduced"] and not v["rloo"]["reproduced"] and not v["reproduced"]


def test_failure_config_and_errors():
    from configs import failure_modes

    c = failure_modes.get_config("tiny,failure=group")
    assert FM.failure_names(c) == ["group"] and [m.name for m in FM.methods(c)] == ["ppo"]
    assert [m.name for m in FM.methods(failure_modes.get_config())] == ["ppo", "rloo"]
    assert FM.failure_names(failure_modes.get_config()) == list(FM.FAILURES)
    with c.unlocked():
        c.failure = "hallucination"
    with pytest.raises(UserError, match="config.failure"):
        FM.failure_names(c)
    with c.unlocked():
        c.methods = "ppo,nope"
    with pytest.raises(UserError, match="config.methods"):
        FM.methods(c)
    with c.unlocked():
        c.methods = "ppo,dpo"  # DPO trains against no RM: not a method of this experiment
    with pytest.raises(UserError, match="config.methods"):
        FM.methods(c)


def test_sweep_labels_name_trials(tmp_path):
    ov = [{"reward_from": "/a/very/long/path/rm-" + "x" * 60}, {"reward_from": "/b/rm"}]
    trials = define.expand("configs/ppo_sim.py", "smoke", ov, workdir=tmp_path,
                           labels=["ppo-fixed", "ppo-bug_typos"])
    assert [t.name.rsplit("-", 1)[0] for t in trials] == ["ppo-fixed", "ppo-bug_typos"]
    plain = define.expand("configs/ppo_sim.py", "smoke", ov, workdir=tmp_path)
    assert [t.key for t in trials] == [t.key for t in plain]  # labels name, keys identify
    with pytest.raises(UserError, match="1 labels for 2 trials"):
        define.expand("configs/ppo_sim.py", "smoke", ov, workdir=tmp_path, labels=["a"])


def _trial_dir(root, name, points, rm_probes=None):
    d = root / name
    d.mkdir()
    lines = []
    for p in points:  # an eval record, and a train record in between (not a point)
        lines.append({"step": p["step"], **{f"eval/{k}": v for k, v in p.items() if k != "step"}})
        lines.append({"step": p["step"] + 1, "loss": 1.0})
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    if rm_probes is not None:
        (d / "summary.json").write_text(json.dumps(
            {"held_out_accuracy": 0.7, "gold_ceiling_accuracy": 0.8, "probes": rm_probes}))
    return d


def test_report_writes_csv_png_verdict_per_failure(tmp_path, capsys):
    """report() on hand-made trial dirs (no training): the CSV holds every eval point of the two
    conditions it compares, the verdict JSON the verdict of those curves and the RMs' probes."""
    import csv

    keys = ["probe/typo_rate", "probe/refusal_boundary", "probe/refusal_harmful",
            "probe/group_gold_gap", "probe/group_gold_gap_se", "probe/length_gain_total",
            "probe/length_gain_within", "probe/length_words"]
    rng = np.random.default_rng(0)

    def pts():
        return [{"step": s, "kl": 0.5 * i, "gold": 0.1, "rm_score": 0.2,
                 **{k: float(rng.uniform(0.05, 1.0)) for k in keys}}
                for i, s in enumerate((0, 2, 4))]

    conds = ["fixed"] + [f"bug_{f}" for f in FM.FAILURES]
    curves = {(c, m): pts() for c in conds for m in ("ppo", "rloo")}
    dirs = {"rm": {c: _trial_dir(tmp_path, f"rm-{c}", [], {"probe/rm_typo_margin": i - 0.5})
                   for i, c in enumerate(conds)},
            "rl": {(c, m): _trial_dir(tmp_path, f"{m}-{c}", p) for (c, m), p in curves.items()}}
    for name, failure in FM.FAILURES.items():
        out = tmp_path / "out" / name
        v = FM.report(failure, dirs, out, 2)
        mine = {k: p for k, p in curves.items() if k[0] in ("fixed", f"bug_{name}")}
        want = json.loads(json.dumps(failure.verdict(mine, 2), default=float))
        assert {k: v[k] for k in want} == want
        assert v["plot"] == str(out / f"{name}.png")
        assert json.loads((out / "verdict.json").read_text())["reproduced"] == v["reproduced"]
        assert v["reproduced"] == (v["ppo"]["reproduced"] and v["rloo"]["reproduced"])
        assert v["rm"]["fixed"]["probe/rm_typo_margin"] == -0.5
        rows = list(csv.DictReader(open(out / "points.csv")))
        assert len(rows) == 4 * 3
        got = {(r["condition"], r["method"], int(r["step"])): r for r in rows}
        for (c, m), p in mine.items():
            for q in p:
                for k in failure.panels:
                    assert float(got[(c, m, q["step"])][k[0]]) == pytest.approx(q[k[0]])
        assert (out / f"{name}.png").stat().st_size > 5_000
        FM.print_verdict(v)
        printed = capsys.readouterr().out
        assert f"== {name}:" in printed and "[ppo]" in printed and "[rloo]" in printed
