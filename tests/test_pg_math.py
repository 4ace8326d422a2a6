"""Critic-free policy-gradient math against plain references: advantage estimators (Python loop,
numpy), 1 vs 8 devices with groups split across devices, loss aggregation on ragged lengths,
clip-higher, and which KL each estimator-as-loss differentiates (exact sums over a categorical)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import pg, sharding
from rlhf_jax.errors import UserError
from rlhf_jax.ops import kl_estimators


def _mask(lengths, width):
    return (np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)


# ------------------------------------------------------------------------------ advantages


@pytest.mark.parametrize("K", [2, 3, 4])
def test_rloo_baseline_matches_python_loop(K):
    rng = np.random.default_rng(K)
    r = rng.normal(size=5 * K).astype(np.float32)
    ref = np.zeros_like(r)
    for p in range(5):
        for i in range(K):
            others = [r[p * K + j] for j in range(K) if j != i]
            ref[p * K + i] = r[p * K + i] - sum(others) / len(others)
    got = jax.jit(pg.rloo_advantages, static_argnums=1)(jnp.asarray(r), K)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_grpo_group_statistics_match_numpy(scale_by_std):
    rng = np.random.default_rng(1)
    P, K, eps = 6, 4, 1e-3
    r = rng.normal(size=P * K).astype(np.float32)
    r[8:12] = 0.5  # one group with equal rewards: advantage 0, counted as a zero-advantage group
    g = r.reshape(P, K).astype(np.float64)
    ref = g - g.mean(1, keepdims=True)
    if scale_by_std:
        ref = ref / (g.std(1, ddof=1, keepdims=True) + eps)
    got = pg.grpo_advantages(jnp.asarray(r), K, eps=eps, scale_by_std=scale_by_std)
    np.testing.assert_allclose(np.asarray(got), ref.reshape(-1), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(got)[8:12] == 0)
    stats = pg.group_stats(jnp.asarray(r), K)
    np.testing.assert_allclose(float(stats["group_reward_std"]), g.std(1, ddof=1).mean(),
                               rtol=1e-5)
    assert float(stats["zero_adv_group_frac"]) == pytest.approx(1 / 6)
    # The registry's "grpo" scales by the std, "dr_grpo" does not.
    name = "grpo" if scale_by_std else "dr_grpo"
    opts = pg.PGOptions(estimator=name, group_size=K, std_eps=eps)
    adv, _ = pg.compute_advantages(opts, jnp.asarray(r))
    np.testing.assert_allclose(np.asarray(adv), ref.reshape(-1), rtol=1e-5, atol=1e-5)


def test_reinforce_batch_mean_baseline():
    r = np.array([1.0, 2.0, 4.0, 9.0], np.float32)
    got = pg.reinforce_advantages(jnp.asarray(r), 1)
    np.testing.assert_allclose(np.asarray(got), r - 4.0)


def test_advantages_equal_on_1_and_8_devices_with_groups_split():
    """B = 16, K = 4 on an 8-device mesh: 2 rows per device, so every group spans two devices."""
    rng = np.random.default_rng(2)
    r = rng.normal(size=16).astype(np.float32)
    r[4:8] = 1.0

    def all_estimates(x):
        out = {name: fn(x, 4, eps=1e-6) for name, fn in pg.ADVANTAGE_ESTIMATORS.items()}
        return out, pg.group_stats(x, 4)

    single = jax.jit(all_estimates)(jnp.asarray(r))
    mesh = sharding.make_mesh({"data": 8})
    rs = jax.device_put(r, sharding.batch_sharding(mesh))
    assert len(rs.addressable_shards) == 8 and rs.addressable_shards[0].data.shape == (2,)
    split = jax.jit(all_estimates)(rs)
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(split)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    # A per-device baseline (each device's 2 rows as a "group") would differ: the test can fail.
    per_device = np.concatenate([np.asarray(pg.dr_grpo_advantages(jnp.asarray(r[i:i + 2]), 2))
                                 for i in range(0, 16, 2)])
    assert np.abs(per_device - np.asarray(single[0]["dr_grpo"])).max() > 0.1


def test_kl_in_reward_subtracts_beta_sum_k1():
    logp = np.array([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]], np.float32)
    ref = np.array([[-1.5, -1.0, -3.0], [-1.0, -0.25, 0.0]], np.float32)
    mask = _mask([3, 2], 3)
    scores = np.array([1.0, -1.0], np.float32)
    seq_kl = np.array([0.5 - 1.0 + 0.0, 0.5 - 0.25])
    opts = pg.PGOptions(kl_mode="reward", beta=0.1)
    rew, kl = pg.kl_penalized_rewards(opts, *map(jnp.asarray, (scores, logp, ref, mask)))
    np.testing.assert_allclose(np.asarray(kl), seq_kl, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(rew), scores - 0.1 * seq_kl, rtol=1e-6)
    rew, _ = pg.kl_penalized_rewards(pg.PGOptions(kl_mode="loss", beta=0.1),
                                     *map(jnp.asarray, (scores, logp, ref, mask)))
    np.testing.assert_allclose(np.asarray(rew), scores)


# ------------------------------------------------------------------------------ aggregation


def test_aggregation_modes_hand_values_on_ragged_lengths():
    # Row 0 has 1 real token, row 1 has 3; 99 sits under the mask and must not leak.
    x = np.array([[2.0, 99, 99, 99], [1.0, 4.0, 7.0, 99]], np.float32)
    m = _mask([1, 3], 4)
    agg = lambda mode, c=None: float(jax.jit(pg.aggregate, static_argnums=(2, 3))(
        jnp.asarray(x), jnp.asarray(m), mode, c))
    assert agg("token_mean") == pytest.approx((2 + 1 + 4 + 7) / 4)  # 3.5
    assert agg("seq_mean_token_mean") == pytest.approx((2 + (1 + 4 + 7) / 3) / 2)  # 3.0
    assert agg("constant") == pytest.approx(14 / (2 * 4))  # Dr. GRPO: B * L_max
    assert agg("constant", 7.0) == pytest.approx(2.0)  # a configured constant
    # An empty row does not count as a sequence in the sequence mean.
    m0 = _mask([1, 3, 0], 4)
    x0 = np.concatenate([x, np.full((1, 4), 50.0, np.float32)])
    assert float(pg.aggregate(jnp.asarray(x0), jnp.asarray(m0), "seq_mean_token_mean")) == \
        pytest.approx(3.0)


def test_dr_grpo_constant_normaliser_in_the_loss():
    """At ratio 1 the Dr. GRPO loss is -sum_b A_b n_b / (B * L_max), A_b = r_b - group mean."""
    r = np.array([1.0, 0.0, 3.0, 0.0], np.float32)  # two groups of K = 2
    lengths = np.array([2, 5, 1, 3])
    m = _mask(lengths, 6)
    opts = pg.PGOptions(estimator="dr_grpo", group_size=2, aggregation="constant", beta=0.0)
    adv, _ = jax.jit(pg.compute_advantages, static_argnums=0)(opts, jnp.asarray(r))
    np.testing.assert_allclose(np.asarray(adv), [0.5, -0.5, 1.5, -1.5])
    logp = jnp.full((4, 6), -1.3)
    loss_fn = jax.jit(pg.pg_loss, static_argnums=0)
    loss, _ = loss_fn(opts, logp, logp, adv, jnp.asarray(m))
    expected = -(0.5 * 2 - 0.5 * 5 + 1.5 * 1 - 1.5 * 3) / (4 * 6)
    assert float(loss) == pytest.approx(expected)
    opts7 = pg.PGOptions(estimator="dr_grpo", group_size=2, aggregation="constant",
                         loss_normalizer=7.0, beta=0.0)
    loss7, _ = loss_fn(opts7, logp, logp, adv, jnp.asarray(m))
    assert float(loss7) == pytest.approx(expected * 24 / 7)


@jax.jit
def _grads_by_mode(mask):
    """d loss / d logp for every aggregation mode (one compiled program for all masks)."""
    rng = np.random.default_rng(3)
    B, width = mask.shape
    old = jnp.asarray(rng.normal(-2.0, 0.3, size=(B, width)).astype(np.float32))
    logp = old + jnp.asarray(rng.normal(0, 0.05, size=(B, width)).astype(np.float32))
    adv = jnp.asarray(rng.normal(size=B).astype(np.float32))
    return {a: jax.grad(lambda lp, o: pg.pg_loss(o, lp, old, adv, mask)[0])(
        logp, pg.PGOptions(aggregation=a, beta=0.0)) for a in pg.AGGREGATIONS}


def test_aggregation_gradients_differ_on_ragged_and_agree_on_equal_lengths():
    grads = lambda lengths: {k: np.asarray(v) for k, v in
                             _grads_by_mode(jnp.asarray(_mask(lengths, 5))).items()}
    ragged = grads([5, 2, 4, 1])
    assert np.abs(ragged["token_mean"] - ragged["seq_mean_token_mean"]).max() > 1e-2
    # Token mean and the constant differ by the factor (sum of lengths) / (B * L_max) only.
    np.testing.assert_allclose(ragged["constant"], ragged["token_mean"] * 12 / 20, rtol=1e-5,
                               atol=1e-7)
    equal = grads([3, 3, 3, 3])
    np.testing.assert_allclose(equal["token_mean"], equal["seq_mean_token_mean"], rtol=1e-5,
                               atol=1e-7)
    full = grads([5, 5, 5, 5])
    for a in pg.AGGREGATIONS:
        np.testing.assert_allclose(full[a], full["token_mean"], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------ clipping


@pytest.mark.parametrize("clip_high", [0.28, 0.2])
def test_clip_higher_asymmetry_hand_values(clip_high):
    """One token per row: ratios 1.25, 1.25, 0.75, 1.35 with advantages +1, -1, -1, +1."""
    ratio = np.array([1.25, 1.25, 0.75, 1.35], np.float32)
    adv = jnp.asarray([1.0, -1.0, -1.0, 1.0])
    old = jnp.zeros((4, 1))
    m = jnp.ones((4, 1), jnp.int32)
    opts = pg.PGOptions(clip_low=0.2, clip_high=clip_high, beta=0.0)
    fn = lambda lp: pg.pg_loss(opts, lp, old, adv, m)
    (loss, stats), grad = jax.jit(jax.value_and_grad(fn, has_aux=True))(
        jnp.log(jnp.asarray(ratio))[:, None])
    if clip_high == 0.28:  # 1.25 < 1.28: the positive-advantage token at 1.25 still learns
        per_tok = [-1.25, 1.25, 0.8, -1.28]
        d = [-1.25, 1.25, 0.0, 0.0]  # d l / d logp = -A ratio where unclipped
        assert float(stats["clipfrac_high"]) == pytest.approx(0.25)
    else:
        per_tok = [-1.2, 1.25, 0.8, -1.2]
        d = [0.0, 1.25, 0.0, 0.0]
        assert float(stats["clipfrac_high"]) == pytest.approx(0.5)
    assert float(loss) == pytest.approx(np.mean(per_tok), abs=1e-6)
    np.testing.assert_allclose(np.asarray(grad)[:, 0], np.array(d) / 4, rtol=1e-5, atol=1e-7)
    assert float(stats["clipfrac_low"]) == pytest.approx(0.25)
    assert float(stats["clipfrac"]) == pytest.approx(float(stats["clipfrac_low"]) +
                                                     float(stats["clipfrac_high"]))
    assert float(stats["ratio_max"]) == pytest.approx(1.35, rel=1e-6)
    assert float(stats["ratio_min"]) == pytest.approx(0.75, rel=1e-6)


# ------------------------------------------------------------------------------ KL gradients
# Two categoricals, pi = softmax(theta) and a fixed ref. Samples y ~ pi are replaced by the exact
# sum over the support with weights pi (stop-gradient): E_pi[grad k(y)] with no sampling noise.

_REF = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
_THETA = np.array([-1.0, 0.5, 1.5, 1.0])


def _kl(p_logits, q_logits):
    lp, lq = jax.nn.log_softmax(p_logits), jax.nn.log_softmax(q_logits)
    return jnp.sum(jnp.exp(lp) * (lp - lq))


@jax.jit
def _exact_kl_grads(theta, ref_logits):
    fwd = jax.grad(lambda t: _kl(t, ref_logits))(theta)  # grad KL(pi || ref)
    rev = jax.grad(lambda t: _kl(ref_logits, t))(theta)  # grad KL(ref || pi)
    return fwd, rev


def test_estimator_as_loss_gradients_on_a_categorical():
    theta, ref = jnp.asarray(_THETA), jnp.asarray(_REF)
    ref_logp = jax.nn.log_softmax(ref)

    def surrogate(t, name):
        logp = jax.nn.log_softmax(t)
        weights = jax.lax.stop_gradient(jnp.exp(logp))
        return jnp.sum(weights * kl_estimators(logp, ref_logp)[name])

    fwd, rev = map(np.asarray, _exact_kl_grads(theta, ref))
    grads = jax.jit(lambda t: {k: jax.grad(surrogate)(t, k) for k in ("k1", "k2", "k3")})
    g = {k: np.asarray(v) for k, v in grads(theta).items()}
    np.testing.assert_allclose(g["k1"], 0.0, atol=1e-6)
    np.testing.assert_allclose(g["k2"], fwd, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g["k3"], rev, rtol=1e-5, atol=1e-6)
    assert np.abs(fwd - rev).max() > 0.05  # the two directions really differ here


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_pg_loss_kl_term_gradient_through_the_loss(name):
    """Through `pg_loss` itself: pi = (1, 3, 4) / 8 over three outputs, one row per eighth, so
    the token mean over 8 rows is exactly the expectation under pi. Advantages are 0, so the
    gradient is beta * E_pi[grad k]."""
    p0 = np.array([1, 3, 4]) / 8
    theta = jnp.asarray(np.log(p0))
    ref_logits = jnp.asarray(np.log([0.6, 0.3, 0.1]))
    ys = np.array([0, 1, 1, 1, 2, 2, 2, 2])
    beta = 0.5
    opts = pg.PGOptions(kl_mode="loss", kl_loss_estimator=name, beta=beta, group_size=8)
    ref_logp = jax.nn.log_softmax(ref_logits)[ys][:, None]
    m = jnp.ones((8, 1), jnp.int32)

    def loss(t):
        logp = jax.nn.log_softmax(t)[ys][:, None]
        return pg.pg_loss(opts, logp, jax.lax.stop_gradient(logp), jnp.zeros(8), m, ref_logp)[0]

    g = np.asarray(jax.jit(jax.grad(loss))(theta)) / beta
    fwd, rev = map(np.asarray, _exact_kl_grads(theta, ref_logits))
    want = {"k1": np.zeros(3), "k2": fwd, "k3": rev}[name]
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)


def test_options_validation_names_the_field():
    with pytest.raises(UserError, match="config.pg.estimator"):
        pg.PGOptions(estimator="ppo")
    with pytest.raises(UserError, match="config.pg.group_size"):
        pg.PGOptions(estimator="rloo", group_size=1)
    with pytest.raises(UserError, match="config.kl.mode"):
        pg.PGOptions(kl_mode="both")
    with pytest.raises(UserError, match="config.pg.aggregation"):
        pg.PGOptions(aggregation="sum")
    with pytest.raises(UserError, match="config.pg.clip_low"):
        pg.PGOptions(clip_low=1.0)
    with pytest.raises(UserError, match="config.pg.group_size"):
        pg.rloo_advantages(jnp.zeros(6), 4)
    pg.PGOptions(estimator="reinforce", group_size=1)  # fine: no group baseline
