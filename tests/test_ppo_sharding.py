"""The PPO update splits its minibatches over a data mesh (issue 13).

A minibatch is gathered from the rollout batch with random indices; without a sharding
constraint the gathered minibatch is replicated and every device computes all of it. Read from
the compiled program: per-device activations must hold B_mb / n_shards rows, and the gradient
must be all-reduced. The numbers must equal the one-device update's.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import models, ppo, sharding

CFG = models.ModelConfig(vocab_size=24, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=64)
B, P, N = 16, 5, 8  # 4 minibatches of 4 rows; sequences of 13 tokens
MB = B // 4
OPT = optax.adam(3e-3)
BETA = jnp.float32(0.1)
MESHES = {"data2": {"data": 2}, "data2-fsdp2": {"data": 2, "fsdp": 2}}


@functools.cache
def _problem():
    """Settings, params (policy + separate value network) and a rollout-like batch."""
    s = ppo.Settings(policy=CFG, reward=CFG, value=CFG, max_new_tokens=N, temperature=0.7,
                     minibatches=B // MB, epochs=2)
    params = {"policy": models.init_params(CFG, jax.random.key(0), ("lm",)),
              "value": models.init_params(CFG, jax.random.key(1), ("score",))}
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 24, (B, P + N)).astype(np.int32)
    mask = np.ones((B, P + N), np.int32)
    mask[::2, :2] = 0  # left-padded prompts
    rmask = np.ones((B, N), np.int32)
    rmask[1::3, 5:] = 0  # responses that ended early
    mask[:, P:] = rmask
    positions = np.asarray(models.positions_from_mask(jnp.asarray(mask)))
    logp, _, values = ppo.policy_pass(s, params, tokens, mask, positions, P)
    f = lambda: rng.normal(size=(B, N)).astype(np.float32) * rmask
    batch = {"tokens": tokens, "mask": mask, "positions": positions, "response_mask": rmask,
             "old_logp": np.asarray(logp), "ref_logp": np.asarray(logp) + 0.01 * f(),
             "old_values": np.asarray(values), "advantages": f(), "returns": f()}
    return s, params, batch


@pytest.fixture(scope="module")
def problem():
    return _problem()


@pytest.fixture(scope="module")
def one_device(problem):
    """The update on one device, no batch sharding: the reference numbers."""
    s, params, batch = problem
    one = jax.jit(functools.partial(ppo.update, s, OPT))
    return one(params, OPT.init(params), batch, None, BETA, jax.random.key(5), jnp.int32(3))


@functools.cache
def _compiled(mesh_name: str):
    """The update compiled on a mesh of the first devices, params placed by the default rules
    (fsdp shards their embed dim), the batch over data x fsdp; and its placed inputs."""
    s, params, batch = _problem()
    mesh_cfg = MESHES[mesh_name]
    n = int(np.prod(list(mesh_cfg.values())))
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:n])
    axes = {"policy": models.param_axes(CFG, ("lm",)), "value": models.param_axes(CFG, ("score",))}
    params = jax.device_put(params, sharding.logical_to_shardings(axes, mesh, None, params))
    opt_state = jax.jit(OPT.init)(params)
    bsh = sharding.batch_sharding(mesh)
    batch = jax.device_put(batch, bsh)
    args = (params, opt_state, batch, None, BETA, jax.random.key(5), jnp.int32(3))
    fn = jax.jit(functools.partial(ppo.update, s, OPT, batch_sharding=bsh))
    return fn.lower(*args).compile(), args, n


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_minibatch_activations_are_split_and_grads_all_reduced(mesh_name):
    compiled, _, n = _compiled(mesh_name)
    hlo = compiled.as_text()
    T, D = P + N, CFG.d_model
    # Activations [rows, T, ...] of one minibatch, per device: none with all MB rows; the
    # trunks' residual stream [MB / n, T, D].
    whole = re.findall(rf"f32\[{MB},{T},\d+", hlo)
    split = re.findall(rf"f32\[{MB // n},{T},{D}\]", hlo)
    assert not whole, f"{len(whole)} activations hold the whole minibatch on every device"
    assert split, "no per-device minibatch activations found"
    # A gradient all-reduce: parameter-shaped operands (the [V, D] embedding) summed across
    # the batch shards.
    reduces = [line for line in hlo.splitlines() if re.search(r"= .*all-reduce\(", line)]
    assert any(f"f32[{CFG.vocab_size},{D}]" in line.split("all-reduce(")[0] for line in reduces), \
        "no all-reduce of parameter gradients"


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_split_update_equals_one_device(one_device, mesh_name):
    compiled, args, _ = _compiled(mesh_name)
    p_mesh, _, m_mesh = compiled(*args)
    p_one, _, m_one = one_device
    for a, b in zip(jax.tree.leaves(p_one), jax.tree.leaves(p_mesh)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    for k in ("loss", "pg_loss", "vf_loss", "approx_kl", "clipfrac", "grad_norm"):
        assert float(m_one[k]) == pytest.approx(float(m_mesh[k]), rel=1e-4, abs=1e-6), k
    assert float(m_one["approx_kl"]) > 1e-7  # the update moved the policy


def test_indivisible_minibatch_stays_replicated(problem, caplog):
    """4-row minibatches on an 8-way batch axis cannot split: warn, and stay correct."""
    s, params, batch = problem
    mesh = sharding.make_mesh({"data": 8})
    bsh = sharding.batch_sharding(mesh)
    fn = jax.jit(functools.partial(ppo.update, s, OPT, batch_sharding=bsh))
    with caplog.at_level("WARNING", logger="rlhf_jax.ppo"):
        lowered = fn.lower(params, OPT.init(params), jax.device_put(batch, bsh), None, BETA,
                           jax.random.key(5), jnp.int32(3))
    assert "cannot split over 8 batch shards" in caplog.text
    assert lowered is not None
