"""Jitted autoregressive sampling with a KV cache.

`generate` runs one compiled program per (model config, shapes, sampling settings):

1. **Prefill.** The left-padded prompt batch, minus its last column, goes through the decoder
   in one forward pass that fills the KV cache (no logits are computed for it).
2. **Decode.** A `lax.while_loop` of at most `max_new_tokens` single-token steps. Step `i` feeds
   one token (the last prompt token at `i = 0`, then the token sampled at step `i - 1`) at cache
   slot `P - 1 + i`, reads its logits and samples the next token. The loop stops early once
   every row has produced EOS; the output arrays always have `max_new_tokens` columns.
3. **Growing cache.** The decode loop runs in phases of 8, 8, 16, 32, ... steps; each phase's
   cache holds only the slots filled by its end, so a step's attention reads at most twice the
   slots in use rather than the whole cache (attention over the cache is memory-bound: on CPU
   this made sampling ~1.5x faster at 1M parameters). The weights are laid out once per call
   for the decode steps (`models.decode_params`: per-layer, q/k/v and gate/up stacked).

Feeding the last prompt token inside the loop, rather than taking its logits from the prefill,
keeps the LM head out of the prefill (it would cost `P x vocab` per row for one useful row).

Position ids are `cumsum(prompt_mask) - 1` over the prompt and continue from the row's real
prompt length, so a left-padded row gets exactly the tokens and log-probs it gets alone.

Log-probs. `logprobs[b, i]` is `log_softmax(logits / T)` at the sampled token, where `T` is the
sampling temperature (`T = 1` when `temperature == 0`, i.e. greedy), computed *before* top-k /
top-p truncation. That is the quantity a trainer recomputes from a teacher-forced forward pass
(Ziegler et al. 2019; Huang et al. 2023, "temperature-scaled log-probs"), so the sampler/trainer
log-prob gap measures numerics, not the truncation.

Drawing. One uniform per row, inverted through the CDF of the (filtered) softmax: exact
categorical sampling with B random numbers per step instead of the B x vocab Gumbels of
`jax.random.categorical` (~10x cheaper on CPU). The key for step `i` is `fold_in(rng, i)`, so a
given `rng` always gives the same samples, on any mesh (threefry keys are partitionable).

EOS. Each row stops at its first EOS: that EOS is kept with `mask = 1`; every later position
holds `pad_id`, `mask = 0` and log-prob 0. This also holds when `pad_id == eos_id`, where only
`mask` tells the real EOS from padding.
"""

from __future__ import annotations

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sharding
from rlhf_jax.models import (
    ModelConfig, cache_axes, decode_params, forward, init_cache, positions_from_mask,
)
from rlhf_jax.models import grow_cache as grow_cache_to

__all__ = ["SampleOutput", "generate", "sample_logits"]


@flax.struct.dataclass
class SampleOutput:
    """What `generate` returns (a pytree; every field is a `jax.Array`).

    tokens, logprobs, mask: [B, N] response (N = max_new_tokens); mask is 1 up to and including
        the first EOS, tokens after it are `pad_id` and their log-probs 0.
    ended: [B] bool, the row produced EOS within N tokens.
    lengths: [B] int32, number of response tokens with mask 1 (EOS included).
    sequence_tokens, sequence_mask, sequence_positions: [B, P + N], prompt followed by response,
        ready for a teacher-forced forward pass (reward model, value, reference policy).
    logits: [B, N, V] float32 raw step logits, only with `return_logits=True` (else None).
    """

    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array
    ended: jax.Array
    lengths: jax.Array
    sequence_tokens: jax.Array
    sequence_mask: jax.Array
    sequence_positions: jax.Array
    logits: jax.Array | None = None


def _inverse_cdf_sample(rng: jax.Array, logits: jax.Array) -> jax.Array:
    """One draw per row from softmax(logits) by inverting the CDF with a single uniform.

    `jax.random.categorical` draws a Gumbel per vocabulary entry; on CPU that RNG work cost
    ~10x this (B x V random numbers per step instead of B). Rows with -inf entries (top-k/top-p)
    work: those entries add no mass, so they can never be picked.
    """
    probs = jax.nn.softmax(logits, axis=-1)
    cdf = jnp.cumsum(probs, axis=-1)
    total = cdf[:, -1:]
    u = jax.random.uniform(rng, total.shape, jnp.float32) * total
    # Strictly below the total mass, so the pick is a token with positive probability even when
    # rounding makes u * total == total.
    u = jnp.minimum(u, jnp.nextafter(total, jnp.zeros_like(total)))
    return jnp.sum(cdf <= u, axis=-1)



def sample_logits(
    logits: jax.Array, rng: jax.Array, *, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """Sample one token per row from float logits [B, V]; returns (tokens [B], logprobs [B]).

    `temperature == 0` is greedy (argmax). Otherwise logits are divided by the temperature, then
    restricted to the `top_k` largest (0: all) and to the smallest set whose probability reaches
    `top_p` (the nucleus, computed after top-k, as Hugging Face does); ties at a cut-off are kept.
    The returned log-prob is under the temperature-scaled, untruncated distribution (T = 1 when
    greedy); see the module docstring for why.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    if temperature == 0:
        token = jnp.argmax(logits, axis=-1)
        scaled = logits
    else:
        scaled = logits / temperature
        kept = scaled
        if 0 < top_k < vocab:
            # lax.top_k is a partial sort: cheaper than sorting the whole vocabulary.
            top_vals = jax.lax.top_k(scaled, top_k)[0]
            kept = jnp.where(scaled < top_vals[..., -1:], -jnp.inf, kept)
        else:
            top_vals = None
        if top_p < 1.0:
            # Sorted candidates: the top-k values when truncated already, else the whole row.
            desc = top_vals if top_vals is not None else -jnp.sort(-scaled, axis=-1)
            probs = jax.nn.softmax(desc, axis=-1)
            # A candidate stays if the mass strictly before it is below top_p; the first always does.
            before = jnp.cumsum(probs, axis=-1) - probs
            n_keep = jnp.maximum(jnp.sum(before < top_p, axis=-1), 1)
            threshold = jnp.take_along_axis(desc, n_keep[:, None] - 1, axis=-1)
            kept = jnp.where(scaled < threshold, -jnp.inf, kept)
        token = _inverse_cdf_sample(rng, kept)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), token[:, None], axis=-1)[:, 0]
    return token.astype(jnp.int32), logprob


def _check_args(cfg, prompt_tokens, prompt_mask, max_new_tokens, temperature, top_k, top_p,
                eos_id, pad_id):
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"generate: cfg must be a ModelConfig, got {type(cfg).__name__}")
    if prompt_tokens.ndim != 2:
        raise ValueError(f"generate: prompt_tokens must be [batch, length], got shape {prompt_tokens.shape}")
    if prompt_mask.shape != prompt_tokens.shape:
        raise ValueError(
            f"generate: prompt_mask shape {prompt_mask.shape} != prompt_tokens shape {prompt_tokens.shape}"
        )
    if not jnp.issubdtype(prompt_tokens.dtype, jnp.integer):
        raise ValueError(f"generate: prompt_tokens must be integers, got {prompt_tokens.dtype}")
    if prompt_tokens.shape[1] < 1:
        raise ValueError("generate: prompts have length 0; each row needs at least one real token")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"generate: temperature must be a finite float >= 0, got {temperature!r}")
    if not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"generate: top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"generate: top_p must be in (0, 1] (1 = off), got {top_p!r}")
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if not isinstance(value, (int, np.integer)) or not 0 <= value < cfg.vocab_size:
            raise ValueError(
                f"generate: {name}={value!r} must be an int in [0, vocab_size={cfg.vocab_size})"
            )
    total = prompt_tokens.shape[1] + max_new_tokens
    if cfg.is_gpt2 and total > cfg.max_len:
        raise ValueError(
            f"generate: prompt length {prompt_tokens.shape[1]} + max_new_tokens {max_new_tokens} = "
            f"{total} exceeds model.max_len={cfg.max_len} (GPT-2's learned position table)"
        )
    # Left padding is required (the last column is fed to the first decode step). Checked only
    # for concrete, fully addressable masks: under an outer jit the caller must guarantee it.
    if not isinstance(prompt_mask, jax.core.Tracer) and getattr(prompt_mask, "is_fully_addressable", True):
        last = np.asarray(prompt_mask)[:, -1]
        bad = np.flatnonzero(last == 0)
        if bad.size:
            raise ValueError(
                f"generate: prompts must be left-padded (prompt_mask[:, -1] == 1), but rows "
                f"{bad[:8].tolist()}{'...' if bad.size > 8 else ''} end in padding"
            )


# The decode loop runs in phases of 8, 8, 16, 32, ... steps (see `_phase_ends`).
_FIRST_PHASE = 8


def _phase_ends(n: int, grow_cache: bool) -> tuple[int, ...]:
    """The decode step at which each phase ends: 8, 16, 32, ... and finally `n`.

    A last phase shorter than half the one before is merged into it (no tiny extra compile).
    """
    if not grow_cache:
        return (n,)
    ends, end = [], _FIRST_PHASE
    while end * 3 < 2 * n:  # end < n / 1.5
        ends.append(end)
        end *= 2
    return (*ends, n)


def _normalize_rules(rules):
    """Sharding rules as nested tuples, hashable for jit's static arguments."""
    if rules is None:
        return None
    return tuple((name, tuple(t) if isinstance(t, list) else t) for name, t in rules)


def generate(
    cfg: ModelConfig,
    params: dict,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    cache_dtype: str | None = None,
    early_exit: bool = True,
    grow_cache: bool = True,
    return_logits: bool = False,
    mesh: jax.sharding.Mesh | None = None,
    rules=None,
) -> SampleOutput:
    """Sample up to `max_new_tokens` tokens after each left-padded prompt.

    prompt_tokens, prompt_mask: [B, P]; rows are left-padded (mask 0 before the prompt) and each
    row's last column is a real token. `params` must hold the LM head (`init_params(heads=("lm",
    ...))`). All settings are static: each new combination compiles once and is cached.
    `temperature=0` is greedy; `top_k=0` and `top_p=1` turn those filters off.
    `cache_dtype` defaults to the model's compute dtype. `early_exit` stops the loop when every
    row has ended (results are identical either way). `grow_cache` runs the decode loop in
    phases (8, 8, 16, 32, ... steps) whose KV cache holds only the slots filled by the phase's
    end, so early steps do not attend over the whole cache; each phase compiles its own loop,
    so `False` (one loop over the full cache) compiles faster for long outputs of large models.
    Results are identical either way. The output is deterministic for a given `rng` (and the
    same on any mesh, up to float rounding).

    Under a mesh, pass params and batch as sharded arrays (`sharding.logical_to_shardings`,
    `sharding.host_to_global`); with `mesh=` (and the run's `rules`) the KV cache is pinned to
    its logical layout `models.cache_axes` (batch over data×fsdp, kv_heads over tensor) instead
    of being left to the compiler.
    """
    prompt_tokens = jnp.asarray(prompt_tokens) if isinstance(prompt_tokens, np.ndarray) else prompt_tokens
    _check_args(cfg, prompt_tokens, prompt_mask, max_new_tokens, temperature, top_k, top_p,
                eos_id, pad_id)
    if not cfg.tie_embeddings and "lm_head" not in params:
        raise ValueError("generate: params have no 'lm_head' (init with heads=('lm', ...))")
    return _generate(
        cfg, params, prompt_tokens, prompt_mask, rng, mesh=mesh, rules=_normalize_rules(rules),
        max_new_tokens=int(max_new_tokens), eos_id=int(eos_id), pad_id=int(pad_id),
        temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
        cache_dtype=cache_dtype, early_exit=bool(early_exit), grow_cache=bool(grow_cache),
        return_logits=bool(return_logits),
    )


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=(
    "max_new_tokens", "eos_id", "pad_id", "temperature", "top_k", "top_p", "cache_dtype",
    "early_exit", "grow_cache", "return_logits", "mesh", "rules"))
def _generate(cfg, params, prompt_tokens, prompt_mask, rng, *, max_new_tokens, eos_id, pad_id,
              temperature, top_k, top_p, cache_dtype, early_exit, grow_cache, return_logits,
              mesh, rules):
    B, P = prompt_tokens.shape
    N = max_new_tokens
    prompt_tokens = prompt_tokens.astype(jnp.int32)
    prompt_mask = prompt_mask.astype(bool)
    prompt_positions = positions_from_mask(prompt_mask)
    n_prompt = prompt_mask.sum(axis=-1, dtype=jnp.int32)
    # Per-layer, pre-stacked weights, made once here rather than in every decode step.
    params = decode_params(cfg, params)

    def pin(cache):
        if mesh is None:
            return cache
        shardings = sharding.logical_to_shardings(cache_axes(cfg), mesh, rules, shapes=cache)
        return jax.lax.with_sharding_constraint(cache, shardings)

    ends = _phase_ends(N, grow_cache)
    # The last sampled token is never fed back, so a phase ending at step e needs P - 1 + e slots.
    cache = pin(init_cache(cfg, B, P - 1 + ends[0], cache_dtype))
    if P > 1:
        cache = forward(cfg, params, prompt_tokens[:, :-1], prompt_positions[:, :-1],
                        prompt_mask[:, :-1], cache=cache, cache_index=0, want_logits=False)["cache"]

    def body(carry):
        i, cache, cur, done, tokens, logprobs, mask, logits_buf = carry
        # The fed token: the last prompt token (i = 0) or the token sampled at step i - 1,
        # whose position continues the row's real prompt length.
        out = forward(cfg, params, cur[:, None], (n_prompt - 1 + i)[:, None], ~done[:, None],
                      cache=cache, cache_index=P - 1 + i)
        logits = out["logits"][:, 0]
        token, logprob = sample_logits(logits, jax.random.fold_in(rng, i),
                                       temperature=temperature, top_k=top_k, top_p=top_p)
        # Rows that already ended emit pad with mask 0; the first EOS itself keeps mask 1.
        token = jnp.where(done, pad_id, token)
        logprob = jnp.where(done, 0.0, logprob)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], i, 1)
        logprobs = jax.lax.dynamic_update_slice_in_dim(logprobs, logprob[:, None], i, 1)
        mask = jax.lax.dynamic_update_slice_in_dim(mask, ~done[:, None], i, 1)
        if return_logits:
            logits_buf = jax.lax.dynamic_update_slice_in_dim(logits_buf, logits[:, None], i, 1)
        done = done | (token == eos_id)
        return i + 1, pin(out["cache"]), token, done, tokens, logprobs, mask, logits_buf

    carry = (
        jnp.int32(0), cache, prompt_tokens[:, -1], jnp.zeros((B,), bool),
        jnp.full((B, N), pad_id, jnp.int32), jnp.zeros((B, N), jnp.float32),
        jnp.zeros((B, N), bool),
        jnp.zeros((B, N, cfg.vocab_size), jnp.float32) if return_logits else None,
    )
    for phase, end in enumerate(ends):
        if phase:  # room for this phase's slots; attention reads only these
            carry = (carry[0], pin(grow_cache_to(carry[1], P - 1 + end)), *carry[2:])

        def cond(carry, end=end):
            i, done = carry[0], carry[3]
            return (i < end) & ~jnp.all(done) if early_exit else i < end

        carry = jax.lax.while_loop(cond, body, carry)
    _, _, _, done, tokens, logprobs, mask, logits_buf = carry

    seq_mask = jnp.concatenate([prompt_mask, mask], axis=1)
    return SampleOutput(
        tokens=tokens,
        logprobs=logprobs,
        mask=mask.astype(jnp.int32),
        ended=done,
        lengths=mask.sum(axis=-1, dtype=jnp.int32),
        sequence_tokens=jnp.concatenate([prompt_tokens, tokens], axis=1),
        sequence_mask=seq_mask.astype(jnp.int32),
        sequence_positions=positions_from_mask(seq_mask),
        logits=logits_buf,
    )
