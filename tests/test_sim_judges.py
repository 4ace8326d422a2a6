"""Gold judges and simulated annotators."""

import numpy as np
import pytest

from rlhf_jax.sim import annotators as A
from rlhf_jax.sim.judges import get_judge, register_judge, repetition_fraction
from rlhf_jax.sim.world import _Rand, get_world


def test_vader_is_the_real_analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    texts = ["was wonderful and kind.", "felt awful.", "opened the door."]
    got = get_judge("vader").score(["p"] * 3, texts)
    want = [SentimentIntensityAnalyzer().polarity_scores(t)["compound"] for t in texts]
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got.dtype == np.float32 and got[0] > 0.5 and got[1] < -0.3 and got[2] == 0
    with pytest.raises(ValueError, match="2 prompts but 3"):
        get_judge("vader").score(["a", "b"], texts)


def test_vader_trap_penalises_repetition_length_and_period():
    vader, trap = get_judge("vader"), get_judge("vader_trap", band=(6, 16))
    good = "was really wonderful and my sister smiled warmly."
    cases = {
        "clean": good,
        "repeat": "was really wonderful wonderful wonderful and my sister smiled warmly.",
        "short": "was wonderful.",
        "long": good[:-1] + " and " + "the kind teacher smiled warmly at the happy children " * 2 + ".",
        "no_period": good[:-1],
    }
    texts = list(cases.values())
    v, t = vader.score([""] * 5, texts), trap.score([""] * 5, texts)
    assert t[0] == pytest.approx(v[0])  # a well-formed in-band sentence pays nothing
    for i in range(1, 5):
        assert t[i] < v[i] - 0.1, list(cases)[i]
    assert repetition_fraction("the garden, the garden, the garden") > 0.5
    assert repetition_fraction(good) == 0


def test_registry():
    with pytest.raises(ValueError, match="unknown judge"):
        get_judge("nope")

    @register_judge("_test_length")
    class LengthJudge:
        name = "_test_length"

        def score(self, prompts, responses):
            return np.asarray([len(r) for r in responses], np.float32)

    assert get_judge("_test_length").score(["", ""], ["ab", "a"]).tolist() == [2, 1]
    with pytest.raises(ValueError, match="already registered"):
        register_judge("vader")(LengthJudge)


@pytest.fixture(scope="module")
def gold_sample():
    """Gold scores of candidate responses (the distribution comparisons are made on)."""
    w, r = get_world(0), _Rand(np.random.default_rng(1))
    texts = [c for p in w.prompts(0, 1500) for c in w.candidates(p, 4, r)[0]]
    return get_judge("vader").score(texts, texts).astype(np.float64), texts


def _measured_agreement(ann, gold, texts, n_pairs, seed):
    rng = np.random.default_rng(seed)
    i = rng.integers(0, len(gold), n_pairs)
    j = rng.integers(0, len(gold), n_pairs)
    keep = gold[i] != gold[j]
    i, j = i[keep], j[keep]
    labels = ann.prefer(gold[i], gold[j], [texts[x] for x in i], [texts[x] for x in j], rng)
    return np.mean(labels == (gold[i] > gold[j]))


@pytest.mark.parametrize("flip", [0.0, 0.25])
def test_calibrated_agreement_matches_target(gold_sample, flip):
    gold, texts = gold_sample
    tau = A.calibrate_tau(gold, 0.73, flip_prob=flip)
    ann = A.Annotator(0, tau, flip_prob=flip)
    assert _measured_agreement(ann, gold, texts, 20_000, 7) == pytest.approx(0.73, abs=0.02)
    noisier = A.Annotator(0, 3 * tau, flip_prob=flip)
    assert _measured_agreement(noisier, gold, texts, 20_000, 7) < 0.70
    with pytest.raises(ValueError, match="unreachable"):
        A.calibrate_tau(gold, 0.8, flip_prob=0.25)


def test_calibrate_on_within_prompt_pairs():
    rng = np.random.default_rng(0)
    gold = rng.normal(size=(5000, 4))
    tau = A.calibrate_tau(gold, 0.73)
    a, b = np.triu_indices(4, 1)
    gaps = np.abs(gold[:, a] - gold[:, b]).ravel()
    assert A.agreement(gaps, tau) == pytest.approx(0.73, abs=1e-3)
    assert A.agreement(gaps, 2 * tau) < 0.7


def test_pool_biases_show():
    rng = np.random.default_rng(0)
    n = 20_000
    gold = np.zeros(n)  # equal gold: only biases (and noise) decide
    long_a, short_b = ["one two three four five six seven eight nine ten."] * n, ["one two three."] * n
    pool = A.default_pool(tau=0.5)
    by_name = {a.name: a for a in pool.annotators}

    def frac_a(name, ra=long_a, rb=short_b):
        return by_name[name].prefer(gold, gold, ra, rb, rng).mean()

    assert frac_a("unbiased") == pytest.approx(0.5, abs=0.02)
    assert frac_a("verbose") > 0.7 and frac_a("concise") < 0.3
    same = ["we sat down."] * n
    assert frac_a("first_position", same, same) == pytest.approx(1 / (1 + np.exp(-0.5)), abs=0.02)
    assert frac_a("keyword", ["we sat in the park."] * n, ["we sat in the cafe."] * n) > 0.65


def test_kwise_rankings_are_plackett_luce_and_deterministic():
    n, k = 20_000, 4
    gold = np.tile(np.array([1.0, 0.0, -1.0, 0.5]), (n, 1))
    resp = [["a."] * k] * n
    ann = A.Annotator(0, tau=1.0)
    ranks = ann.rank(gold, resp, np.random.default_rng(0))
    assert (np.sort(ranks, axis=1) == np.arange(k)).all()
    # P(item j ranked first) = softmax(gold / tau)_j under Plackett-Luce.
    p_first = np.exp(gold[0]) / np.exp(gold[0]).sum()
    np.testing.assert_allclose((ranks == 0).mean(0), p_first, atol=0.015)
    again = ann.rank(gold, resp, np.random.default_rng(0))
    assert (again == ranks).all()
    flipped = A.Annotator(0, tau=1e-3, flip_prob=1.0).rank(gold[:10], resp[:10], np.random.default_rng(0))
    assert (flipped[:, 0] == 3).all() and (flipped[:, 2] == 0).all()  # reversed order
    ranks_p, ids = A.default_pool(1.0).rank(gold, resp, np.random.default_rng(1))
    assert set(np.unique(ids)) == set(range(6)) and ranks_p.shape == (n, k)
