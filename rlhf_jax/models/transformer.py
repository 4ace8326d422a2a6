"""One decoder-only transformer for GPT-2 and the Llama family (Llama, Qwen2, Qwen3, Mistral).

The NNX module declares the parameters (shapes, initialisers, logical axis names). The math is
plain functions over the pure-dict parameter tree, so the same code runs inside pure jitted
steps (`forward(cfg, params, ...)`) and from the module (`Transformer.__call__`).

Every per-layer parameter is stacked along a leading `layers` axis. `scan_layers=True` runs the
blocks with `lax.scan` (one compiled block, fast compiles); `False` unrolls a Python loop over
the same arrays, so checkpoints never depend on that choice. Calls with a KV cache (sampling)
always unroll: each layer's cache is its own buffer, updated in place.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax import sharding
from rlhf_jax.models.config import ModelConfig

Params = dict[str, Any]

# Logical axes of the activations (rlhf_jax.sharding's rules table maps them to mesh axes while a
# step is traced under `sharding.activation_mesh`; outside one they are no-ops).
RESIDUAL = ("batch", "length", "embed")
Q_AXES = ("batch", "length", "heads", "head_dim")
KV_AXES = ("batch", "length", "kv_heads", "head_dim")
MLP_AXES = ("batch", "length", "mlp")
LOGITS_AXES = ("batch", "length", "vocab")
_constrain = sharding.constrain

_normal = nnx.initializers.normal


def _param(rngs: nnx.Rngs, init, shape, axes, dtype) -> nnx.Param:
    # Logical names only; rlhf_jax.sharding maps them to mesh axes.
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


class _Group(nnx.Module):
    """A named bag of parameters (kept as a Module so nnx.state gives nested dicts)."""

    def __init__(self, **params: nnx.Param):
        for name, p in params.items():
            setattr(self, name, p)


class Transformer(nnx.Module):
    """Decoder-only LM with an optional scalar head (reward / value) beside the LM head."""

    def __init__(self, cfg: ModelConfig, heads: tuple[str, ...] = ("lm",), *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.heads = tuple(heads)
        unknown = set(heads) - {"lm", "score"}
        if unknown:
            raise ValueError(f"unknown heads {sorted(unknown)}; use 'lm' and/or 'score'")
        pd = jnp.dtype(cfg.param_dtype)
        L, D, H, KV, Dh, F, V = (
            cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head, cfg.ff_dim,
            cfg.vocab_size,
        )
        std = 0.02
        # GPT-2's scaled init for the projections that write into the residual stream.
        resid_std = std / math.sqrt(2 * L)
        zeros, ones = nnx.initializers.zeros, nnx.initializers.ones
        p = lambda init, shape, axes: _param(rngs, init, shape, axes, pd)  # noqa: E731

        self.embed = _Group(embedding=p(_normal(std), (V, D), ("vocab", "embed")))
        if cfg.is_gpt2:
            self.pos_embed = _Group(embedding=p(_normal(0.01), (cfg.max_len, D), (None, "embed")))

        def norm(prefix_axes=("layers",), shape=(L, D)):
            g = {"scale": p(ones, shape, (*prefix_axes, "embed"))}
            if cfg.is_gpt2:
                g["bias"] = p(zeros, shape, (*prefix_axes, "embed"))
            return _Group(**g)

        def dense(shape, axes, init_std, bias_shape=None, bias_axes=None):
            g = {"kernel": p(_normal(init_std), shape, axes)}
            if bias_shape is not None:
                g["bias"] = p(zeros, bias_shape, bias_axes)
            return _Group(**g)

        qkv_bias = cfg.is_gpt2 or cfg.qkv_bias
        out_bias = cfg.is_gpt2
        layers = {
            "attn_norm": norm(),
            "q": dense((L, D, H, Dh), ("layers", "embed", "heads", "head_dim"), std,
                       (L, H, Dh) if qkv_bias else None, ("layers", "heads", "head_dim")),
            "k": dense((L, D, KV, Dh), ("layers", "embed", "kv_heads", "head_dim"), std,
                       (L, KV, Dh) if qkv_bias else None, ("layers", "kv_heads", "head_dim")),
            "v": dense((L, D, KV, Dh), ("layers", "embed", "kv_heads", "head_dim"), std,
                       (L, KV, Dh) if qkv_bias else None, ("layers", "kv_heads", "head_dim")),
            "o": dense((L, H, Dh, D), ("layers", "heads", "head_dim", "embed"), resid_std,
                       (L, D) if out_bias else None, ("layers", "embed")),
            "mlp_norm": norm(),
        }
        if cfg.qk_norm:  # Qwen3: one RMSNorm scale over head_dim, shared by all heads
            layers["q_norm"] = _Group(scale=p(ones, (L, Dh), ("layers", "head_dim")))
            layers["k_norm"] = _Group(scale=p(ones, (L, Dh), ("layers", "head_dim")))
        if cfg.is_gpt2:
            layers["fc_in"] = dense((L, D, F), ("layers", "embed", "mlp"), std, (L, F), ("layers", "mlp"))
            layers["fc_out"] = dense((L, F, D), ("layers", "mlp", "embed"), resid_std, (L, D), ("layers", "embed"))
        else:
            layers["gate"] = dense((L, D, F), ("layers", "embed", "mlp"), std)
            layers["up"] = dense((L, D, F), ("layers", "embed", "mlp"), std)
            layers["down"] = dense((L, F, D), ("layers", "mlp", "embed"), resid_std)
        self.layers = _Group(**layers)
        self.final_norm = norm(prefix_axes=(), shape=(D,))
        if "lm" in heads and not cfg.tie_embeddings:
            self.lm_head = _Group(kernel=p(_normal(std), (D, V), ("embed", "vocab")))
        if "score" in heads:
            # Reward/value head: N(0, 1/sqrt(d+1)) as in Ziegler et al. / Huang et al. 2023.
            self.score_head = _Group(
                kernel=p(_normal(1.0 / math.sqrt(D + 1)), (D,), ("embed",)),
                bias=p(zeros, (), ()),
            )

    def __call__(self, tokens, positions, mask, **kwargs):
        params = nnx.to_pure_dict(nnx.state(self, nnx.Param))
        return forward(self.cfg, params, tokens, positions, mask, **kwargs)


# ----------------------------------------------------------------------------------------------
# The math, as pure functions of (cfg, params).


def _norm(cfg: ModelConfig, p: Params, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    if cfg.is_gpt2:
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
        y = y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)
        return y.astype(x.dtype)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + cfg.norm_eps)
    # HF Llama/Qwen2: normalise in f32, cast back, then scale.
    return p["scale"].astype(x.dtype) * y.astype(x.dtype)


def _rope_inv_freq(cfg: ModelConfig, dh: int) -> jax.Array:
    """RoPE's inverse frequencies [dh/2], with Llama 3's frequency-dependent scaling if set."""
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
    if cfg.rope_type == "llama3":
        # Long wavelengths (low frequencies) are stretched by `factor`, short ones kept, the band
        # between interpolated (as Hugging Face's `_compute_llama3_parameters`).
        factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old_len = cfg.rope_original_max_len
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = jnp.where(medium, smoothed, scaled)
    return inv_freq


def _rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding in the rotate-half layout that Hugging Face Llama checkpoints use."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, dh]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


def _positional_qk(cfg: ModelConfig, lp: Params, q: jax.Array, k: jax.Array, positions):
    """q and k [B, T, heads, head_dim] after Qwen3's per-head RMSNorm (if `cfg.qk_norm`) and RoPE."""
    if cfg.qk_norm:
        q, k = _norm(cfg, lp["q_norm"], q), _norm(cfg, lp["k_norm"], k)
    inv_freq = _rope_inv_freq(cfg, q.shape[-1])
    return _rope(q, positions, inv_freq), _rope(k, positions, inv_freq)


def _specs(x_ndim: int, k_ndim: int, n_in: int) -> tuple[str, str, str]:
    """einsum specs of y = x . kernel (x's last `n_in` dims contracted), of dx and of dkernel."""
    lead, ins, outs = "abcd"[:x_ndim - n_in], "pq"[:n_in], "uvwxyz"[:k_ndim - n_in]
    return (f"{lead}{ins},{ins}{outs}->{lead}{outs}", f"{lead}{outs},{ins}{outs}->{lead}{ins}",
            f"{lead}{ins},{lead}{outs}->{ins}{outs}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _low_precision_project(x, kernel, bias, n_in: int, dtype: str):
    """x . kernel (+ bias) with both operands in `dtype` (bf16 / f16), accumulated and biased in
    f32, returned in `dtype`; the backward's matmuls take the same form.

    XLA:CPU's library matmuls run bf16 x bf16 -> f32 1.5-2.0x faster than f32 on a CPU with
    avx512_bf16, but bf16 x bf16 -> bf16 14-17% slower than f32 (issue 13, measured); autodiff of
    a plain einsum gives the backward's two matmuls the slow form and sums the bias gradient in
    bf16 (a slow reduce-window on CPU). The kernel gradient is accumulated in f32 and returned
    in the kernel's own dtype (f32 master weights get an f32 gradient).
    """
    return _low_precision_project_fwd(x, kernel, bias, n_in, dtype)[0]


def _low_precision_project_fwd(x, kernel, bias, n_in, dtype):
    spec = _specs(x.ndim, kernel.ndim, n_in)[0]
    xc, kc = x.astype(dtype), kernel.astype(dtype)
    y = jnp.einsum(spec, xc, kc, preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    # Zero-size carriers of the primal dtypes: the cotangents must come back in them.
    like = [None if a is None else jnp.zeros((0,), a.dtype) for a in (x, kernel, bias)]
    return y.astype(dtype), (xc, kc, *like)


def _low_precision_project_bwd(n_in, dtype, res, g):
    xc, kc, x_like, k_like, b_like = res
    _, spec_dx, spec_dk = _specs(xc.ndim, kc.ndim, n_in)
    g = g.astype(dtype)
    dx = jnp.einsum(spec_dx, g, kc, preferred_element_type=jnp.float32).astype(x_like.dtype)
    dk = jnp.einsum(spec_dk, xc, g, preferred_element_type=jnp.float32).astype(k_like.dtype)
    if b_like is None:
        return dx, dk, None
    lead = tuple(range(xc.ndim - n_in))
    return dx, dk, jnp.sum(g.astype(jnp.float32), axis=lead).astype(b_like.dtype)


_low_precision_project.defvjp(_low_precision_project_fwd, _low_precision_project_bwd)


def _project(x: jax.Array, kernel: jax.Array, spec: str, dtype,
             bias: jax.Array | None = None, lora: Params | None = None) -> jax.Array:
    """einsum(spec, x, kernel) (+ bias) in the compute dtype `dtype`; `spec` contracts the last
    dims of x with the first of kernel ("btd,df->btf", "btnh,nhd->btd").

    `lora`: a low-rank adapter of this projection ({"lora_a", "lora_b", "lora_scale"}, see
    `rlhf_jax.models.lora`), added as `scale * (x . A) . B`. The kernel is then read only, never
    differentiated by a LoRA step (its gradient is not part of the trained tree).
    """
    dtype = jnp.dtype(dtype)
    n_in = len(spec.split(",")[0].replace("...", "")) - 2  # leading dims: b, t
    if dtype != jnp.float32:
        y = _low_precision_project(x, kernel, bias, n_in, dtype.name)
    else:
        y = jnp.einsum(spec, x, kernel.astype(dtype))
        y = y if bias is None else y + bias.astype(dtype)
    return y if lora is None else y + _lora_delta(lora, x, n_in, dtype)


def _lora_delta(lora: Params, x: jax.Array, n_in: int, dtype) -> jax.Array:
    """scale * (x . A) . B: A [in..., r] contracts x's last `n_in` dims, B [r, out...]."""
    t = jnp.tensordot(x.astype(dtype), lora["lora_a"].astype(dtype), axes=n_in)
    d = jnp.tensordot(t, lora["lora_b"].astype(dtype), axes=1)
    return (d * lora["lora_scale"].astype(dtype)).astype(dtype)


def _lora_of(p: Params) -> Params | None:
    return p if "lora_a" in p else None


def _dense(p: Params, x: jax.Array, spec: str, dtype) -> jax.Array:
    return _project(x, p["kernel"], spec, dtype, p.get("bias"), _lora_of(p))


# Below this many tokens per call (decode steps), projections stay separate matmuls: stacking
# their kernels copies the weights, which then costs more than one wider matmul saves. The
# sampler instead stacks them once per call, outside its decode loop (`decode_params`).
_FUSE_MIN_TOKENS = 256

# Same-shaped projections that run as one matmul, and the name of their stacked kernel.
_GROUPS = {"qkv": ("q", "k", "v"), "kv": ("k", "v"), "gate_up": ("gate", "up")}


def _stack_group(ps: list[Params]) -> Params:
    """Kernels [D, ...] of same-shaped projections stacked on a new axis 1: [D, c, ...].

    A new axis (not a concatenation along heads/mlp) keeps each kernel's sharding intact, so no
    collective is needed.
    """
    group = {"kernel": jnp.stack([p["kernel"] for p in ps], axis=1)}
    if "bias" in ps[0]:
        group["bias"] = jnp.stack([p["bias"] for p in ps])
    return group


def _dense_group(lp: Params, group: str, x: jax.Array, dtype) -> list[jax.Array]:
    """The projections of `_GROUPS[group]` of `x`, as one matmul over their stacked kernels.

    The parameter tree is unchanged: kernels are stacked at run time, or taken pre-stacked from
    `lp[group]` when `decode_params` put them there. On CPU the stacked form runs ~20% faster
    under autodiff: one wider matmul, and the backward writes one stacked gradient that XLA
    transposes with a plain copy instead of fusing the elementwise backward into a strided
    transposing copy.
    """
    ps = [lp[name] for name in _GROUPS[group]]
    stacked = lp.get(group)
    if stacked is None:
        if x.shape[0] * x.shape[1] < _FUSE_MIN_TOKENS:
            return [_dense(p, x, "btd,d...->bt...", dtype) for p in ps]
        stacked = _stack_group(ps)
    y = _project(x, stacked["kernel"], "btd,dc...->btc...", dtype, stacked.get("bias"))
    # LoRA adapters (if any) stay per projection: the stacked kernels are the base's.
    return [y[:, :, i] if _lora_of(p) is None else y[:, :, i] + _lora_delta(p, x, 1, dtype)
            for i, p in enumerate(ps)]


def _dropout(x, rate, rng):
    if rng is None or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _block(cfg: ModelConfig, lp: Params, x, positions, attn_mask, kv=None, cache_index=None,
           rng=None):
    """One pre-norm transformer block. `kv` is this layer's (k_cache, v_cache) or None."""
    dtype = jnp.dtype(cfg.dtype)
    h = _norm(cfg, lp["attn_norm"], x)
    if cfg.kv_heads == cfg.n_heads:
        q, k, v = _dense_group(lp, "qkv", h, dtype)
    else:  # grouped-query attention: q has more heads than k/v
        q = _dense(lp["q"], h, "btd,dnh->btnh", dtype)
        k, v = _dense_group(lp, "kv", h, dtype)
    if not cfg.is_gpt2:
        q, k = _positional_qk(cfg, lp, q, k, positions)
    q = _constrain(q, Q_AXES)
    k, v = _constrain(k, KV_AXES), _constrain(v, KV_AXES)
    new_kv = None
    if kv is None:
        attn = jax.nn.dot_product_attention(q, k, v, mask=attn_mask)
    else:
        # Cache layout [B, kv_heads, S, head_dim]: XLA:CPU runs the per-(batch, head) score and
        # value matmuls of a decode step ~10x faster with S next to head_dim than with
        # dot_product_attention on [B, S, kv_heads, head_dim].
        k_cache, v_cache = kv
        k_new = jnp.swapaxes(k, 1, 2).astype(k_cache.dtype)
        v_new = jnp.swapaxes(v, 1, 2).astype(v_cache.dtype)
        k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k_new, cache_index, 2)
        v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v_new, cache_index, 2)
        new_kv = (k_cache, v_cache)  # this layer's updated buffers
        B, T, N, Dh = q.shape
        KV = k_cache.shape[1]
        qg = q.reshape(B, T, KV, N // KV, Dh).transpose(0, 2, 3, 1, 4)  # [B, KV, G, T, Dh]
        s = jnp.einsum("bkgth,bksh->bkgts", qg, k_cache.astype(dtype),
                       preferred_element_type=jnp.float32) / math.sqrt(Dh)
        s = jnp.where(attn_mask[:, :, None], s, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(s, axis=-1).astype(dtype)
        o = jnp.einsum("bkgts,bksh->bkgth", p, v_cache.astype(dtype))
        attn = o.transpose(0, 3, 1, 2, 4).reshape(B, T, N, Dh)
    attn = _constrain(attn, Q_AXES)
    attn_out = _dense(lp["o"], attn, "btnh,nhd->btd", dtype)
    r1, r2 = (None, None) if rng is None else tuple(jax.random.split(rng))
    x = _constrain(x + _dropout(attn_out, cfg.dropout, r1), RESIDUAL)
    h = _norm(cfg, lp["mlp_norm"], x)
    if cfg.is_gpt2:
        m = jax.nn.gelu(_dense(lp["fc_in"], h, "btd,df->btf", dtype), approximate=True)
        m = _dense(lp["fc_out"], _constrain(m, MLP_AXES), "btf,fd->btd", dtype)
    else:
        gate, up = _dense_group(lp, "gate_up", h, dtype)
        m = _constrain(jax.nn.silu(gate) * up, MLP_AXES)
        m = _dense(lp["down"], m, "btf,fd->btd", dtype)
    x = _constrain(x + _dropout(m, cfg.dropout, r2), RESIDUAL)
    return x, new_kv


def _attention_mask(q_slots, k_slots, k_mask, q_seg=None, k_seg=None):
    """Boolean [B, 1, T, S] mask: causal by slot index, keys must be real tokens, same segment.

    Slots are array indices (not position ids), so left padding stays causal-correct. A query
    may always see its own slot, which keeps rows of pad queries finite (they are masked later).
    """
    causal = k_slots[None, None, :] <= q_slots[None, :, None]  # [1, T, S]
    allowed = causal & k_mask[:, None, :]
    if q_seg is not None:
        allowed = allowed & (q_seg[:, :, None] == k_seg[:, None, :])
    allowed = allowed | (k_slots[None, None, :] == q_slots[None, :, None])
    return allowed[:, None, :, :]


def forward(
    cfg: ModelConfig,
    params: Params,
    tokens: jax.Array,
    positions: jax.Array,
    mask: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    cache: dict | None = None,
    cache_index: jax.Array | int | None = None,
    want_logits: bool = True,
    dropout_rng: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Run the decoder.

    tokens, positions, mask: [B, T]. `mask` marks real tokens (left or right padding both
    work); `positions` are the position ids (`cumsum(mask) - 1` for left-padded rows).
    segment_ids: [B, T] for packed rows (no attention across segments).
    cache: from `init_cache`; the T new tokens are written at slots `cache_index ...` and attend
    to every earlier valid slot. `params` may be the `decode_params` layout. Returns {"hidden", "logits"?, "scores"?, "cache"?}.
    """
    dtype = jnp.dtype(cfg.dtype)
    B, T = tokens.shape
    mask = mask.astype(bool)
    x = params["embed"]["embedding"].astype(dtype)[tokens]
    if cfg.is_gpt2:
        x = x + params["pos_embed"]["embedding"].astype(dtype)[positions]
    dropout_rng = dropout_rng if cfg.dropout > 0 else None
    if dropout_rng is not None:
        dropout_rng, r = jax.random.split(dropout_rng)
        x = _dropout(x, cfg.dropout, r)
    x = _constrain(x, RESIDUAL)

    if cache is None:
        slots = jnp.arange(T)
        attn_mask = _attention_mask(slots, slots, mask, segment_ids, segment_ids)
    else:
        if segment_ids is not None:
            raise ValueError("segment_ids (packing) cannot be combined with a KV cache")
        key_mask = jax.lax.dynamic_update_slice_in_dim(cache["mask"], mask, cache_index, 1)
        S = key_mask.shape[1]
        attn_mask = _attention_mask(cache_index + jnp.arange(T), jnp.arange(S), key_mask)

    block = lambda lp, x, kv, rng: _block(cfg, lp, x, positions, attn_mask, kv, cache_index, rng)  # noqa: E731
    if cfg.remat == "full":
        block = jax.checkpoint(block)
    elif cfg.remat == "dots":
        block = jax.checkpoint(block, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)

    layer_rngs = None if dropout_rng is None else jax.random.split(dropout_rng, cfg.n_layers)
    per_layer = isinstance(params["layers"], (list, tuple))  # from decode_params
    new_k, new_v = [], []
    if cfg.scan_layers and cache is None and not per_layer:
        def body(x, xs):
            lp, rng = xs
            x, _ = block(lp, x, None, rng)
            return x, None
        x, _ = jax.lax.scan(body, x, (params["layers"], layer_rngs))
    else:
        # Unrolled. With a cache, always: each layer's cache is its own buffer, updated in place
        # (a scan would slice a stacked cache per layer, copying it every step: the slowest part
        # of a decode step on CPU).
        for i in range(cfg.n_layers):
            lp = params["layers"][i] if per_layer else jax.tree.map(lambda a: a[i], params["layers"])
            kv = None if cache is None else (cache["k"][i], cache["v"][i])
            x, nkv = block(lp, x, kv, None if layer_rngs is None else layer_rngs[i])
            if nkv is not None:
                new_k.append(nkv[0])
                new_v.append(nkv[1])

    hidden = _norm(cfg, params["final_norm"], x)
    out: dict[str, jax.Array] = {"hidden": hidden}
    if want_logits:
        out["logits"] = lm_logits(cfg, params, hidden)
    if "score_head" in params:
        sh = params["score_head"]
        out["scores"] = (
            jnp.einsum("btd,d->bt", hidden, sh["kernel"].astype(dtype), preferred_element_type=jnp.float32)
            + sh["bias"].astype(jnp.float32)
        )
    if cache is not None:
        out["cache"] = {"k": tuple(new_k), "v": tuple(new_v), "mask": key_mask}
    return out


def lm_head_weight(cfg: ModelConfig, params: Params) -> jax.Array:
    """The [D, V] LM head: its own kernel, or the transposed embedding when tied."""
    w = params["lm_head"]["kernel"] if "lm_head" in params else params["embed"]["embedding"].T
    return w.astype(jnp.dtype(cfg.dtype))


def lm_logits(cfg: ModelConfig, params: Params, hidden: jax.Array) -> jax.Array:
    """float32 logits [..., V] of final hidden states [..., D] (any subset of positions)."""
    logits = jnp.einsum("...d,dv->...v", hidden.astype(jnp.dtype(cfg.dtype)),
                        lm_head_weight(cfg, params), preferred_element_type=jnp.float32)
    if logits.ndim == 3:
        logits = _constrain(logits, LOGITS_AXES)
    return logits


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: str | None = None) -> dict:
    """An empty KV cache: per layer, k and v [B, kv_heads, S, head_dim]; a key-valid mask [B, S].

    `k` and `v` are tuples with one buffer per layer (not one stacked array), so a decode step
    updates each layer's buffer in place instead of slicing and copying a stacked cache.
    """
    dt = jnp.dtype(dtype or cfg.dtype)
    shape = (batch, cfg.kv_heads, max_len, cfg.dim_per_head)
    layers = lambda: tuple(jnp.zeros(shape, dt) for _ in range(cfg.n_layers))  # noqa: E731
    return {"k": layers(), "v": layers(), "mask": jnp.zeros((batch, max_len), bool)}


def grow_cache(cache: dict, max_len: int) -> dict:
    """The same cache with room for `max_len` slots (new slots empty and masked out)."""
    grow = max_len - cache["mask"].shape[1]
    if grow < 0:
        raise ValueError(f"grow_cache: the cache already holds {cache['mask'].shape[1]} > {max_len} slots")
    pad = lambda a, axis: jnp.pad(a, [(0, grow if d == axis else 0) for d in range(a.ndim)])  # noqa: E731
    return {"k": tuple(pad(a, 2) for a in cache["k"]), "v": tuple(pad(a, 2) for a in cache["v"]),
            "mask": pad(cache["mask"], 1)}


# Logical axes of one layer's k or v buffer, and of the key mask.
CACHE_LAYER_AXES = ("batch", "kv_heads", "length", "head_dim")
CACHE_MASK_AXES = ("batch", "length")


def cache_axes(cfg: ModelConfig) -> dict:
    """Logical axis names of every `init_cache` array, as a tree of the same structure."""
    layers = (CACHE_LAYER_AXES,) * cfg.n_layers
    return {"k": layers, "v": layers, "mask": CACHE_MASK_AXES}


def decode_params(cfg: ModelConfig, params: Params) -> Params:
    """`params` laid out for many small forward calls (a sampler's decode steps).

    Layers become a tuple of per-layer trees, with q/k/v (or k/v) and gate/up kernels stacked
    into one matmul each. Call it once, outside the decode loop: inside, every step would slice
    and stack the weights again. Same math as `params`; `forward` takes either.
    """
    attn_group = "qkv" if cfg.kv_heads == cfg.n_heads else "kv"
    layers = []
    for i in range(cfg.n_layers):
        lp = jax.tree.map(lambda a: a[i], params["layers"])
        lp[attn_group] = _stack_group([lp[n] for n in _GROUPS[attn_group]])
        if not cfg.is_gpt2:
            lp["gate_up"] = _stack_group([lp["gate"], lp["up"]])
        layers.append(lp)
    return dict(params, layers=tuple(layers))
