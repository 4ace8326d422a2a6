"""The simulated world: determinism, the task's shape, sentiment mix, and its tokenizer."""

import numpy as np
import pytest

from rlhf_jax import paths
from rlhf_jax.sim import tokenizer as simtok
from rlhf_jax.sim.judges import get_judge, repetition_fraction
from rlhf_jax.sim.world import World, WorldConfig, _Rand, get_world, vader_valences


@pytest.fixture(scope="module")
def world():
    return get_world(0)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok") / "tokenizer"
    return simtok.world_tokenizer(0, directory=d)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RLHF_JAX_CACHE", str(tmp_path / "c"))
    assert paths.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("RLHF_JAX_CACHE")
    assert str(paths.cache_dir()).endswith(".cache/rlhf_jax")


def test_vocabulary_is_large_and_sentiment_bearing(world):
    vocab = world.vocabulary()
    assert len(vocab) >= 1000 and len(set(vocab)) == len(vocab)
    val = vader_valences()
    pos = [w for w in vocab if val.get(w, 0) >= 0.8]
    neg = [w for w in vocab if val.get(w, 0) <= -0.8]
    assert len(pos) >= 100 and len(neg) >= 100
    # Pools are split by VADER itself, not by hand.
    assert all(val[w] >= 0.8 for w in world.adj.pos) and all(val[w] <= -0.8 for w in world.adj.neg)


def test_deterministic_and_random_access(world):
    a = world.corpus(0, 300)
    assert a == World(WorldConfig(seed=0)).corpus(0, 300)
    assert world.corpus(250, 50) == a[250:300]  # spans a block boundary (256)
    assert get_world(1).corpus(0, 50) != a[:50]
    assert world.corpus(0, 50, split="eval") != a[:50]
    stream = world.iter_corpus()
    assert [next(stream) for _ in range(300)] == a
    words = {w for doc in world.corpus(0, 2000) for w in doc.replace(",", " ").replace(".", " ").split()}
    assert words <= set(world.vocabulary())


def test_demonstrations_follow_the_task(world, tok):
    tokenizer, _ = tok
    prompts, completions = world.demonstrations(0, 1000)
    assert prompts == world.demonstrations(0, 1000)[0]
    lo, hi = world.config.band
    for p, c in zip(prompts, completions):
        assert c.endswith(".") and c.count(".") == 1
        assert lo <= World.n_words(c) <= hi
        assert 2 <= World.n_words(p) <= 6
    p_len = [len(x) for x in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    c_len = [len(x) for x in tokenizer(completions, add_special_tokens=False)["input_ids"]]
    assert max(p_len) <= 8 and max(c_len) <= 20
    # The natural sentiment mix: both signs well represented, mean near neutral.
    g = get_judge("vader").score(prompts, completions)
    assert (g > 0.3).mean() > 0.15 and (g < -0.3).mean() > 0.1
    assert -0.2 < g.mean() < 0.3


def test_continuations_and_candidates(world):
    r = _Rand(np.random.default_rng(0))
    for p in world.prompts(0, 200):
        world.parse_opening(p)
        c = world.continuation(p, r)
        assert c.endswith(".") and 6 <= World.n_words(c) <= 16
    with pytest.raises(ValueError, match="last word"):
        world.parse_opening("hello xylophone")
    kinds_seen = {}
    for p in world.prompts(0, 300):
        outs, kinds = world.candidates(p, 4, r)
        assert len(outs) == 4
        for o, k in zip(outs, kinds):
            kinds_seen.setdefault(k, []).append(o)
    assert set(kinds_seen) == {"clean", "short", "long", "repeat", "no_period"}
    assert all(o.endswith(".") for o in kinds_seen["clean"])
    assert not any(o.endswith(".") for o in kinds_seen["no_period"])
    assert all(World.n_words(o) > 16 for o in kinds_seen["long"])
    assert all(World.n_words(o) < 6 for o in kinds_seen["short"])
    assert np.mean([repetition_fraction(o) > 0 for o in kinds_seen["repeat"]]) > 0.9
    assert np.mean([repetition_fraction(o) > 0 for o in kinds_seen["clean"]]) < 0.1


def test_tokenizer_round_trip_and_specials(world, tok, tmp_path, monkeypatch):
    tokenizer, d = tok
    assert (d / "tokenizer.json").exists()
    ids = {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id}
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id,
            tokenizer.unk_token_id) == (0, 1, 2, 3) and len(ids) == 4
    docs = world.corpus(10_000, 500)
    enc = tokenizer(docs, add_special_tokens=False)["input_ids"]
    assert all(tokenizer.decode(e) == simtok.normalize(t) for t, e in zip(docs, enc))
    assert not any(3 in e for e in enc)  # no <unk> on the world's own text
    # One token per word and per punctuation mark.
    assert all(len(e) == len(t.replace(",", " ,").replace(".", " .").split()) for t, e in zip(docs, enc))
    assert tokenizer.decode(tokenizer("The  Movie was GREAT,\n really.", add_special_tokens=False)
                            ["input_ids"]) == "the movie was great, really."
    # Loads through the same path real checkpoints use, from the cache dir by default.
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(str(d))
    assert again("my sister said that")["input_ids"] == tokenizer("my sister said that")["input_ids"]
    monkeypatch.setenv("RLHF_JAX_CACHE", str(tmp_path))
    _, cached = simtok.world_tokenizer(0)
    assert cached.parent == tmp_path and cached.name.startswith("tokenizer-")


def test_default_tokenizer_is_unchanged(tok):
    """Recorded before the failure-mode world features existed: the main job's tokenizer (and so
    its cached base models) must not move when a variant world is added."""
    import hashlib
    import json

    tokenizer, _ = tok
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    assert len(tokenizer) == 1029
    assert hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16] == "dfc68bf5611b1038"
