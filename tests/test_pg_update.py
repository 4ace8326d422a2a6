"""The jitted critic-free pieces on tiny random models: no value model anywhere (params tree and
the traced rollout / update, with PPO's rollout as the positive control of the counter), groups in
adjacent rows, the first-minibatch ratio, the update against a plain Python loop, and rollout
and update equal on 1 and 8 devices with every group split across two devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import models, pg, ppo, rewards, rollout, sharding

POLICY = models.ModelConfig(vocab_size=24, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                            max_len=64)
# The RM has its own MLP width, so a trunk pass of RM shape is recognisable in a trace.
RM = models.ModelConfig(vocab_size=24, d_model=32, n_layers=1, n_heads=2, d_ff=40, max_len=64)
EOS, PAD = 1, 0
PROMPTS, K, L, N = 4, 4, 5, 8  # 16 episodes: on 8 devices each group spans two of them
OPT = optax.adam(3e-3)


def _prompts():
    rng = np.random.default_rng(0)
    toks = rng.integers(3, 24, (PROMPTS, L)).astype(np.int32)
    mask = np.ones((PROMPTS, L), np.int32)
    mask[::2, :2] = 0  # left-padded prompts
    return np.where(mask == 1, toks, PAD), mask


def _settings(**opts):
    o = dict(estimator="rloo", group_size=K, kl_mode="reward", beta=0.1)
    o.update(opts)
    return pg.Settings(policy=POLICY, reward=RM, opts=pg.PGOptions(**o), reward_gain=1.5,
                       reward_bias=0.2, max_new_tokens=N, temperature=0.7, eos_id=EOS,
                       pad_id=PAD, epochs=2, minibatches=2)


@functools.cache
def _models():
    ref = models.init_params(POLICY, jax.random.key(0), ("lm",))
    ref["embed"]["embedding"] = ref["embed"]["embedding"].at[EOS].multiply(20.0)  # some end
    policy = {**ref, "layers": {**ref["layers"], "up": {
        "kernel": ref["layers"]["up"]["kernel"] * 1.5}}}  # a perturbed reference: k1 != 0
    reward = models.init_params(RM, jax.random.key(1), ("score",))
    return policy, ref, reward


@pytest.fixture(scope="module")
def base():
    s = _settings()
    policy, ref, reward = _models()
    toks, mask = _prompts()
    rollout = jax.jit(functools.partial(pg.rollout, s))
    update = jax.jit(functools.partial(pg.update, s, OPT))
    batch, rows, metrics = rollout(policy, ref, reward, toks, mask, jax.random.key(3))
    return dict(s=s, rollout=rollout, update=update, batch=batch, rows=rows, metrics=metrics)


# ------------------------------------------------------------------------ structure check


def _rm_matmuls(fn, *args) -> int:
    """Matmuls into the RM's MLP width (d_ff = 40; the policy's is 64) in the trace of
    fn(*args), counted through every nested jaxpr."""
    def count(jaxpr) -> int:
        n = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general" and eqn.outvars[0].aval.shape[-1] == RM.d_ff:
                n += 1
            for sub in jax.core.jaxprs_in_params(eqn.params):
                n += count(sub)
        return n

    return count(jax.make_jaxpr(fn)(*args).jaxpr)


def _rm_trunk_passes(fn, *args) -> float:
    """Trunk passes of RM shape in fn(*args): its RM-width matmuls over those of one RM pass."""
    _, _, reward = _models()
    toks = jnp.zeros((2, L + N), jnp.int32)
    one = _rm_matmuls(functools.partial(rewards.score_sequences, RM), reward, toks,
                      jnp.ones_like(toks))
    assert one > 0
    return _rm_matmuls(fn, *args) / one


def test_no_value_model_in_params_rollout_or_update(base):
    policy, ref, reward = _models()
    toks, mask = _prompts()
    s = base["s"]
    # Params: the policy's LM params, exactly; nothing value-like to train or carry.
    assert set(policy) == set(models.abstract_params(POLICY, ("lm",)))
    assert "score_head" not in policy and "value" not in policy
    # The rollout runs the RM once (the reward) and nothing else of its shape. PPO's rollout with
    # a value network initialised from the RM runs two: the counter sees a value pass.
    key = jax.random.key(3)
    assert _rm_trunk_passes(functools.partial(pg.rollout, s), policy, ref, reward, toks, mask,
                            key) == 1
    ps = ppo.Settings(policy=POLICY, reward=RM, value=RM, max_new_tokens=N, eos_id=EOS,
                      pad_id=PAD)
    value = ppo.value_params_from_rm(reward, 1.0, 0.0)
    assert _rm_trunk_passes(functools.partial(ppo.rollout, ps), {"policy": policy, "value": value},
                            ref, reward, toks, mask, key, jnp.float32(0.1)) == 2
    # The update takes no RM or value params at all, and traces no RM-shaped pass.
    assert _rm_trunk_passes(functools.partial(pg.update, s, OPT), policy, OPT.init(policy),
                            base["batch"], jax.random.key(5), 0) == 0
    # What the rollout hands the update: per-sequence advantages, no values or returns.
    assert set(base["batch"]) == {"tokens", "mask", "positions", "response_mask", "old_logp",
                                  "ref_logp", "advantages"}
    assert base["batch"]["advantages"].shape == (PROMPTS * K,)


# ----------------------------------------------------------------------------- rollout


def test_groups_are_adjacent_rows_and_advantages_follow_the_registry(base):
    batch, rows, metrics = base["batch"], base["rows"], base["metrics"]
    toks, pmask = _prompts()
    # Prompt p's K samples are rows p*K .. p*K + K - 1 (the prompt part of the sequence).
    np.testing.assert_array_equal(np.asarray(batch["tokens"])[:, :L], np.repeat(toks, K, 0))
    ended = np.asarray(rows["ended"])
    assert 0 < ended.sum() < PROMPTS * K, "the test needs rows that end and rows that do not"
    # Sequence reward = score (EOS trick applied) - beta * sum_t k1; the RLOO advantage of it.
    rmask = np.asarray(batch["response_mask"])
    k1 = ((np.asarray(batch["old_logp"]) - np.asarray(batch["ref_logp"])) * rmask).sum(1)
    assert np.abs(k1).max() > 1e-3
    score = np.where(ended, np.asarray(rows["rm_score"]), -1.0)
    reward = score - 0.1 * k1
    np.testing.assert_allclose(rows["reward"], reward, rtol=1e-5, atol=1e-5)
    g = reward.reshape(PROMPTS, K)
    loo = g - (g.sum(1, keepdims=True) - g) / (K - 1)
    np.testing.assert_allclose(batch["advantages"], loo.reshape(-1), rtol=1e-4, atol=1e-5)
    assert float(metrics["group_reward_std"]) == pytest.approx(g.std(1, ddof=1).mean(), rel=1e-4)
    assert float(metrics["logprob_diff_max"]) < 1e-5


# ------------------------------------------------------------------------------ update


def _python_loop_update(s, params, batch, key, update_index):
    """Reference: epochs x minibatches as Python loops, one jitted grad per minibatch."""
    grad_fn = jax.jit(jax.grad(lambda p, mb: pg.minibatch_loss(s, p, mb)[0]))
    opt_state = OPT.init(params)
    B = batch["tokens"].shape[0]
    for e in range(s.epochs):
        idx = np.asarray(rollout.minibatch_indices(key, update_index, e, B, s.minibatches))
        for j in range(s.minibatches):
            mb = jax.tree.map(lambda x: x[idx[j]], batch)
            upd, opt_state = OPT.update(grad_fn(params, mb), opt_state, params)
            params = optax.apply_updates(params, upd)
    return params


def test_update_ratio_python_loop_and_determinism(base):
    policy, _, _ = _models()
    s, batch, fn = base["s"], base["batch"], base["update"]
    key = jax.random.key(11)
    p1, _, m1 = fn(policy, OPT.init(policy), batch, key, jnp.int32(4))
    p2, _, _ = fn(policy, OPT.init(policy), batch, key, jnp.int32(4))
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(m1["ratio_first_max_dev"]) <= 1e-6  # same params, same tokens: ratio 1
    assert float(m1["approx_kl"]) > 1e-7 and float(m1["ratio_max"]) > 1.0
    ref = _python_loop_update(s, policy, batch, key, 4)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)


def test_rollout_and_update_same_on_1_and_8_devices(base):
    """4 prompts x 4 samples on 8 devices: 2 rows per device, so every group is split."""
    policy, ref, reward = _models()
    toks, pmask = _prompts()
    mesh = sharding.make_mesh({"data": 8})
    bsh = sharding.batch_sharding(mesh)
    s = base["s"]
    # Prompts: 4 rows cannot split 8 ways, so they go in replicated; the rollout splits the
    # repeated 16 episode rows over the mesh.
    rep = sharding.replicated(mesh)
    rollout8 = jax.jit(functools.partial(pg.rollout, s, batch_sharding=bsh))
    update8 = jax.jit(functools.partial(pg.update, s, OPT, batch_sharding=bsh))
    b8, _, m8 = rollout8(policy, ref, reward, jax.device_put(toks, rep),
                         jax.device_put(pmask, rep), jax.random.key(3))
    assert len(b8["advantages"].sharding.device_set) == 8
    assert b8["advantages"].addressable_shards[0].data.shape == (2,)
    b1, m1 = base["batch"], base["metrics"]
    np.testing.assert_array_equal(np.asarray(b1["tokens"]), np.asarray(b8["tokens"]))
    for key in ("advantages", "old_logp", "ref_logp"):
        np.testing.assert_allclose(np.asarray(b1[key]), np.asarray(b8[key]), rtol=1e-5,
                                   atol=1e-5)
    for key in ("kl", "rm_score", "group_reward_std", "zero_adv_group_frac", "advantage_std"):
        assert float(m1[key]) == pytest.approx(float(m8[key]), rel=1e-5, abs=1e-6), key
    p8, _, u8 = update8(policy, OPT.init(policy), b8, jax.random.key(5), jnp.int32(0))
    p1, _, u1 = base["update"](policy, OPT.init(policy), b1, jax.random.key(5), jnp.int32(0))
    # Adam moves every weight by ~lr = 3e-3 per step whatever its gradient's size, so float
    # rounding in a near-zero gradient can move a weight by a few 1e-5; 5e-5 is 60x below a step.
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=5e-5)
    for key in ("loss", "pg_loss", "approx_kl", "grad_norm"):
        assert float(u1[key]) == pytest.approx(float(u8[key]), rel=1e-4, abs=1e-6), key
