"""Log-probs of target tokens through the LM head without materialising the full logits.

A language model's loss only needs, per position, log p(target) = z_target - logsumexp(z) (and,
for PPO's entropy bonus, H = logsumexp(z) - sum_v p_v z_v) of z = hidden @ W / temperature. The
plain way builds the whole f32 logits tensor [B, T, V] and keeps it (and its softmax) alive for
the backward pass: at a Qwen2-size vocabulary (152k) and a 4k sequence that is 2.5 GB per copy
per row. Here the sequence is cut into chunks and a custom VJP recomputes each chunk's logits in
the backward pass (the trick of Liger-Kernel's fused linear cross-entropy and of Wijmans et al.
2024, "Cut Your Losses in Large-Vocabulary Language Models"), so at most a [B, chunk, V] block of
f32 logits and one of its gradient are live at a time, forward and backward. The backward also
holds a f32 [D, V] sum of the head's gradient over chunks (XLA:CPU keeps it apart from the
output buffer): at 152k x 896 that is 519 MiB of the 610 MiB the program needs in all
(benchmarks/bench_lm_head_memory.py), against 9.3 GiB through the full logits.

The math matches `models.forward`'s logits: `hidden` (the decoder's final-norm output, already in
the compute dtype) times the head weight cast to that dtype, accumulated in float32.

    hidden = models.forward(cfg, params, tokens, pos, mask, want_logits=False)["hidden"]
    logp, ent = shifted_logprobs(params, hidden, tokens, start=P - 1, temperature=0.7,
                                 with_entropy=True)   # PPO: the head on response positions only
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

# Elements of f32 logits per chunk when `chunk_size` is not given: 2**24 floats = 64 MiB. Small
# problems (every shape in the simulated world) fit in one chunk and pay nothing for chunking.
DEFAULT_CHUNK_ELEMENTS = 2 ** 24


def head_weight(params: dict) -> tuple[jax.Array, bool]:
    """(weight, vocab_major) of the LM head: the untied `lm_head` kernel [D, V] (False), or the
    tied embedding table [V, D] (True), used in place: a transposed copy of a 152k-row table
    would cost as much memory as the chunking saves."""
    if "lm_head" in params:
        return params["lm_head"]["kernel"], False
    return params["embed"]["embedding"], True


def auto_chunk_size(batch: int, length: int, vocab: int,
                    max_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Sequence chunk so that batch * chunk * vocab <= max_elements (at least 1), with the
    chunks as even as possible (the last one is padded up to the chunk size)."""
    n_chunks = max(1, math.ceil(batch * length * vocab / max_elements))
    n_chunks = min(n_chunks, max(length, 1))
    return max(1, math.ceil(length / n_chunks))


def _w_spec(vocab_major: bool) -> str:
    return "vd" if vocab_major else "dv"


def _logits(h: jax.Array, w: jax.Array, temperature: float, vocab_major: bool) -> jax.Array:
    # Same contraction and accumulation as models.forward: [B, c, D] x [D, V] -> f32 [B, c, V].
    z = jnp.einsum(f"btd,{_w_spec(vocab_major)}->btv", h, w, preferred_element_type=jnp.float32)
    return z / temperature


def _chunk_stats(z: jax.Array, t: jax.Array, with_entropy: bool):
    """log p(t), logsumexp and (optionally) entropy of one chunk of scaled logits z [B, c, V]."""
    lse = jax.nn.logsumexp(z, axis=-1)
    logp = jnp.take_along_axis(z, t[..., None], axis=-1)[..., 0] - lse
    if not with_entropy:
        return logp, lse, None
    p = jnp.exp(z - lse[..., None])
    ent = lse - jnp.sum(p * z, axis=-1)
    return logp, lse, ent


def _split(x: jax.Array, chunk: int) -> jax.Array:
    """[B, T, ...] -> [n, B, chunk, ...], zero-padding T up to a multiple of `chunk`."""
    B, T = x.shape[:2]
    n = -(-T // chunk)
    pad = n * chunk - T
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((B, n, chunk) + x.shape[2:]), 1, 0)


def _merge(x: jax.Array, length: int) -> jax.Array:
    """[n, B, chunk, ...] -> [B, length, ...] (drops the padding `_split` added)."""
    n, B, c = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape((B, n * c) + x.shape[3:])[:, :length]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _chunked(h, w, targets, temperature, chunk, with_entropy, vocab_major):
    return _chunked_fwd(h, w, targets, temperature, chunk, with_entropy, vocab_major)[0]


def _chunked_fwd(h, w, targets, temperature, chunk, with_entropy, vocab_major):
    T = h.shape[1]
    w_c = w.astype(h.dtype)  # the compute-dtype head, as models.forward casts it

    def body(_, xs):
        h_c, t_c = xs
        z = _logits(h_c, w_c, temperature, vocab_major)
        logp, lse, ent = _chunk_stats(z, t_c, with_entropy)
        return None, (logp, lse) if ent is None else (logp, lse, ent)

    _, outs = jax.lax.scan(body, None, (_split(h, chunk), _split(targets, chunk)))
    outs = tuple(_merge(o, T) for o in outs)
    logp, lse = outs[0], outs[1]
    ent = outs[2] if with_entropy else None
    # Residuals: the inputs and per-token scalars only; logits are recomputed in the backward
    # (and the head is cast again there, not kept in the compute dtype in between).
    return (logp, ent), (h, w, targets, lse, ent)


def _chunked_bwd(temperature, chunk, with_entropy, vocab_major, res, cts):
    h, w, targets, lse, ent = res
    g_logp, g_ent = cts
    T = h.shape[1]
    g_logp = g_logp.astype(jnp.float32)
    xs = [_split(h, chunk), _split(targets, chunk), _split(lse, chunk), _split(g_logp, chunk)]
    if with_entropy:
        xs += [_split(ent, chunk), _split(g_ent.astype(jnp.float32), chunk)]
    w_c = w.astype(h.dtype)

    def body(dw, xs):
        h_c, t_c, lse_c, gl_c = xs[:4]
        z = _logits(h_c, w_c, temperature, vocab_major)
        logp_all = z - lse_c[..., None]
        p = jnp.exp(logp_all)
        onehot = jax.nn.one_hot(t_c, z.shape[-1], dtype=jnp.float32)
        # d log p_t / dz = onehot(t) - p
        dz = gl_c[..., None] * (onehot - p)
        if with_entropy:
            ent_c, ge_c = xs[4:]
            # dH / dz = -p (log p + H)
            dz = dz - ge_c[..., None] * p * (logp_all + ent_c[..., None])
        # The logits' gradient enters the two transposed matmuls in the compute dtype (f32
        # accumulation): a f32 x bf16 product would make XLA upcast the whole head to f32.
        dz = (dz / temperature).astype(h.dtype)
        f32 = jnp.float32
        dh_c = jnp.einsum(f"btv,{_w_spec(vocab_major)}->btd", dz, w_c, preferred_element_type=f32)
        # Operands in the order of the weight's layout, so no [V, chunk] transpose is made.
        if vocab_major:
            dw_c = jnp.einsum("btv,btd->vd", dz, h_c, preferred_element_type=f32)
        else:
            dw_c = jnp.einsum("btd,btv->dv", h_c, dz, preferred_element_type=f32)
        # Summed over chunks in f32 and returned in the weight's own dtype.
        return dw + dw_c, dh_c.astype(h.dtype)

    dw, dh = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32), tuple(xs))
    return _merge(dh, T), dw.astype(w.dtype), None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def target_logprobs(hidden: jax.Array, weight: jax.Array, targets: jax.Array, *,
                    vocab_major: bool = False, temperature: float = 1.0,
                    with_entropy: bool = False,
                    chunk_size: int | None = None) -> tuple[jax.Array, jax.Array | None]:
    """Per-position log p(targets) under softmax(hidden @ W / temperature), and its entropy.

    hidden: [B, T, D] in the compute dtype (the decoder's final-norm output). weight: W as
    [D, V], or as [V, D] with `vocab_major=True` (a tied embedding table); it is cast to
    hidden's dtype, as `models.forward` does. targets: [B, T] ids in [0, V). Returns
    (logp [B, T] f32, entropy [B, T] f32 or None).

    The sequence runs in chunks of `chunk_size` positions (default `auto_chunk_size`); each
    chunk's f32 logits exist only inside its step, forward and backward. Gradients flow to
    `hidden` and `weight` and equal those of the full-logits computation up to float rounding.
    Padding positions need no special care: mask the outputs (their targets must still be
    valid ids; a pad id is fine).
    """
    B, T, D = hidden.shape
    d_axis = 1 if vocab_major else 0
    if weight.ndim != 2 or weight.shape[d_axis] != D:
        want = "[V, D]" if vocab_major else "[D, V]"
        raise ValueError(f"lm_head: weight {weight.shape} is not {want} with D={D}")
    if targets.shape != (B, T):
        raise ValueError(f"lm_head: targets {targets.shape} do not match hidden {hidden.shape}")
    if not temperature > 0:
        raise ValueError(f"lm_head: temperature={temperature} must be > 0")
    V = weight.shape[1 - d_axis]
    chunk = auto_chunk_size(B, T, V) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"lm_head: chunk_size={chunk_size} must be >= 1")
    return _chunked(hidden, weight, targets.astype(jnp.int32), float(temperature), min(chunk, T),
                    bool(with_entropy), bool(vocab_major))


def head_logprobs(params: dict, hidden: jax.Array, targets: jax.Array, *,
                  temperature: float = 1.0, with_entropy: bool = False,
                  chunk_size: int | None = None) -> tuple[jax.Array, jax.Array | None]:
    """`target_logprobs` with the LM head of a model's `params` (tied or untied)."""
    weight, vocab_major = head_weight(params)
    return target_logprobs(hidden, weight, targets, vocab_major=vocab_major,
                           temperature=temperature, with_entropy=with_entropy,
                           chunk_size=chunk_size)


def shifted_logprobs(params: dict, hidden: jax.Array, tokens: jax.Array, *, start: int = 0,
                     temperature: float = 1.0, with_entropy: bool = False,
                     chunk_size: int | None = None) -> tuple[jax.Array, jax.Array | None]:
    """Next-token log-probs from position `start` on: row t scores tokens[:, start + t + 1] with
    the head applied to hidden[:, start + t] only. Shapes [B, T - 1 - start].

    `start=0` is the usual teacher-forced target shift (what ops.token_logprobs computes);
    `start=P - 1` gives the response tokens of a PPO sequence with a P-token prompt, so the head
    runs on response positions only. `hidden` is `models.forward(..., want_logits=False)`'s.
    """
    T = tokens.shape[1]
    if not 0 <= start < T - 1:
        raise ValueError(f"lm_head: start={start} must lie in [0, {T - 1}) for {T} tokens")
    return head_logprobs(params, hidden[:, start:-1], tokens[:, start + 1:],
                         temperature=temperature, with_entropy=with_entropy,
                         chunk_size=chunk_size)


def full_logits_logprobs(hidden: jax.Array, weight: jax.Array, targets: jax.Array, *,
                         vocab_major: bool = False,
                         temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """The plain computation through the full [B, T, V] f32 logits, as ops.token_logprobs does
    it: the reference for tests and benchmarks. Returns (logp, entropy)."""
    z = _logits(hidden, weight.astype(hidden.dtype), temperature, vocab_major)
    logp_all = jax.nn.log_softmax(z, axis=-1)
    logp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, entropy
