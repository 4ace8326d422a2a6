"""Array operations every method shares: masked statistics, KL estimators, log-probs, chunking.

Every mean / variance is a token-weighted sum / count over the whole (global) array: under jit on
a mesh XLA reduces across devices, so the numbers do not depend on the mesh shape (DESIGN.md
pitfall 6) and padding never enters an average (pitfall 13).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import lm_head, models
from rlhf_jax.sharding import to_host


def masked_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum of `x` over the positions where `mask` is 1."""
    return jnp.sum(x * mask.astype(jnp.float32))


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `x` over the positions where `mask` is 1 (0 when the mask is empty)."""
    m = mask.astype(jnp.float32)
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def masked_var(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Population variance over the masked positions (two-pass: numerically stable)."""
    mean = masked_mean(x, mask)
    return masked_mean(jnp.square(x - mean), mask)


def masked_whiten(x: jax.Array, mask: jax.Array, *, shift_mean: bool = True,
                  eps: float = 1e-8) -> jax.Array:
    """(x - mean) / std over the masked positions of the whole batch; padding stays 0.

    `shift_mean=False` keeps the mean: the deviations from it are rescaled to unit std and the
    mean is added back (lm-human-preferences' `whiten(shift_mean=False)`, used by Ziegler et al.
    2019 on rewards so their sign is kept).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    white = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return white * mask.astype(white.dtype)


# ----------------------------------------------------------------------------------------------
# KL estimators (Schulman, "Approximating KL divergence", 2020). With samples y ~ pi and
# log r = log pi_ref(y) - log pi(y): k1 = -log r (unbiased, can be negative), k2 = (log r)^2 / 2,
# k3 = (r - 1) - log r (unbiased, never negative, low variance).


def kl_estimators(logp: jax.Array, logp_ref: jax.Array) -> dict[str, jax.Array]:
    """Per-token k1, k2, k3 estimates of KL(pi || pi_ref) for tokens sampled from pi."""
    log_ratio = logp_ref - logp
    return {
        "k1": -log_ratio,
        "k2": 0.5 * jnp.square(log_ratio),
        "k3": jnp.expm1(log_ratio) - log_ratio,
    }


def token_logprobs(cfg: models.ModelConfig, params, tokens, mask, *, positions=None,
                   segment_ids=None, temperature: float = 1.0):
    """log p(tokens[t] | tokens[<t]) for t >= 1, shape [B, T-1], plus the logits' entropy.

    Row t of the result scores token t+1 (the standard target shift). Callers weight it with
    `loss_mask[:, 1:]`, so the first response token — predicted from the last prompt token —
    is trained (pitfall 13 in DESIGN.md). The LM head runs in sequence chunks (`lm_head`), so
    the full [B, T, V] logits never exist.
    """
    if positions is None:
        positions = models.positions_from_mask(mask)
    hidden = models.forward(cfg, params, tokens, positions, mask, segment_ids=segment_ids,
                            want_logits=False)["hidden"]
    return lm_head.shifted_logprobs(params, hidden, tokens, temperature=temperature,
                                    with_entropy=True)


def target_logprobs(cfg: models.ModelConfig, params, hidden: jax.Array, targets: jax.Array, *,
                    temperature: float = 1.0, with_entropy: bool = False) -> dict[str, jax.Array]:
    """log p(target) under the LM head's logits / T at the given hidden states [B, N, D].

    Only the positions passed in go through the LM head, so a caller that needs the response's
    N tokens out of a P + N sequence pays N, not P + N, rows of the [D, V] matmul; and the head
    runs in sequence chunks with a recomputing backward (`lm_head`), so the full f32 logits are
    never held at a large vocabulary.
    """
    logp, entropy = lm_head.head_logprobs(params, hidden.astype(jnp.dtype(cfg.dtype)), targets,
                                          temperature=temperature, with_entropy=with_entropy)
    out = {"logp": logp}
    if with_entropy:
        out["entropy"] = entropy
    return out


def response_logprobs(cfg: models.ModelConfig, params, tokens: jax.Array, mask: jax.Array,
                      positions: jax.Array, prompt_len: int, *, temperature: float = 1.0,
                      with_entropy: bool = False) -> dict[str, jax.Array]:
    """Teacher-forced pass over prompt + response [B, P + N] -> per response token [B, N].

    Row t is read at sequence position P - 1 + t, whose logits predict response token t. The
    hidden states are sliced to those N positions before the LM head. Returns `logp` (of the
    response tokens under logits / T: the sampler's distribution, Ziegler et al. 2019),
    optionally `entropy`, and `scores` [B, N] when `params` hold a score head (a value head on
    the same trunk reads position P - 1 + t too).
    """
    P = prompt_len
    out = models.forward(cfg, params, tokens, positions, mask, want_logits=False)
    res = target_logprobs(cfg, params, out["hidden"][:, P - 1:-1], tokens[:, P:],
                          temperature=temperature, with_entropy=with_entropy)
    if "scores" in out:
        res["scores"] = out["scores"][:, P - 1:-1]
    return res


def sequence_logprobs(cfg: models.ModelConfig, params, tokens: jax.Array, mask: jax.Array,
                      response_mask: jax.Array, *, temperature: float = 1.0) -> jax.Array:
    """Per-token log-probs [B, T - 1] of every token given the ones before it, zero outside
    `response_mask[:, 1:]` (row t scores token t + 1). Positions are `cumsum(mask) - 1`, so any
    padding (left, right, two-sided) gives the same numbers; sum over axis 1 for a sequence's
    log-prob (DPO)."""
    positions = models.positions_from_mask(mask)
    out = models.forward(cfg, params, tokens, positions, mask, want_logits=False)
    logp = target_logprobs(cfg, params, out["hidden"][:, :-1], tokens[:, 1:],
                           temperature=temperature)["logp"]
    return logp * response_mask[:, 1:].astype(logp.dtype)


def lm_loss_sums(cfg: models.ModelConfig, params, batch) -> tuple[jax.Array, dict]:
    """Token-weighted cross-entropy as (sum, {"count", ...}) so accumulation and padding are exact."""
    logp, _ = token_logprobs(
        cfg, params, batch["tokens"], batch["mask"],
        positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
    )
    weights = batch["loss_mask"][:, 1:].astype(jnp.float32)
    nll = -jnp.sum(logp * weights)
    count = jnp.sum(weights)
    return nll, {"count": count, "loss": nll}




def row_multiple(place) -> int:
    """Rows a chunk must be a multiple of to split over `place`'s mesh (1 with no placement)."""
    return 1 if place is None else place.batch_shards


def batched(fn: Callable[[dict, int], object], arrays: Mapping[str, np.ndarray],
            batch_size: int, multiple_of: int = 1) -> object:
    """`fn(chunk, start)` over fixed-size row chunks of `arrays`, outputs concatenated on host.

    Chunks hold `batch_size` rows (fewer when there are fewer rows), rounded up to a multiple of
    `multiple_of` (a mesh's batch shards); short chunks are padded by repeating their last row,
    so a jitted `fn` compiles one shape, and the padding rows' outputs are dropped. `start` is
    the chunk's first row (for per-chunk keys). Outputs (any tree of arrays with a leading row
    dim) come to the host with `sharding.to_host`, which gathers shards of other processes.
    """
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    n = next(iter(arrays.values())).shape[0]
    if n == 0:
        raise ValueError("batched: no rows")
    bs = -(-min(batch_size, n) // multiple_of) * multiple_of
    outs = []
    for start in range(0, n, bs):
        chunk = {k: v[start:start + bs] for k, v in arrays.items()}
        k = next(iter(chunk.values())).shape[0]
        if k < bs:
            chunk = {kk: np.concatenate([v, np.repeat(v[-1:], bs - k, 0)]) for kk, v in chunk.items()}
        out = to_host(fn(chunk, start))
        outs.append(jax.tree.map(lambda x: x[:k], out))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)
