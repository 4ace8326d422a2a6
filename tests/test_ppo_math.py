"""PPO math against plain references: GAE, whitening on 1 vs 8 devices, reward placement, the
adaptive KL controller, KL estimators, minibatch permutations, clipped losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import ops, ppo, rewards, rollout


def _ragged_mask(lengths, n):
    return (np.arange(n)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)


def _gae_loop(rewards, values, lengths, gamma, lam):
    """Per-row Python loop over the real tokens only (the textbook recursion)."""
    B, N = rewards.shape
    adv = np.zeros((B, N))
    for b in range(B):
        last = 0.0
        for t in reversed(range(lengths[b])):
            next_v = values[b, t + 1] if t + 1 < lengths[b] else 0.0
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, adv + values * _ragged_mask(lengths, N)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae_matches_python_loop(gamma, lam):
    rng = np.random.default_rng(0)
    B, N = 5, 9
    lengths = np.array([9, 1, 4, 7, 2])
    rewards = rng.normal(size=(B, N)).astype(np.float32)
    values = rng.normal(size=(B, N)).astype(np.float32)
    mask = _ragged_mask(lengths, N)
    # Garbage beyond the mask must not leak into the result.
    adv, ret = jax.jit(ppo.gae, static_argnums=(3, 4))(
        jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
    ref_adv, ref_ret = _gae_loop(rewards, values, lengths, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret * mask, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(adv)[mask == 0] == 0)


def test_masked_whiten_ignores_padding_and_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, size=(6, 7)).astype(np.float32)
    mask = _ragged_mask([7, 3, 5, 1, 6, 2], 7)
    x_garbage = np.where(mask == 1, x, 1e4).astype(np.float32)
    white = np.asarray(ops.masked_whiten(jnp.asarray(x_garbage), jnp.asarray(mask)))
    real = x[mask == 1]
    np.testing.assert_allclose(white[mask == 1], (real - real.mean()) / real.std(),
                               rtol=1e-4, atol=1e-5)
    assert np.all(white[mask == 0] == 0)
    scaled = np.asarray(ops.masked_whiten(jnp.asarray(x_garbage), jnp.asarray(mask),
                                          shift_mean=False))
    np.testing.assert_allclose(scaled[mask == 1], (real - real.mean()) / real.std() + real.mean(),
                               rtol=1e-4, atol=1e-5)


def test_whitening_and_gae_equal_on_1_and_8_devices():
    """Statistics are global: sharding the batch over 8 devices gives the 1-device numbers."""
    assert jax.device_count() == 8, "conftest must give 8 CPU devices"
    rng = np.random.default_rng(2)
    B, N = 16, 11
    lengths = rng.integers(1, N + 1, size=B)
    # Rows of very different scale per device shard: per-device stats would differ badly.
    x = (rng.normal(size=(B, N)) * np.repeat(np.arange(1, 9), 2)[:, None] + np.arange(B)[:, None])
    x = x.astype(np.float32)
    v = rng.normal(size=(B, N)).astype(np.float32)
    mask = _ragged_mask(lengths, N)

    def fn(x, v, m):
        adv, ret = ppo.gae(x, v, m, 1.0, 0.95)
        return (ops.masked_whiten(x, m), ops.masked_whiten(adv, m), ops.masked_mean(x, m),
                ppo.explained_variance(v, ret, m))

    single = jax.jit(fn)(jnp.asarray(x), jnp.asarray(v), jnp.asarray(mask))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
    xs, vs, ms = (jax.device_put(a, sh) for a in (x, v, mask))
    assert len(xs.addressable_shards) == 8 and xs.addressable_shards[0].data.shape == (2, N)
    sharded = jax.jit(fn)(xs, vs, ms)
    for a, b in zip(single, sharded):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    # And a per-device whitening really would be different (the test can fail).
    per_dev = np.concatenate([
        np.asarray(ops.masked_whiten(jnp.asarray(x[i:i + 2]), jnp.asarray(mask[i:i + 2])))
        for i in range(0, B, 2)])
    assert np.abs(per_dev - np.asarray(single[0])).max() > 0.1


def test_reward_placement_eos_and_no_eos():
    """Score lands on the last real response token (the EOS) whatever the prompt padding; rows
    that never ended get the configured score (-1) instead of the RM's."""
    N = 6
    # Response masks are right-padded after the first EOS (the sampler's contract).
    lengths = np.array([3, 6, 1, 6])
    ended = np.array([True, True, True, False])
    mask = jnp.asarray(_ragged_mask(lengths, N))
    rm = jnp.array([0.5, 2.0, -0.3, 1.7])
    scores = rewards.apply_eos_trick(rm, jnp.asarray(ended), -1.0)
    np.testing.assert_allclose(scores, [0.5, 2.0, -0.3, -1.0])
    np.testing.assert_allclose(rewards.apply_eos_trick(rm, jnp.asarray(ended), None), rm)
    np.testing.assert_array_equal(ppo.last_token_index(mask), [2, 5, 0, 5])

    logp = jnp.asarray(np.random.default_rng(3).normal(size=(4, N)), jnp.float32)
    logp_ref = logp - 0.25  # k1 = 0.25 per real token
    token_rewards, kl = ppo.compute_rewards(scores, logp, logp_ref, mask, 0.1)
    expected = np.zeros((4, N))
    for b, n in enumerate(lengths):
        expected[b, :n] = -0.1 * 0.25
        expected[b, n - 1] += float(scores[b])
    np.testing.assert_allclose(token_rewards, expected, atol=1e-6)
    np.testing.assert_allclose(kl, 0.25 * np.asarray(mask), atol=1e-6)
    # KL in the loss: the reward is the score alone.
    r_only, _ = ppo.compute_rewards(scores, logp, logp_ref, mask, 0.1, kl_in_reward=False)
    expected_only = np.zeros((4, N))
    expected_only[np.arange(4), lengths - 1] = np.asarray(scores)
    np.testing.assert_allclose(r_only, expected_only, atol=1e-7)


def test_adaptive_controller_matches_formula():
    beta, target, horizon, n = 0.15, 6.0, 10000.0, 512
    for kl in [0.0, 3.0, 5.5, 6.0, 6.6, 7.3, 40.0]:
        e = np.clip((kl - target) / target, -0.2, 0.2)
        expected = beta * (1 + e * n / horizon)
        got = float(ppo.adaptive_beta(beta, kl, n, target, horizon))
        assert got == pytest.approx(expected, rel=1e-6), kl
    # Iterated: KL above target keeps raising beta by the clipped maximum each step.
    b = 0.15
    for _ in range(10):
        b = ppo.adaptive_beta(b, 100.0, n, target, horizon)
    assert float(b) == pytest.approx(0.15 * (1 + 0.2 * n / horizon) ** 10, rel=1e-5)


def test_kl_estimators_on_known_kl():
    """Sample from p, estimate KL(p || q) for two categoricals with a known closed form."""
    p = np.array([0.5, 0.2, 0.2, 0.1])
    q = np.array([0.25, 0.25, 0.25, 0.25])
    true_kl = float(np.sum(p * np.log(p / q)))
    ys = jax.random.categorical(jax.random.key(0), jnp.log(jnp.asarray(p)), shape=(400_000,))
    est = ops.kl_estimators(jnp.log(jnp.asarray(p))[ys], jnp.log(jnp.asarray(q))[ys])
    assert float(est["k1"].mean()) == pytest.approx(true_kl, abs=3e-3)
    assert float(est["k3"].mean()) == pytest.approx(true_kl, abs=3e-3)
    assert float(est["k3"].min()) >= 0.0  # k3 is never negative
    assert float(est["k1"].min()) < 0.0  # k1 per sample can be
    # Exact expectation (no sampling) of each estimator under p.
    lp, lq = np.log(p), np.log(q)
    exact = ops.kl_estimators(jnp.asarray(lp), jnp.asarray(lq))
    assert float(np.sum(p * np.asarray(exact["k1"]))) == pytest.approx(true_kl, rel=1e-5)
    assert float(np.sum(p * np.asarray(exact["k3"]))) == pytest.approx(true_kl, rel=1e-5)
    # k2 is biased (its expectation is not the KL here).
    assert abs(float(np.sum(p * np.asarray(exact["k2"]))) - true_kl) > 1e-3


def test_minibatch_permutations_differ_across_epochs_and_updates():
    key = jax.random.key(7)
    perms = {(u, e): np.asarray(rollout.minibatch_indices(key, u, e, 32, 4))
             for u in range(3) for e in range(3)}
    for idx in perms.values():
        assert idx.shape == (4, 8)
        np.testing.assert_array_equal(np.sort(idx.ravel()), np.arange(32))  # a permutation
    flat = [v.ravel().tobytes() for v in perms.values()]
    assert len(set(flat)) == len(flat)
    # Deterministic for the key.
    np.testing.assert_array_equal(rollout.minibatch_indices(key, 1, 2, 32, 4), perms[(1, 2)])
    with pytest.raises(ValueError, match="num_minibatches"):
        rollout.minibatch_indices(key, 0, 0, 30, 4)


def test_clipped_losses_against_hand_values():
    mask = jnp.array([[1, 1, 1, 0]])
    old = jnp.zeros((1, 4))
    logp = jnp.log(jnp.array([[1.5, 0.5, 1.1, 9.0]]))  # ratios 1.5, 0.5, 1.1 (last is padding)
    adv = jnp.array([[1.0, -1.0, 2.0, 100.0]])
    loss, st = ppo.policy_loss(logp, old, adv, mask, 0.2)
    # max(-A r, -A clip(r)): -1.2, 0.8 (clip(0.5)=0.8 -> 0.8 > 0.5), -2.2 -> mean -0.8667
    assert float(loss) == pytest.approx((-1.2 + 0.8 - 2.2) / 3, rel=1e-5)
    assert float(st["clipfrac"]) == pytest.approx(2 / 3)
    assert float(st["ratio_max_dev"]) == pytest.approx(0.5, rel=1e-5)
    r = np.array([1.5, 0.5, 1.1])
    assert float(st["approx_kl"]) == pytest.approx(np.mean(r - 1 - np.log(r)), rel=1e-5)

    v = jnp.array([[1.0, 0.0, 3.0, 50.0]])
    old_v = jnp.array([[0.0, 0.0, 2.9, 0.0]])
    ret = jnp.array([[2.0, 1.0, 2.0, 0.0]])
    vl, vst = ppo.value_loss(v, old_v, ret, mask, 0.2)
    # token 0: clipped 0.2 -> max(1, 3.24) = 3.24; token 1: 1; token 2: clipped 3.0 -> max(1, 1) = 1
    assert float(vl) == pytest.approx(0.5 * (3.24 + 1 + 1) / 3, rel=1e-5)
    assert float(vst["vf_clipfrac"]) == pytest.approx(1 / 3)

    ev = ppo.explained_variance(ret, ret, mask)
    assert float(ev) == pytest.approx(1.0)
