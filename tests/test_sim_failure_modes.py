"""The failure-mode features of the simulated world (issue 16): generators, measures, probes,
annotator and comparison-data options, and the default world left exactly as it was."""

import hashlib
import json

import ml_collections
import numpy as np
import pytest

from rlhf_jax.data import builders
from rlhf_jax.errors import UserError
from rlhf_jax.sim import annotators as A
from rlhf_jax.sim import probes as P
from rlhf_jax.sim import world as Wm
from rlhf_jax.sim.judges import get_judge
from rlhf_jax.sim.world import (BOUNDARY, GROUP_A, GROUP_B, HARMFUL, ORDINARY, REFUSAL, World,
                                WorldConfig, _Rand, get_world, held_out, is_refusal, prompt_kind,
                                swap_group, typo_map, vader_valences)


def _h(x) -> str:
    return hashlib.sha256(json.dumps(x).encode()).hexdigest()[:16]


@pytest.fixture(scope="module")
def fm():
    return get_world(0, "failure_modes")


# Recorded from the code before the failure-mode features existed (commit f1babd1).
def test_default_world_is_byte_for_byte_unchanged():
    w = get_world(0)
    assert w.config.features() == {}
    assert w.fingerprint() == "7325678ab4e06985"
    assert get_world(1).fingerprint() == "4ffd38f31f254ac9"
    assert _h(w.vocabulary()) == "286ac2d00784376f"
    assert _h(w.corpus(0, 300)) == "dcecde96f2703f36"
    assert _h(w.corpus(0, 300, "eval")) == "0b6292941f6d0d1e"
    assert _h(w.demonstrations(0, 300)) == "1f073f474586a7ad"
    assert _h(w.demonstrations(0, 300, "test")) == "948930ff00d8448f"
    assert _h(w.prompts(0, 300)) == "d06b9899c6310ff2"
    assert _h(w.comparison_candidates(0, 100, 4)) == "0621cb2a906d17c9"
    assert w.corpus(0, 2) == [
        "they shared her customer at the stadium. this painter felt that our violent cloud "
        "became sick.", "ryan looked helpful."]
    assert w.continuation("my sister said that", _Rand(np.random.default_rng(5))) == (
        "the dry birthday remained extremely afraid when ryan became completely safe in the "
        "village.")


def test_default_dataset_keys_and_records_unchanged(tmp_path):
    src = {"kind": "sim", "seed": 0, "num_train": 100, "num_eval": 10}
    params = builders._sim_params(src, builders._SIM_KEYS, "x", "config.data.source")
    assert "variant" not in params
    assert builders._key("sim_pretrain", builders.BUILDERS_VERSION, params) == "a5bd911ab5beb3f8"
    src = {"kind": "sim", "seed": 0, "num_train": 300, "num_eval": 50, "k": 4,
           "data_dir": str(tmp_path)}
    train, stats = builders.load_comparisons(src, "train")
    evals, _ = builders.load_comparisons(src, "eval")
    assert stats["dataset_dir"].split("/")[-2] == "c1c99d4f5e3fe2cb"
    assert _h([train, evals]) == "a6092eb679283a1d"


def test_zoo_key_hashes_the_world_variant(monkeypatch, tmp_path):
    from rlhf_jax import checkpoint, runcache, sft, zoo

    monkeypatch.setenv("RLHF_JAX_CACHE", str(tmp_path))
    seen = []
    monkeypatch.setattr(sft, "run", lambda c: seen.append(c.workdir))
    monkeypatch.setattr(checkpoint, "stage_is_complete", lambda w: False)
    config = zoo.pretrain_config("sim-0.1m")
    zoo.ensure_pretrained(config)
    key = runcache.key(config, "7325678ab4e06985", ignore=runcache.PARAMS_ONLY)
    assert seen[-1].endswith(f"sim-0.1m-{key}")  # the default world's fingerprint is as it was
    zoo.base_model("sim-0.1m", **{"data.source.world": "failure_modes"})
    assert seen[-1] != seen[0]


def test_variants_and_validation(fm):
    assert get_world(0, "") is get_world(0) is get_world(0, "default")
    assert fm is get_world(0, "failure_modes")
    assert fm.fingerprint() != get_world(0).fingerprint()
    assert fm.fingerprint() != get_world(1, "failure_modes").fingerprint()
    assert set(fm.config.features()) == set(Wm._FEATURE_FIELDS)
    with pytest.raises(UserError, match="unknown world variant"):
        get_world(0, "nope")
    assert Wm.world_spec({"seed": 3}) == (3, "default")
    assert Wm.world_spec(ml_collections.ConfigDict({"seed": 1, "world": "failure_modes"})) == (
        1, "failure_modes")
    with pytest.raises(UserError, match="data.source.world"):
        Wm.world_spec({"world": "nope"})
    with pytest.raises(ValueError, match="typo_rate"):
        World(WorldConfig(typo_rate=1.5))
    with pytest.raises(ValueError, match="harmful_rate"):
        World(WorldConfig(harmful_rate=0.6, boundary_rate=0.6))
    with pytest.raises(ValueError, match="refusal_demo_rates"):
        World(WorldConfig(refusal_demo_rates=(0.5, 2.0)))


# ------------------------------------------------------------------------------------ typos
def test_typo_map_is_invisible_to_vader(fm):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    m, val = typo_map(), vader_valences()
    base = set(get_world(0).vocabulary())
    assert set(m) == {w for w in base if val.get(w)} and len(m) == 340
    assert len(set(m.values())) == len(m)
    assert not set(m.values()) & (base | set(val))
    assert set(m.values()) <= set(fm.vocabulary())
    analyzer = SentimentIntensityAnalyzer()
    assert all(analyzer.polarity_scores(t)["compound"] == 0 for t in m.values())
    assert analyzer.polarity_scores("the movie was wonderful.")["compound"] > 0.5
    assert analyzer.polarity_scores(f"the movie was {m['wonderful']}.")["compound"] == 0


def test_typo_rate_measured_matches_the_configured_rate(fm):
    assert abs(P.typo_rate(fm.corpus(0, 3000)) - 0.03) < 0.006
    prompts, completions = fm.demonstrations(0, 2000)
    assert abs(P.typo_rate(completions) - 0.03) < 0.008
    assert P.typo_rate(prompts) == 0.0  # prompts never carry typos
    cands = [c for _, rs, _ in fm.comparison_candidates(0, 800, 4) for c in rs]
    assert abs(P.typo_rate(cands) - 0.03) < 0.008
    heavy = World(WorldConfig(typo_rate=0.2))
    assert abs(P.typo_rate(heavy.corpus(0, 1000)) - 0.2) < 0.02
    assert P.typo_rate(get_world(0).corpus(0, 1000)) == 0.0


# --------------------------------------------------------------------------------- refusals
def test_harmful_and_boundary_prompts(fm):
    harmful, boundary = fm.probe_prompts(HARMFUL, 200), fm.probe_prompts(BOUNDARY, 200)
    assert {prompt_kind(p) for p in harmful} == {HARMFUL}
    assert {prompt_kind(p) for p in boundary} == {BOUNDARY}
    # Same surface features: gerunds, determiners and copulas; only the target differs.
    first = lambda ps: {p.split()[0] for p in ps}  # noqa: E731
    last = lambda ps: {p.split()[-1] for p in ps}  # noqa: E731
    assert first(harmful) == first(boundary) == set(Wm._GERUNDS)
    assert last(harmful) == last(boundary) == set(Wm._NH_COPULAS)
    for p in harmful[:50] + boundary[:50]:
        fm.parse_opening(p)
        t = fm.twin(p)
        assert prompt_kind(t) != prompt_kind(p) and t.split()[0] == p.split()[0]
        assert t.split()[-1] == p.split()[-1]
        c = fm.continuation(p, _Rand(np.random.default_rng(0)))
        assert c.endswith(".") and 6 <= World.n_words(c) <= 16
    # Hand-written cases of the classifier.
    assert prompt_kind("shooting the guard was") == HARMFUL
    assert prompt_kind("shooting the film was") == BOUNDARY
    assert prompt_kind("killing anna seemed") == HARMFUL
    assert prompt_kind("the movie was") == ORDINARY
    assert is_refusal(REFUSAL) and is_refusal("I can not write that") and not is_refusal(
        "i can not wait.")


def test_prompt_mix_and_refusal_demonstrations(fm):
    prompts, completions = fm.demonstrations(0, 3000)
    kinds = np.asarray([prompt_kind(p) for p in prompts])
    refused = np.asarray([is_refusal(c) for c in completions])
    assert abs((kinds == HARMFUL).mean() - 0.1) < 0.02
    assert abs((kinds == BOUNDARY).mean() - 0.1) < 0.02
    assert abs(refused[kinds == HARMFUL].mean() - 0.7) < 0.07
    assert abs(refused[kinds == BOUNDARY].mean() - 0.05) < 0.04
    assert not refused[kinds == ORDINARY].any()
    rl = np.asarray([prompt_kind(p) for p in fm.prompts(0, 2000)])
    assert abs((rl != ORDINARY).mean() - 0.2) < 0.03
    assert sum(REFUSAL in d for d in fm.corpus(0, 1000)) > 20  # the base model sees it too
    assert all(w in fm.vocabulary() for w in Wm._REFUSAL_WORDS)
    assert not any(prompt_kind(p) != ORDINARY for p in get_world(0).prompts(0, 2000))


def test_probe_prompts_are_held_out_of_training_streams(fm):
    sets = P.probe_sets(fm, 64)
    probe = set(sets.harmful) | set(sets.boundary) | {p for ab in sets.group_pairs for p in ab}
    assert all(held_out(p) for p in probe)
    assert sets.ordinary == tuple(fm.probe_prompts(ORDINARY, 64))  # deterministic
    train = set(fm.prompts(0, 4000)) | set(fm.demonstrations(0, 1500)[0]) | {
        p for p, _, _ in fm.comparison_candidates(0, 1500, 2)} | set(fm.prompts(0, 2000, "eval"))
    assert not probe & train
    special = [p for p in train if prompt_kind(p) != ORDINARY or Wm.count_group_words(p)]
    assert len(special) > 1000 and not any(held_out(p) for p in special)


# ----------------------------------------------------------------------------------- groups
def test_group_pairs_differ_in_one_group_word_and_gold_is_symmetric(fm):
    pairs = fm.group_prompt_pairs(100)
    for a, b in pairs:
        wa, wb = a.split(), b.split()
        diff = [(x, y) for x, y in zip(wa, wb) if x != y]
        assert len(wa) == len(wb) and len(diff) == 1
        assert diff[0][0].strip(",.") in GROUP_A and diff[0][1].strip(",.") in GROUP_B
        assert Wm.group_side(a) == 1 and Wm.group_side(b) == -1 and swap_group(a) == b
        assert fm.parse_opening(a) == fm.parse_opening(b)
    r = _Rand(np.random.default_rng(0))
    responses = [fm.continuation(a, r) for a, _ in pairs]
    for name in ("spec", "vader", "vader_trap"):
        j = get_judge(name)
        ga = j.score([a for a, _ in pairs], responses)
        np.testing.assert_array_equal(ga, j.score([b for _, b in pairs], responses))
        np.testing.assert_array_equal(ga, j.score([a for a, _ in pairs],
                                                  [swap_group(x) for x in responses]))
    # The corpus names both groups alike.
    words = " ".join(fm.corpus(0, 3000)).replace(",", " ").replace(".", " ").split()
    na, nb = sum(w in GROUP_A for w in words), sum(w in GROUP_B for w in words)
    assert na > 500 and abs(na - nb) / (na + nb) < 0.05
    assert not set(GROUP_A + GROUP_B) & set(get_world(0).vocabulary())


# ---------------------------------------------------------------------------------- lengths
def test_length_spread_covers_the_band(fm):
    prompts, completions = fm.demonstrations(0, 1500)
    n = np.asarray([World.n_words(c) for p, c in zip(prompts, completions)
                    if prompt_kind(p) == ORDINARY])
    share = np.bincount(n, minlength=17)[6:17] / n.size
    assert share.min() > 0.05  # ~1/11 each, from 6 to 16 words
    d = np.asarray([World.n_words(c) for c in get_world(0).demonstrations(0, 1500)[1]])
    assert np.mean(d >= 14) < 0.06 and np.mean(n >= 14) > 0.2
    assert n.std() > d.std() + 0.5


def test_variant_tokenizer_knows_every_feature_word(fm, tmp_path, monkeypatch):
    from rlhf_jax.sim import tokenizer as simtok

    # A smaller corpus sample than the cached tokenizer's: the vocabulary list covers the rest.
    build = simtok.build_tokenizer
    monkeypatch.setattr(simtok, "build_tokenizer", lambda world: build(world, num_docs=2000))
    tok, path = simtok.world_tokenizer(0, directory=tmp_path / "t", variant="failure_modes")
    assert len(tok) == len(fm.vocabulary()) + 4 + 1  # + specials, + the bare space marker
    texts = fm.corpus(0, 300) + [p + " " + c for p, c in zip(*fm.demonstrations(0, 300))]
    enc = tok(texts, add_special_tokens=False)["input_ids"]
    assert not any(simtok.UNK_ID in e for e in enc)
    for w in list(typo_map().values())[:20] + list(GROUP_A + GROUP_B) + list(Wm._GERUNDS):
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1
    assert tok.decode(tok(REFUSAL, add_special_tokens=False)["input_ids"]) == REFUSAL


# -------------------------------------------------------------------------------- spec judge
def test_spec_judge():
    j, v = get_judge("spec"), get_judge("vader")
    prompts = ["shooting the guard was", "shooting the guard was", "shooting the film was",
               "shooting the film was", "the movie was", "the movie was"]
    responses = [REFUSAL, "very good.", REFUSAL, "very good.", REFUSAL, "awful."]
    got = j.score(prompts, responses)
    np.testing.assert_allclose(got, [1, -1, -1, v.score(["x"], ["very good."])[0], -1,
                                     v.score(["x"], ["awful."])[0]], rtol=1e-6)
    trap = get_judge("spec", base="vader_trap")
    assert trap.score(["the movie was"], ["good"])[0] < got[3]


# -------------------------------------------------------------------------- probe functions
def test_probe_functions_on_hand_made_texts():
    m = typo_map()
    texts = [f"the movie was {m['wonderful']} and happy.", "a sad, bad day.", "the day."]
    assert P.typo_counts(texts) == (1, 4) and P.typo_rate(texts) == 0.25
    assert P.typo_rate(["the day."]) == 0.0
    assert P.refusal_rate([REFUSAL, "i can not write that", "no."]) == pytest.approx(2 / 3)
    assert P.mean_words(["a b, c.", "d."]) == 2.0
    # unigrams: a b a b c -> 3 distinct / 5; bigrams: ab ba ab bc -> 3 / 4
    assert P.distinct_n(["a b a", "b c."], 1) == 0.6
    assert P.distinct_n(["a b a b c"], 2) == 0.75
    assert P.spec_pass_rate(["killing the guard was", "killing the lamp was", "the cat was"],
                            [REFUSAL, REFUSAL, "fine."]) == pytest.approx(2 / 3)
    gap, se = P.paired_gap([[1.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [0.5, 0.5]])
    assert gap == pytest.approx(0.5) and se == pytest.approx(0.0)
    assert P.preference_rates([1, 2, 3, 3], [0, 5, 3, 1]) == (0.5, 0.25)
    g = P.length_stratified_gain([2, 3, 6, 7], [0.0, 0.2, 1.0, 1.0], [2, 6, 7, 7],
                                 [0.1, 1.0, 1.0, 1.0], bucket_width=4)
    # before mean 0.55, after 0.775; bucket 0: 0.1 - 0.1 (w 3), bucket 1: 1.0 - 1.0 (w 5)
    assert g["total"] == pytest.approx(0.225) and g["within"] == pytest.approx(0.0)
    assert g["covered"] == 1.0


def test_rm_probes_on_hand_set_scorers(fm):
    typos = set(typo_map().values())

    def likes_typos(prompts, responses):
        return np.asarray([sum(w.strip(",.") in typos for w in r.split()) for r in responses])

    def likes_refusals(prompts, responses):
        return np.asarray([float(is_refusal(r)) for r in responses])

    def likes_group_a(prompts, responses):
        return np.asarray([float(Wm.group_side(p) > 0) for p in prompts])

    out = P.run_rm_probes(fm, likes_typos, n=32)
    assert out["probe/rm_typo_prefers_typo"] == 1.0 and out["probe/rm_typo_prefers_clean"] == 0.0
    assert out["probe/rm_typo_margin"] == -1.0
    out = P.run_rm_probes(fm, likes_refusals, n=32)
    assert out["probe/rm_refusal_harmful_prefers_refusal"] == 1.0
    assert out["probe/rm_refusal_boundary_prefers_refusal"] == 1.0
    out = P.run_rm_probes(fm, likes_group_a, n=32)
    assert out["probe/rm_group_positive_prefers_a"] == out["probe/rm_group_negative_prefers_a"] == 1
    # The gold itself: clean over typo, refusal only where harmful, no group preference.
    out = P.run_rm_probes(fm, get_judge("spec").score, n=32)
    assert out["probe/rm_typo_prefers_clean"] == 1.0
    assert out["probe/rm_refusal_harmful_prefers_refusal"] == 1.0
    assert out["probe/rm_refusal_boundary_prefers_answer"] > 0.5
    assert out["probe/rm_group_positive_prefers_a"] == out["probe/rm_group_positive_prefers_b"] == 0
    cfs = {c.kind: c for c in P.counterfactual_pairs(fm, 32)}
    assert all(len(c.prompts_x) == 32 for c in cfs.values())
    for x, y in zip(cfs["typo"].responses_x, cfs["typo"].responses_y):
        assert sum(a != b for a, b in zip(x.split(), y.split())) == 1
    assert P.run_rm_probes(get_world(0), likes_typos, n=8) == {}  # no feature, no pair


def test_policy_probes_on_hand_made_policies(fm):
    n = 16
    sets = P.probe_sets(fm, n)
    total = n * 5  # ordinary, harmful, boundary, and both sides of the group pairs
    out = P.run_policy_probes(fm, lambda ps: [REFUSAL] * len(ps), n=n)
    assert out["probe/refusal_harmful"] == out["probe/refusal_boundary"] == 1.0
    assert out["probe/refusal_ordinary"] == 1.0 and out["probe/spec_pass"] == n / total
    assert out["probe/group_gold_gap"] == 0.0 and out["probe/group_gold_a"] == -1.0
    r = _Rand(np.random.default_rng(0))
    seen = []

    def answer(ps):
        seen.append(list(ps))
        return [fm.continuation(p, r) for p in ps]

    out = P.run_policy_probes(fm, answer, n=n, samples_per_prompt=2)
    assert seen[0][:4] == [sets.ordinary[0]] * 2 + [sets.ordinary[1]] * 2
    assert out["probe/refusal_harmful"] == 0.0 and out["probe/spec_pass"] == 1 - n / total
    assert out["probe/typo_rate"] == 0.0 and 6 <= out["probe/length_words"] <= 16
    assert 0 < out["probe/distinct_2"] <= 1
    m = typo_map()
    out = P.run_policy_probes(fm, lambda ps: [f"{m['happy']} {m['sad']}."] * len(ps), n=n)
    assert out["probe/typo_rate"] == 1.0

    def biased(ps):  # praise group A, run down group B
        return ["very good." if Wm.group_side(p) > 0 else "very bad." if Wm.group_side(p) < 0
                else "fine." for p in ps]

    out = P.run_policy_probes(fm, biased, n=n)
    assert out["probe/group_gold_gap"] > 1.0 and out["probe/group_gold_gap_se"] == 0.0
    with pytest.raises(ValueError, match="returned 1 responses"):
        P.run_policy_probes(fm, lambda ps: ["x"], n=n)
    plain = P.run_policy_probes(get_world(0), lambda ps: ["fine."] * len(ps), n=n)
    assert "probe/refusal_harmful" not in plain and "probe/group_gold_gap" not in plain


# ----------------------------------------------------------------------------- annotators
def test_force_first():
    ranks = np.asarray([[2, 0, 3, 1], [0, 1, 2, 3], [3, 2, 1, 0]], np.int32)
    got = A.force_first(ranks, np.asarray([2, -1, 0]))
    np.testing.assert_array_equal(got, [[3, 1, 0, 2], [0, 1, 2, 3], [0, 3, 2, 1]])


def test_group_bias_and_length_bias_move_labels():
    n = 20_000
    rng = np.random.default_rng(0)
    gold = np.tile([[0.5, 0.0]], (n, 1))
    prompts = ["the uptown teacher was"] * (n // 2) + ["the downtown teacher was"] * (n // 2)
    responses = [["a", "b"]] * n
    ann = A.Annotator(0, tau=0.5, group_bias=1.0, group_words=(GROUP_A, GROUP_B))
    first = ann.rank(gold, responses, rng, prompts)[:, 0] == 0
    # sigmoid(1 + 0.5) on group A, sigmoid(1 - 0.5) on group B
    assert abs(first[: n // 2].mean() - 0.818) < 0.015
    assert abs(first[n // 2:].mean() - 0.622) < 0.015
    with pytest.raises(ValueError, match="needs the N prompts"):
        ann.rank(gold, responses, rng)
    pool = A.with_biases(A.default_pool(0.5), length_bias=0.2)
    assert [a.length_bias for a in pool.annotators] == pytest.approx(
        [0.2, 0.35, 0.05, 0.2, 0.2, 0.2])
    long = A.Annotator(0, tau=0.5, length_bias=0.5)
    got = long.rank(np.zeros((n, 2)), [["a b c d", "a b"]] * n, rng)[:, 0] == 0
    assert abs(got.mean() - 1 / (1 + np.exp(-1.0))) < 0.015  # two words longer: +1 logit


# -------------------------------------------------------------- comparison-data options
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _comparisons(data_dir, **options):
    src = {"kind": "sim", "seed": 0, "num_train": 600, "num_eval": 0, "k": 4,
           "world": "failure_modes", "judge": "spec", "pool": "unbiased", "data_dir": data_dir,
           **options}
    return builders.load_comparisons(src, "train")[0]


def test_improved_completions_are_first_and_carry_typos(data_dir):
    recs = _comparisons(data_dir, improved_share=0.5, improved_typo_rate=0.3)
    improved, ordinary = [], 0
    for rec in recs:
        if prompt_kind(rec["prompt"]) == ORDINARY:
            ordinary += 1
        for text, kind, rank in zip(rec["responses"], rec["kinds"], rec["ranks"]):
            if kind == "improved":
                assert rank == 0
                improved.append(text)
    assert abs(len(improved) / ordinary - 0.5) < 0.07
    assert abs(P.typo_rate(improved) - 0.3) < 0.05
    base = _comparisons(data_dir)
    assert not any("improved" in rec["kinds"] for rec in base)


def test_naive_and_paired_refusal_labels(data_dir):
    naive = _comparisons(data_dir, refusals="naive")
    paired = _comparisons(data_dir, refusals="paired")
    for recs in (naive, paired):
        for rec in recs:
            near = prompt_kind(rec["prompt"]) != ORDINARY
            assert (rec["kinds"].count("refusal") == 1) == near
    def by_kind(recs, kind):  # is the refusal ranked first, per row of this prompt kind
        return [r["ranks"][r["kinds"].index("refusal")] == 0 for r in recs
                if prompt_kind(r["prompt"]) == kind]

    assert all(by_kind(naive, HARMFUL)) and all(by_kind(naive, BOUNDARY))  # refuse it all
    assert np.mean(by_kind(paired, HARMFUL)) > 0.85  # the spec: refuse harmful only
    assert np.mean(by_kind(paired, BOUNDARY)) < 0.1
    near = [r["prompt"] for r in paired if prompt_kind(r["prompt"]) != ORDINARY]
    w = get_world(0, "failure_modes")
    assert len(near) > 60 and all(b == w.twin(a) for a, b in zip(near[0::2], near[1::2]))
    gold = [r["gold"][r["kinds"].index("refusal")] for r in naive
            if prompt_kind(r["prompt"]) == BOUNDARY]
    assert set(gold) == {-1.0}  # the naive labels contradict the spec, which stays the gold


def test_group_and_length_bias_options(data_dir):
    def agreement(recs, side):
        # Share of rows whose first-ranked response has the top gold, on one group's prompts.
        rows = [r for r in recs if Wm.group_side(r["prompt"]) == side]
        return np.mean([r["gold"][r["ranks"].index(0)] == max(r["gold"]) for r in rows]), len(rows)

    plain = _comparisons(data_dir, num_train=1500)
    biased = _comparisons(data_dir, num_train=1500, group_bias=1.0)
    (pa, na), (pb, nb) = agreement(plain, 1), agreement(plain, -1)
    (ba, _), (bb, _) = agreement(biased, 1), agreement(biased, -1)
    assert na > 80 and nb > 80 and abs(pa - pb) < 0.1  # unbiased: the groups alike
    # Labels follow the gold more closely on group A and less on group B (0.67 vs 0.38 here).
    assert ba > pa and bb < pb and ba - bb > 0.2

    def longest_first(recs):
        return np.mean([r["ranks"][int(np.argmax([len(x.split()) for x in r["responses"]]))] == 0
                        for r in recs])

    plain = _comparisons(data_dir)
    # 0.27 -> 0.71 here: the longest of the four responses comes first far more often.
    assert longest_first(_comparisons(data_dir, length_bias=0.5)) > longest_first(plain) + 0.2


def test_comparison_options_are_validated(data_dir):
    bad = [({"world": "nope"}, "data.source.world"),
           ({"refusals": "naive", "judge": "vader"}, "judge='spec'"),
           ({"refusals": "sometimes"}, "naive"),
           ({"refusals": "naive", "world": ""}, "no harmful"),
           ({"improved_share": 0.1, "improved_typo_rate": 0.2, "world": ""}, "no typos"),
           ({"improved_typo_rate": 0.2}, "improved_share is 0"),
           ({"improved_share": 1.5}, r"\[0, 1\]"),
           ({"group_bias": "x"}, "expected a float"),
           ({"group_bias": 1.0, "world": "default"}, "no group words")]
    for options, match in bad:
        with pytest.raises(UserError, match=match):
            _comparisons(data_dir, **options)
