"""Reward model math: where the reward is read, padding invariance, losses by hand,
normalisation, evaluation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import evaluation, models, rewards, rm, sampling

CFG = models.ModelConfig(vocab_size=24, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=64)


@pytest.fixture(scope="module")
def rm_params():
    return models.init_params(CFG, jax.random.key(1), heads=("score",))


def score(params, tokens, mask, norm=None):
    return np.asarray(rewards._score_jit(CFG, params, tokens, mask, norm))


# ---------------------------------------------------------------------------- reward_index


def test_reward_index_eos_truncated_and_padding():
    EOS, PAD = 2, 0
    tokens = np.array([
        [5, 6, 7, 8, EOS, PAD, PAD],  # ended: the EOS
        [5, 6, 7, 8, 9, 10, 11],  # truncated: the last token
        [PAD, PAD, 5, 6, 7, 8, EOS],  # left padded
        [PAD, 5, 6, 7, EOS, PAD, PAD],  # both sides (sampler: left-padded prompt + response)
    ])
    mask = (tokens != PAD).astype(np.int32)
    idx = np.asarray(rewards.reward_index(mask))
    assert idx.tolist() == [4, 6, 6, 4]
    assert (tokens[np.arange(4), idx] == [EOS, 11, EOS, EOS]).all()


def test_reward_index_pad_equals_eos():
    # pad == EOS (real checkpoints): only the mask tells the real EOS from the padding after it.
    EOS = PAD = 2
    tokens = np.array([[5, 6, EOS, PAD, PAD], [PAD, 5, 6, 7, EOS], [5, 6, 7, 8, 9]])
    mask = np.array([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert np.asarray(rewards.reward_index(mask)).tolist() == [2, 4, 4]
    # Token ids would have said "last EOS" (col 4) for row 0: the mask is what is used.
    assert np.asarray(rewards.reward_index(np.zeros((1, 5)))).tolist() == [0]


def test_reward_index_on_sampler_output_with_pad_equal_eos():
    """Sequences from the sampler with pad == EOS: the reward is read at the first EOS of an
    ended response, and at the last sampled token of a truncated one."""
    cfg = CFG.replace(vocab_size=12)
    params = models.init_params(cfg, jax.random.key(3), heads=("lm",))
    EOS = PAD = 3
    P, N, B = 4, 10, 64
    rng = np.random.default_rng(0)
    prompts = rng.integers(4, 12, (B, P))
    pmask = np.ones((B, P), np.int32)
    pmask[: B // 2, :2] = 0  # half the prompts left-padded
    prompts = np.where(pmask == 1, prompts, PAD)
    out = sampling.generate(cfg, params, prompts, pmask, jax.random.key(0), max_new_tokens=N,
                            eos_id=EOS, pad_id=PAD, temperature=3.0)
    idx = np.asarray(rewards.reward_index(out.sequence_mask))
    resp = np.asarray(out.tokens)
    ended = np.asarray(out.ended)
    assert 0 < ended.sum() < B, "need both ended and truncated rows"
    for b in range(B):
        if ended[b]:
            first_eos = int(np.argmax(resp[b] == EOS))
            assert idx[b] == P + first_eos
        else:
            assert idx[b] == P + N - 1


# ---------------------------------------------------------------------------- scoring


def _pad(rows, L, left):
    toks = np.zeros((len(rows), L), np.int32)
    mask = np.zeros((len(rows), L), np.int32)
    for i, r in enumerate(rows):
        if left:
            toks[i, L - len(r):], mask[i, L - len(r):] = r, 1
        else:
            toks[i, :len(r)], mask[i, :len(r)] = r, 1
    return toks, mask


def test_left_and_right_padding_give_same_rewards(rm_params):
    rng = np.random.default_rng(0)
    rows = [rng.integers(3, CFG.vocab_size, n).tolist() for n in (3, 9, 5, 12, 1, 7)]
    L = 14
    right = score(rm_params, *_pad(rows, L, left=False))
    left = score(rm_params, *_pad(rows, L, left=True))
    np.testing.assert_allclose(left, right, atol=1e-5)
    # ... and a row equals itself scored alone, unpadded (the head read at its last token).
    alone = score(rm_params, np.array([rows[1]]), np.ones((1, len(rows[1]))))
    np.testing.assert_allclose(right[1], alone[0], atol=1e-5)
    # [B, K, L] comparisons are scored per response.
    tk, mk = _pad(rows, L, left=False)
    bk = rewards.score_sequences(CFG, rm_params, tk.reshape(3, 2, L), mk.reshape(3, 2, L))
    np.testing.assert_allclose(np.asarray(bk).ravel(), np.asarray(right), atol=1e-6)


def test_padding_token_ids_do_not_matter_and_norm_is_applied(rm_params):
    toks, mask = _pad([[5, 6, 7, 2]], 8, left=False)
    other = np.where(mask == 1, toks, 2)  # pad == EOS id
    a = score(rm_params, toks, mask)
    b = score(rm_params, other, mask)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    # The score is read at the last real token, not at the end of the padded row.
    fwd = jax.jit(lambda p, t, m: models.forward(CFG, p, t, models.positions_from_mask(m), m,
                                                 want_logits=False)["scores"])
    full = fwd(rm_params, jnp.asarray(toks), jnp.asarray(mask))
    np.testing.assert_allclose(float(a[0]), float(full[0, 3]), atol=1e-6)
    assert abs(float(full[0, 7]) - float(full[0, 3])) > 1e-4
    n = score(rm_params, toks, mask, {"gain": 2.0, "bias": -0.5})
    np.testing.assert_allclose(float(n[0]), 2.0 * float(a[0]) - 0.5, rtol=1e-6)


# ---------------------------------------------------------------------------- losses


def _nls(x):  # -log sigmoid(x), by hand
    return math.log(1.0 + math.exp(-x))


SCORES = np.array([[1.0, 0.5, -1.0, 2.0],
                   [0.3, -0.2, 0.8, -1.5],
                   [0.7, 0.1, 0.0, 0.0]], np.float32)
RANKS = np.array([[1, 0, 2, -1],  # response 3 absent; 1 > 0 > 2
                  [0, 0, 1, 2],  # a tie at the top: 5 ordered pairs
                  [0, -1, -1, -1]], np.int32)  # one response: no preference, weight 0


def test_kwise_loss_equals_hand_computation():
    s = SCORES.astype(np.float64)
    row0 = (_nls(s[0, 1] - s[0, 0]) + _nls(s[0, 1] - s[0, 2]) + _nls(s[0, 0] - s[0, 2])) / 3
    row1 = (_nls(s[1, 0] - s[1, 2]) + _nls(s[1, 0] - s[1, 3]) + _nls(s[1, 1] - s[1, 2])
            + _nls(s[1, 1] - s[1, 3]) + _nls(s[1, 2] - s[1, 3])) / 5
    loss, m = rm.rm_loss(jnp.asarray(SCORES), jnp.asarray(RANKS), kind="kwise")
    np.testing.assert_allclose(float(loss), row0 + row1, rtol=1e-5)
    assert float(m["count"]) == 2 and float(m["pairs"]) == 8
    # pairs ranked right: row0 (1>0 wrong, 1>2, 0>2), row1 (0>2 wrong, 0>3, 1>2 wrong, 1>3, 2>3)
    assert float(m["pairs_correct"]) == 5


def test_pairwise_and_margin_and_best_of_k_by_hand():
    s = SCORES.astype(np.float64)
    pairs = [(0, 1, 0), (0, 1, 2), (0, 0, 2), (1, 0, 2), (1, 0, 3), (1, 1, 2), (1, 1, 3), (1, 2, 3)]
    loss, m = rm.rm_loss(jnp.asarray(SCORES), jnp.asarray(RANKS), kind="pairwise", margin=0.25)
    want = sum(_nls(s[b, w] - s[b, l] - 0.25) for b, w, l in pairs)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(m["count"]) == 8
    # A per-example margin adds to the constant one.
    loss_e, _ = rm.rm_loss(jnp.asarray(SCORES), jnp.asarray(RANKS), kind="pairwise", margin=0.25,
                           example_margin=jnp.array([1.0, 0.0, 0.0]))
    want_e = sum(_nls(s[b, w] - s[b, l] - 0.25 - (1.0 if b == 0 else 0.0)) for b, w, l in pairs)
    np.testing.assert_allclose(float(loss_e), want_e, rtol=1e-5)

    lse = lambda xs: math.log(sum(math.exp(x) for x in xs))  # noqa: E731
    loss, m = rm.rm_loss(jnp.asarray(SCORES), jnp.asarray(RANKS), kind="best_of_k")
    row0 = lse(s[0, :3]) - s[0, 1]
    row1 = lse(s[1]) - lse(s[1, :2])  # either of the tied best counts as the pick
    np.testing.assert_allclose(float(loss), row0 + row1, rtol=1e-5)
    assert float(m["count"]) == 2


def test_kwise_weights_each_prompt_once():
    """A K=4 ranking and a K=2 pair weigh the same in the K-wise loss (1/C(K,2) per pair)."""
    s = jnp.array([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    r4 = jnp.array([[0, 1, 1, 1], [0, 1, -1, -1]])
    loss, m = rm.rm_loss(s, r4, kind="kwise")
    np.testing.assert_allclose(float(loss), 2 * _nls(1.0), rtol=1e-5)
    loss_p, m_p = rm.rm_loss(s, r4, kind="pairwise")
    np.testing.assert_allclose(float(loss_p) / float(m_p["count"]), _nls(1.0), rtol=1e-5)
    assert float(m_p["count"]) == 4


def test_bad_loss_kind():
    with pytest.raises(ValueError, match="loss.kind"):
        rm.rm_loss(jnp.zeros((1, 2)), jnp.array([[0, 1]]), kind="hinge")


# ---------------------------------------------------------------------------- normalisation


def test_reference_normalisation_gives_mean0_std1_on_fresh_samples(rm_params):
    # A reward model whose raw rewards are far from mean 0 / std 1.
    rm_params = {**rm_params, "score_head": {"kernel": 4.0 * rm_params["score_head"]["kernel"],
                                             "bias": jnp.float32(3.0)}}
    policy = models.init_params(CFG, jax.random.key(7), heads=("lm",))
    EOS, PAD = 2, 0
    rng = np.random.default_rng(1)
    n, P = 4096, 5
    prompts = rng.integers(3, CFG.vocab_size, (n, P)).astype(np.int32)
    pmask = np.ones_like(prompts)
    pmask[::3, :2] = 0
    prompts[pmask == 0] = PAD
    kw = dict(max_new_tokens=8, eos_id=EOS, pad_id=PAD, temperature=1.0, batch_size=1024)
    raw, info = rewards.reference_rewards(CFG, policy, CFG, rm_params, prompts, pmask,
                                     jax.random.key(10), **kw)
    assert 0.0 < info["ended_frac"] < 1.0
    norm = rewards.fit_norm(raw, "reference")
    assert abs(raw.mean()) > 1.0 and abs(raw.std() - 1.0) > 0.5  # it had work to do
    fresh, _ = rewards.reference_rewards(CFG, policy, CFG, rm_params, prompts, pmask,
                                    jax.random.key(11), norm=norm, **kw)
    assert abs(fresh.mean()) < 0.05, fresh.mean()
    assert abs(fresh.std() - 1.0) < 0.05, fresh.std()


def test_demonstration_normalisation_and_errors():
    demo = np.array([0.5, 1.5, 2.5])
    n = rewards.fit_norm(demo, "demonstrations")
    assert n["gain"] == 1.0 and n["bias"] == pytest.approx(-1.5)
    assert rewards.fit_norm(demo, "none") == {"gain": 1.0, "bias": 0.0, "method": "none"}
    with pytest.raises(ValueError, match="same reward"):
        rewards.fit_norm(np.ones(5), "reference")
    with pytest.raises(ValueError, match="norm.method"):
        rewards.fit_norm(demo, "zscore")


# ---------------------------------------------------------------------------- evaluation


def test_preference_metrics_by_hand():
    ranks = np.array([[0, 1, -1], [1, 0, -1], [0, 1, 2]])
    rewards = np.array([[1.0, 0.0, 0.0], [2.0, 1.5, 0.0], [0.0, 0.3, 3.0]])
    gold = np.array([[0.5, 0.1, 0.0], [0.0, 0.9, 0.0], [0.4, 0.4, 0.0]])
    m = evaluation.preference_metrics(ranks, rewards, gold=gold, annotators=["a", "b", "a"],
                              buckets=["x", "x", "y"], annotator_names={"a": "0:alice"},
                              gap_edges=(0.0, 1.0))
    # Pairs (winner, loser): row0 (0,1) right; row1 (1,0) wrong; row2 (0,1) wrong, (0,2) wrong,
    # (1,2) wrong.
    assert m["pairs"] == 5 and m["accuracy"] == pytest.approx(1 / 5)
    # Gold: row0 right, row1 right, row2 (0,1) tie = 1/2, (0,2) right, (1,2) right.
    assert m["gold_ceiling_accuracy"] == pytest.approx(4.5 / 5)
    assert m["per_annotator"]["0:alice"] == {"pairs": 4, "accuracy": 0.25,
                                             "gold_ceiling_accuracy": pytest.approx(3.5 / 4)}
    assert m["per_annotator"]["b"]["accuracy"] == 0.0
    assert set(m["per_bucket"]) == {"x", "y"} and m["per_bucket"]["y"]["pairs"] == 3
    # |gaps|: 1.0, 0.5, 0.3, 3.0, 2.7 -> bin [0, 1): 0.5, 0.3 ; bin [1, inf): 1.0, 3.0, 2.7
    lo, hi = m["calibration"]
    assert (lo["pairs"], hi["pairs"]) == (2, 3)
    assert lo["accuracy"] == 0.0 and hi["accuracy"] == pytest.approx(1 / 3)
    assert lo["predicted"] == pytest.approx(np.mean(evaluation.sigmoid_np([0.5, 0.3])))


def test_judge_agreement_ignores_gold_ties():
    a = evaluation.judge_agreement(np.array([1.0, -1.0, 0.0, 2.0]), np.array([0.5, 0.5, -1.0, 0.0]))
    assert a == {"agreement": pytest.approx((1 + 0 + 0.5) / 3), "pairs": 3}
