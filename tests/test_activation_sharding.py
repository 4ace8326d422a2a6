"""Activations carry logical axes (issue 21, item 6).

The model names its activations' axes (batch, length, embed, heads, kv_heads, head_dim, mlp,
vocab); while a step is traced under `sharding.activation_mesh` the rules table turns them into
sharding constraints, so a mesh shape changes no code. Read from the compiled SFT step on a
(data 2, fsdp 2, tensor 2) mesh: the attention and MLP activations hold 1/2 of their heads and
MLP units per device; the numbers equal one device's.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax import models, ops, sharding, trainer

# Distinct sizes so the per-device shapes are unambiguous in the HLO: head_dim 12, 4 heads
# (2 per tensor shard), 2 kv heads, d_ff 80 (40 per tensor shard), batch 8 (2 per data x fsdp
# shard), length 12.
CFG = models.ModelConfig(vocab_size=36, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2,
                         d_ff=80, max_len=64)
B, T = 8, 12
OPT = optax.adam(1e-2)


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 36, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    mask[1::2, -3:] = 0  # right padding
    return {"tokens": tokens, "mask": mask, "loss_mask": mask.copy()}


def _step():
    loss_fn = lambda params, frozen, batch, key: ops.lm_loss_sums(CFG, params, batch)  # noqa: E731
    return trainer.make_train_step(loss_fn, OPT)


def _state(params):
    return trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=OPT.init(params))


@functools.cache
def _run(mesh_shape):
    """(compiled HLO text or None, new params, metrics) of one SFT step."""
    params = models.init_params(CFG, jax.random.key(0))
    batch = _batch()
    key = jax.random.key(1)
    if mesh_shape is None:
        state, metrics = jax.jit(_step())(_state(params), None, batch, key)
        return None, state.params, metrics
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)), jax.devices()[:8])
    axes = models.param_axes(CFG)
    param_sh = sharding.logical_to_shardings(axes, mesh, None, params)
    params = jax.device_put(params, param_sh)
    abstract = jax.eval_shape(_state, params)
    opt_sh = trainer.opt_state_shardings(abstract.opt_state, params, param_sh, mesh)
    rep = NamedSharding(mesh, P())
    state_sh = trainer.TrainState(step=rep, params=param_sh, opt_state=opt_sh, extra={})
    state = jax.jit(_state, out_shardings=state_sh)(params)
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    fn = jax.jit(sharding.activation_sharding(_step(), mesh),
                 in_shardings=(state_sh, None, sharding.batch_sharding(mesh), rep),
                 out_shardings=(state_sh, rep))
    compiled = fn.lower(state, None, batch, key).compile()
    state, metrics = compiled(state, None, batch, key)
    return compiled.as_text(), state.params, metrics


def _shapes(hlo: str) -> set[str]:
    return set(re.findall(r"f32\[([\d,]+)\]", hlo))


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2)])
def test_attention_and_mlp_split_over_tensor(mesh_shape):
    hlo, _, _ = _run(mesh_shape)
    shapes = _shapes(hlo)
    rows = B // 4  # batch over data x fsdp
    # MLP activations: [rows, T, d_ff / 2]; never the whole d_ff on one device.
    assert f"{rows},{T},40" in shapes, sorted(shapes)
    assert f"{rows},{T},80" not in shapes
    # Attention: queries [rows, T, heads / 2, head_dim] and scores over 2 of the 4 heads.
    assert f"{rows},{T},2,12" in shapes
    assert not any(s.startswith(f"{rows},{T},4,12") or s == f"{rows},4,{T},{T}" for s in shapes)
    # Each device holds its own rows only: no activation carries the whole batch.
    assert not any(s.startswith(f"{B},{T},") for s in shapes)


def test_numbers_equal_one_device():
    _, p1, m1 = _run(None)
    _, p8, m8 = _run((2, 2, 2))
    np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(m8["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=1e-5, atol=1e-5), p8, p1)


def test_constrain_without_a_mesh_is_identity_and_checks_rank():
    x = jnp.ones((2, 3, 4))
    assert sharding.constrain(x, ("batch", "length", "embed")) is x
    mesh = sharding.make_mesh({"data": 2, "tensor": 4})
    with sharding.activation_mesh(mesh):
        with pytest.raises(ValueError, match="do not match"):
            sharding.constrain(x, ("batch", "embed"))
