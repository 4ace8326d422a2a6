"""Chunked LM-head log-probs (rlhf_jax/lm_head.py) against the full-logits computation: values,
entropy and gradients (tied and untied heads, temperature, bf16, ragged chunks, padding), the
model-level helpers, a mesh, and the compiled program's memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import lm_head, models, ops

B, T, D, V = 3, 10, 16, 40


def _inputs(dtype=jnp.float32, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(k[0], (B, T, D), jnp.float32).astype(dtype)
    weight = 0.5 * jax.random.normal(k[1], (D, V), jnp.float32)
    targets = jax.random.randint(k[2], (B, T), 0, V)
    mask = (jnp.arange(T)[None, :] < jnp.array([[T], [6], [3]])).astype(jnp.float32)
    return hidden, weight, targets, mask


def _loss(fn, mask, ent_coef):
    """A masked loss of log-probs and entropy, like PPO's (padding weighted 0)."""
    def loss(h, w):
        logp, ent = fn(h, w)
        out = jnp.sum(logp * mask)
        if ent_coef:
            out = out + ent_coef * jnp.sum(ent * mask)
        return out
    return loss


def _grad(loss):
    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def test_values_against_numpy():
    hidden, weight, targets, _ = _inputs()
    logp, ent = jax.jit(lambda h, w, t: lm_head.target_logprobs(
        h, w, t, temperature=0.7, with_entropy=True, chunk_size=4))(hidden, weight, targets)
    z = np.einsum("btd,dv->btv", np.asarray(hidden, np.float64),
                  np.asarray(weight, np.float64)) / 0.7
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    logp_all = z - lse[..., None]
    want = np.take_along_axis(logp_all, np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(logp, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent, -(np.exp(logp_all) * logp_all).sum(-1), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("vocab_major,temperature,chunk", [
    (False, 0.7, 3),  # 3 does not divide T = 10: the last chunk is padded
    (True, 0.7, 3),
    (False, 1.0, 5),
    (True, 1.3, 1),
    (True, 1.0, None),  # auto: one chunk
], ids=["untied-c3", "tied-c3", "untied-c5-T1", "tied-c1", "tied-auto-T1"])
def test_matches_full_logits(vocab_major, temperature, chunk):
    hidden, weight, targets, mask = _inputs()
    w = weight.T if vocab_major else weight  # a tied head is the [V, D] table

    def chunked(h, w):
        return lm_head.target_logprobs(h, w, targets, vocab_major=vocab_major,
                                       temperature=temperature, with_entropy=True,
                                       chunk_size=chunk)

    def full(h, w):
        return lm_head.full_logits_logprobs(h, w, targets, vocab_major=vocab_major,
                                            temperature=temperature)

    got, want = jax.jit(chunked)(hidden, w), jax.jit(full)(hidden, w)
    for g, x in zip(got, want):
        np.testing.assert_allclose(g, x, rtol=1e-5, atol=1e-5)
    g_got = _grad(_loss(chunked, mask, 0.3))(hidden, w)
    g_want = _grad(_loss(full, mask, 0.3))(hidden, w)
    for g, x in zip(g_got, g_want):
        assert g.shape == x.shape and g.dtype == x.dtype
        np.testing.assert_allclose(g, x, rtol=1e-4, atol=1e-5)
    # Padding positions get no gradient.
    assert float(jnp.abs(g_got[0][2, 3:]).max()) == 0.0


def test_without_entropy():
    hidden, weight, targets, mask = _inputs(seed=1)
    logp, ent = lm_head.target_logprobs(hidden, weight, targets, chunk_size=4)
    assert ent is None
    want, _ = lm_head.full_logits_logprobs(hidden, weight, targets)
    np.testing.assert_allclose(logp, want, rtol=1e-5, atol=1e-5)
    g = _grad(lambda h, w: jnp.sum(lm_head.target_logprobs(h, w, targets, chunk_size=4)[0]
                                   * mask))(hidden, weight)
    gw = _grad(_loss(lambda h, w: lm_head.full_logits_logprobs(h, w, targets), mask, 0.0))(
        hidden, weight)
    for a, b in zip(g, gw):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bf16_compute_dtype():
    """bf16 hidden and a f32 weight cast to bf16 (models.forward with dtype="bfloat16"): the
    same dtypes as the full computation, f32 logits, gradients in the inputs' dtypes."""
    hidden, weight, targets, mask = _inputs(jnp.bfloat16, seed=2)

    def chunked(h, w):
        return lm_head.target_logprobs(h, w, targets, temperature=0.7, with_entropy=True,
                                       chunk_size=3)

    def full(h, w):
        return lm_head.full_logits_logprobs(h, w, targets, temperature=0.7)

    got, want = jax.jit(chunked)(hidden, weight), jax.jit(full)(hidden, weight)
    assert got[0].dtype == jnp.float32 and got[1].dtype == jnp.float32
    for g, x in zip(got, want):
        np.testing.assert_allclose(g, x, rtol=1e-5, atol=1e-4)
    g_got = _grad(_loss(chunked, mask, 0.3))(hidden, weight)
    g_want = _grad(_loss(full, mask, 0.3))(hidden, weight)
    assert g_got[0].dtype == jnp.bfloat16 and g_got[1].dtype == jnp.float32
    # Both are bf16 approximations of the f32 computation; ours may round differently (the
    # logits' gradient enters the matmuls in bf16, the weight gradient is never rounded to bf16)
    # but must be as close to f32 as the full bf16 computation is.
    g_f32 = _grad(_loss(full, mask, 0.3))(hidden.astype(jnp.float32), weight)
    for g, x, r in zip(g_got, g_want, g_f32):
        g, x = np.asarray(g, np.float32), np.asarray(x, np.float32)
        np.testing.assert_allclose(g, x, rtol=0, atol=1e-2 * np.abs(x).max())
        assert np.abs(g - r).max() <= 1.5 * np.abs(x - r).max() + 1e-3


@pytest.mark.parametrize("tie,start", [(True, 4), (False, 0)], ids=["tied-ppo", "untied-sft"])
def test_model_level_helpers_match_forward_logits(tie, start):
    """shifted_logprobs on forward(want_logits=False)'s hidden = ops.token_logprobs (start 0) or
    PPO's response slice (start P-1 = 4), values and parameter gradients, on a tiny model."""
    cfg = models.ModelConfig(vocab_size=48, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                             max_len=32, tie_embeddings=tie)
    params = models.init_params(cfg, jax.random.key(0))
    Bm, Tm = 2, 12
    tokens = jax.random.randint(jax.random.key(1), (Bm, Tm), 0, 48)
    mask = jnp.ones((Bm, Tm), jnp.int32).at[1, :2].set(0)  # one left-padded row
    positions = models.positions_from_mask(mask)
    w = mask[:, start + 1:].astype(jnp.float32)

    def chunked(p):
        hidden = models.forward(cfg, p, tokens, positions, mask, want_logits=False)["hidden"]
        return lm_head.shifted_logprobs(p, hidden, tokens, start=start, temperature=0.7,
                                        with_entropy=True, chunk_size=3)

    def full(p):
        logp, ent = ops.token_logprobs(cfg, p, tokens, mask, positions=positions,
                                       temperature=0.7)
        return logp[:, start:], ent[:, start:]

    def loss(fn):
        def f(p):
            logp, ent = fn(p)
            return jnp.sum(logp * w) + 0.1 * jnp.sum(ent * w), (logp, ent)
        return jax.jit(jax.value_and_grad(f, has_aux=True))

    (_, got), g_got = loss(chunked)(params)
    (_, want), g_want = loss(full)(params)
    assert got[0].shape == (Bm, Tm - 1 - start)
    for g, x in zip(got, want):
        np.testing.assert_allclose(g, x, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    hidden = jnp.zeros((Bm, Tm, 32))
    with pytest.raises(ValueError, match="start"):
        lm_head.shifted_logprobs(params, hidden, tokens, start=Tm - 1)


def test_on_a_mesh_with_vocab_over_tensor():
    """Batch over data, vocab over tensor: same values and gradients as one device."""
    from rlhf_jax import sharding

    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
    hidden, weight, targets, mask = _inputs(seed=3)
    hidden, targets, mask = (jnp.concatenate([x, x[:1]]) for x in (hidden, targets, mask))
    spec = jax.sharding.PartitionSpec

    def put(x, *axes):
        return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec(*axes)))

    def loss(h, w, t, m):
        logp, ent = lm_head.target_logprobs(h, w, t, temperature=0.7, with_entropy=True,
                                            chunk_size=4)
        return jnp.sum(logp * m) + 0.2 * jnp.sum(ent * m)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    v1, g1 = fn(hidden, weight, targets, mask)
    v8, g8 = fn(put(hidden, "data"), put(weight, None, "tensor"), put(targets, "data"),
                put(mask, "data"))
    np.testing.assert_allclose(v1, v8, rtol=1e-5)
    for a, b in zip(g1, g8):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bad_inputs():
    hidden, weight, targets, _ = _inputs()
    with pytest.raises(ValueError, match="weight"):
        lm_head.target_logprobs(hidden, weight.T, targets)
    with pytest.raises(ValueError, match="targets"):
        lm_head.target_logprobs(hidden, weight, targets[:, 1:])
    with pytest.raises(ValueError, match="temperature"):
        lm_head.target_logprobs(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        lm_head.target_logprobs(hidden, weight, targets, chunk_size=0)


def test_auto_chunk_size():
    assert lm_head.auto_chunk_size(2, 64, 512) == 64  # small: one chunk
    c = lm_head.auto_chunk_size(1, 4096, 151936)  # Qwen2 head at 4k: 38 chunks of 108
    assert c == 108 and c * 151936 <= lm_head.DEFAULT_CHUNK_ELEMENTS
    assert lm_head.auto_chunk_size(4, 100, 10 ** 8, max_elements=10) == 1


def test_compiled_memory_far_below_full_logits():
    """Forward + backward at [2, 512] x 8192 vocab: the full f32 logits are 32 MiB per copy; the
    chunked program (chunks of 64 positions, 4 MiB of logits) must need a small fraction of the
    full-logits program's temporary memory."""
    Bm, Tm, Dm, Vm = 2, 512, 64, 8192
    args = (jax.ShapeDtypeStruct((Bm, Tm, Dm), jnp.float32),
            jax.ShapeDtypeStruct((Dm, Vm), jnp.float32),
            jax.ShapeDtypeStruct((Bm, Tm), jnp.int32))

    def temp_bytes(fn):
        def loss(h, w, t):
            logp, ent = fn(h, w, t)
            return jnp.sum(logp) + 0.01 * jnp.sum(ent)
        grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        return grad.lower(*args).compile().memory_analysis().temp_size_in_bytes

    full = temp_bytes(lambda h, w, t: lm_head.full_logits_logprobs(h, w, t, temperature=0.7))
    chunked = temp_bytes(lambda h, w, t: lm_head.target_logprobs(
        h, w, t, temperature=0.7, with_entropy=True, chunk_size=64))
    block = Bm * 64 * Vm * 4
    assert full >= 2 * Bm * Tm * Vm * 4  # at least two full f32 logits copies
    assert chunked <= 4 * block + Dm * Vm * 4, (chunked, full)
    assert chunked * 8 < full, (chunked, full)
