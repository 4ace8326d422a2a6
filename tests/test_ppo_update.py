"""The jitted PPO pieces on tiny random models: rollout (reward placement, EOS trick, sampler vs
trainer log-probs), the update (first-minibatch ratio, determinism, fresh permutations against a
plain Python loop), and 1 vs 8 devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import models, ppo, rewards, rollout

CFG = models.ModelConfig(vocab_size=24, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=64)
EOS, PAD = 1, 0
B, P, N = 16, 5, 8


def _prompts():
    rng = np.random.default_rng(0)
    toks = rng.integers(3, 24, (B, P)).astype(np.int32)
    mask = np.ones((B, P), np.int32)
    mask[::2, :2] = 0  # half the rows left-padded by two
    mask[1::4, :4] = 0  # some by four
    return np.where(mask == 1, toks, PAD), mask


def _setup(value_from="rm", **overrides):
    policy = models.init_params(CFG, jax.random.key(0), ("lm",))
    # Make EOS likely enough that some rows end and some do not within N tokens.
    policy["embed"]["embedding"] = policy["embed"]["embedding"].at[EOS].multiply(20.0)
    ref = policy
    # The policy is a perturbed reference, so k1 is nonzero.
    policy = jax.tree.map(lambda x: x, policy)
    policy["layers"]["up"]["kernel"] = policy["layers"]["up"]["kernel"] * 1.5
    reward = models.init_params(CFG, jax.random.key(1), ("score",))
    kw = dict(policy=CFG, reward=CFG, value=CFG if value_from == "rm" else None,
              reward_gain=1.5, reward_bias=0.2, max_new_tokens=N, temperature=0.7, eos_id=EOS,
              pad_id=PAD, minibatches=4, epochs=2)
    kw.update(overrides)
    s = ppo.Settings(**kw)
    value = (ppo.value_params_from_rm(reward, s.reward_gain, s.reward_bias) if value_from == "rm"
             else {"score_head": ppo.zero_value_head(CFG)})
    return s, {"policy": policy, "value": value}, ref, reward


OPT = optax.adam(3e-3)
BETA = jnp.float32(0.1)


@pytest.fixture(scope="module")
def base():
    """One compiled rollout and update shared by the tests (value network from the RM)."""
    s, params, ref, reward = _setup()
    toks, mask = _prompts()
    rollout = jax.jit(functools.partial(ppo.rollout, s))
    update = jax.jit(functools.partial(ppo.update, s, OPT))
    batch, rows, metrics = rollout(params, ref, reward, toks, mask, jax.random.key(3), BETA)
    return dict(s=s, params=params, ref=ref, reward=reward, rollout=rollout, update=update,
                batch=batch, rows=rows, metrics=metrics)


def test_rollout_reward_placement_and_eos_trick(base):
    batch, rows, metrics, reward = base["batch"], base["rows"], base["metrics"], base["reward"]
    ended = np.asarray(rows["ended"])
    lengths = np.asarray(rows["lengths"])
    assert 0 < ended.sum() < B, "the test needs rows that end and rows that do not"
    toks, pmask = _prompts()
    resp = np.asarray(rows["response_tokens"])
    # The RM score equals the RM on the rows laid out another way: prompt without its left
    # padding, then the response up to and including its EOS, right-padded (neither the left
    # padding nor the pads after EOS may matter).
    alone = np.full((B, P + N), PAD, np.int32)
    alone_mask = np.zeros((B, P + N), np.int32)
    for b in range(B):
        row = np.concatenate([toks[b][pmask[b] == 1], resp[b, :lengths[b]]])
        alone[b, :len(row)], alone_mask[b, :len(row)] = row, 1
    want = rewards.score_sequences(CFG, reward, alone, alone_mask, {"gain": 1.5, "bias": 0.2})
    np.testing.assert_allclose(rows["rm_score"], want, rtol=1e-4, atol=1e-5)
    for b in range(B):
        if ended[b]:
            assert resp[b, lengths[b] - 1] == EOS
            assert rows["score"][b] == rows["rm_score"][b]
        else:
            assert lengths[b] == N and rows["score"][b] == -1.0  # the EOS trick
    # Rewards: -beta*k1 on every response token, the score added at the last one, 0 on padding.
    rmask = np.asarray(batch["response_mask"])
    k1 = (np.asarray(batch["old_logp"]) - np.asarray(batch["ref_logp"])) * rmask
    assert np.abs(k1).max() > 1e-3
    np.testing.assert_allclose(rows["kl"], k1.sum(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["kl"], k1.sum(1).mean(), rtol=1e-5, atol=1e-6)
    # Sum of the per-token rewards = score - beta * sequence k1.
    np.testing.assert_allclose(metrics["return"],
                               np.mean(np.asarray(rows["score"]) - 0.1 * k1.sum(1)),
                               rtol=1e-5, atol=1e-5)
    assert float(metrics["eos_rate"]) == pytest.approx(ended.mean())
    # Advantages were whitened over the real tokens of the whole batch.
    adv = np.asarray(batch["advantages"])[rmask == 1]
    assert abs(adv.mean()) < 1e-5 and abs(adv.std() - 1) < 1e-3
    assert np.all(np.asarray(batch["advantages"])[rmask == 0] == 0)


def test_first_minibatch_ratio_is_one_and_sampler_logprobs_agree(base):
    s, params, batch = base["s"], base["params"], base["batch"]
    assert float(base["metrics"]["logprob_diff_max"]) < 1e-5
    _, _, upd = base["update"](params, OPT.init(params), batch, None, BETA, jax.random.key(5),
                               jnp.int32(0))
    # Same params, same tokens: ratio = 1 up to float32 rounding (XLA fuses the forward with a
    # backward pass differently from a forward alone, which moves the last bit or two).
    assert float(upd["ratio_first_max_dev"]) <= 1e-6
    # Later minibatches moved: the ratio is not trivially 1 everywhere.
    assert float(upd["approx_kl"]) > 1e-7
    # The trainer uses logits / T: with T = 1 the log-probs would disagree with the sampler.
    s1 = ppo.Settings(**{**s.__dict__, "temperature": 1.0})
    logp_t1 = ppo.policy_pass(s1, params, batch["tokens"], batch["mask"], batch["positions"], P)[0]
    gap = np.abs((np.asarray(logp_t1) - np.asarray(batch["old_logp"]))
                 * np.asarray(batch["response_mask"]))
    assert gap.max() > 1e-2


def _python_loop_update(s, params, batch, key, update_index):
    """Reference: epochs x minibatches as plain Python loops, one jitted grad per minibatch."""
    grad_fn = jax.jit(jax.grad(lambda p, mb: ppo.ppo_loss(s, p, mb, None, BETA)[0]))
    opt_state = OPT.init(params)
    for e in range(s.epochs):
        idx = np.asarray(rollout.minibatch_indices(key, update_index, e, B, s.minibatches))
        for j in range(s.minibatches):
            mb = jax.tree.map(lambda x: x[idx[j]], batch)
            upd, opt_state = OPT.update(grad_fn(params, mb), opt_state, params)
            params = optax.apply_updates(params, upd)
    return params


def test_update_matches_python_loop_and_is_deterministic(base):
    s, params, batch, fn = base["s"], base["params"], base["batch"], base["update"]
    key = jax.random.key(11)
    out1 = fn(params, OPT.init(params), batch, None, BETA, key, jnp.int32(4))
    out2 = fn(params, OPT.init(params), batch, None, BETA, key, jnp.int32(4))
    for a, b in zip(jax.tree.leaves(out1), jax.tree.leaves(out2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bitwise, same seed
    # The scan equals Python loops over fresh permutations per (update, epoch).
    ref_params = _python_loop_update(s, params, batch, key, 4)
    for a, b in zip(jax.tree.leaves(out1[0]), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)
    # Another update index shuffles differently, so the result differs.
    out3 = fn(params, OPT.init(params), batch, None, BETA, key, jnp.int32(5))
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(out1[0]),
                                                            jax.tree.leaves(out3[0])))
    assert diff > 1e-6


def test_rollout_and_update_same_on_1_and_8_devices(base):
    """Global statistics (whitening, means) and the update do not depend on the mesh."""
    params, ref, reward = base["params"], base["ref"], base["reward"]
    toks, pmask = _prompts()
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    with jax.set_mesh(mesh):
        b8, _, m8 = base["rollout"](params, ref, reward, jax.device_put(toks, sh),
                                    jax.device_put(pmask, sh), jax.random.key(3), BETA)
        p8, _, _ = base["update"](params, OPT.init(params), b8, None, BETA, jax.random.key(5),
                                  jnp.int32(0))
    p1, _, _ = base["update"](params, OPT.init(params), base["batch"], None, BETA,
                              jax.random.key(5), jnp.int32(0))
    b1, m1 = base["batch"], base["metrics"]
    assert len(b8["advantages"].sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(b1["tokens"]), np.asarray(b8["tokens"]))
    for key in ("advantages", "returns", "old_logp"):
        np.testing.assert_allclose(np.asarray(b1[key]), np.asarray(b8[key]), rtol=1e-5, atol=1e-5)
    for key in ("kl", "rm_score", "explained_variance", "advantage_std"):
        assert float(m1[key]) == pytest.approx(float(m8[key]), rel=1e-5, abs=1e-6)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
