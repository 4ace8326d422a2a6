"""Reward scoring every stage shares: where a reward is read, scoring texts, normalisation.

The reward of a text is the reward model's scalar head at the text's last real token — the EOS
when the response ended, the last kept token when it was cut — found by `reward_index` from the
mask alone, so it is right when `pad_id == eos_id` and for any padding (DESIGN.md pitfalls 1, 2).
Every stage that scores text (RM evaluation, PPO, DPO, best-of-N, pipelines) calls
`score_sequences` / `score_batches` with the RM checkpoint's `reward_norm`.

Normalisation (RM stage `norm.method`), stored in the RM's metadata as `reward_norm`:

* `reference`: gain and bias so rewards of samples from the frozen reference (SFT) policy have
  mean 0 and std 1 (Ziegler et al. 2019); the samples come from the sampler, never from the
  training data (DESIGN.md pitfall 8).
* `demonstrations`: a bias so demonstrations average 0, gain 1 (Stiennon et al. 2020).
* `none`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import models, sampling

NORM_METHODS = ("reference", "demonstrations", "none")



def reward_index(mask: jax.Array) -> jax.Array:
    """Index of the last real token of each row of `mask` [..., T] (int32 [...]).

    That token is the EOS when the response ended and the last kept token when it was truncated.
    It is found from the mask alone, never from token ids, so it is right when `pad_id == eos_id`
    (the real EOS has mask 1, padding 0) and for left, right or two-sided padding (the sampler's
    sequences are left-padded prompts followed by right-padded responses). A row with no real
    token gets index 0 (callers mask such rows out).
    """
    m = jnp.asarray(mask).astype(bool)
    T = m.shape[-1]
    idx = T - 1 - jnp.argmax(m[..., ::-1], axis=-1)
    return jnp.where(m.any(axis=-1), idx, 0).astype(jnp.int32)


def apply_norm(raw: jax.Array, norm: Mapping[str, Any] | None) -> jax.Array:
    """`gain * raw + bias` (identity when `norm` is None)."""
    if norm is None:
        return raw
    return raw * jnp.float32(norm["gain"]) + jnp.float32(norm["bias"])


def score_sequences(cfg: models.ModelConfig, params: dict, tokens: jax.Array, mask: jax.Array,
                    norm: Mapping[str, Any] | None = None) -> jax.Array:
    """Rewards of whole texts: tokens, mask [..., T] -> float32 [...].

    `params` hold a `score_head`. Positions are `cumsum(mask) - 1`, so a row scores the same
    however it is padded. `norm` is the checkpoint's `reward_norm` (None: raw head output).
    Pure and jittable (`cfg` static).
    """
    if "score_head" not in params:
        raise ValueError("score_sequences: params have no 'score_head' (a reward model's params "
                         "come from init_params(heads=('score',)) or an RM stage's checkpoint)")
    tokens = jnp.asarray(tokens)
    lead, T = tokens.shape[:-1], tokens.shape[-1]
    tok2 = tokens.reshape(-1, T)
    mask2 = jnp.asarray(mask).reshape(-1, T).astype(bool)
    out = models.forward(cfg, params, tok2, models.positions_from_mask(mask2), mask2,
                         want_logits=False)
    idx = reward_index(mask2)
    raw = jnp.take_along_axis(out["scores"], idx[:, None], axis=-1)[:, 0]
    return apply_norm(raw, norm).reshape(lead)


@functools.partial(jax.jit, static_argnums=(0,))
def _score_jit(cfg, params, tokens, mask, norm):
    return score_sequences(cfg, params, tokens, mask, norm)


def _norm_arrays(norm: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
    # Always a dict of f32 scalars (identity when None): one compiled scorer per shape.
    norm = norm or {"gain": 1.0, "bias": 0.0}
    return {"gain": np.float32(norm["gain"]), "bias": np.float32(norm["bias"])}


def score_batches(cfg: models.ModelConfig, params: dict, tokens: np.ndarray, mask: np.ndarray,
                  norm: Mapping[str, Any] | None = None, batch_size: int = 256) -> np.ndarray:
    """`score_sequences` over many rows in fixed-size jitted chunks (last chunk padded)."""
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    lead = tokens.shape[:-1]
    tokens = tokens.reshape(-1, tokens.shape[-1])
    mask = mask.reshape(-1, mask.shape[-1])
    n = tokens.shape[0]
    norm_arr = _norm_arrays(norm)
    out = np.zeros((n,), np.float32)
    for s in range(0, n, batch_size):
        t, m = tokens[s:s + batch_size], mask[s:s + batch_size]
        k = t.shape[0]
        if k < batch_size and n > batch_size:  # one compiled shape
            t = np.concatenate([t, np.repeat(t[-1:], batch_size - k, 0)])
            m = np.concatenate([m, np.repeat(m[-1:], batch_size - k, 0)])
        out[s:s + k] = np.asarray(_score_jit(cfg, params, t, m, norm_arr))[:k]
    return out.reshape(lead)


# ----------------------------------------------------------------------------------------------
# Normalisation.


def fit_norm(raw: np.ndarray, method: str, target_mean: float = 0.0,
             target_std: float = 1.0) -> dict[str, Any]:
    """Gain and bias from raw rewards of the normalisation set (see module docstring).

    `reference`: `raw` are rewards of reference-policy samples -> mean `target_mean`, std
    `target_std`. `demonstrations`: `raw` are rewards of demonstrations -> mean `target_mean`,
    gain 1. `none`: identity.
    """
    raw = np.asarray(raw, np.float64).ravel()
    if method not in NORM_METHODS:
        raise ValueError(f"norm.method={method!r} is not one of {NORM_METHODS}")
    if method == "none":
        return {"gain": 1.0, "bias": 0.0, "method": "none"}
    if raw.size < 2 or not np.all(np.isfinite(raw)):
        raise ValueError(f"norm.method={method!r}: need >= 2 finite rewards, got {raw.size} "
                         f"({int(np.sum(~np.isfinite(raw)))} non-finite)")
    mean = float(raw.mean())
    if method == "demonstrations":
        gain = 1.0
    else:
        std = float(raw.std())
        if std < 1e-12:
            raise ValueError("norm.method='reference': every reference sample got the same "
                             "reward, so no gain can give them std 1")
        gain = float(target_std) / std
    return {"gain": gain, "bias": float(target_mean) - gain * mean, "method": method,
            "n": int(raw.size)}


def reference_rewards(policy_cfg: models.ModelConfig, policy_params: dict,
                      rm_cfg: models.ModelConfig, rm_params: dict, prompt_tokens: np.ndarray,
                      prompt_mask: np.ndarray, rng: jax.Array, *, max_new_tokens: int,
                      eos_id: int, pad_id: int, temperature: float = 1.0, batch_size: int = 256,
                      norm: Mapping[str, Any] | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """Raw (or `norm`-ed) rewards of fresh samples of the reference policy, one per prompt row.

    prompt_tokens / prompt_mask: [N, P] left-padded. Sampling is in chunks of `batch_size` with
    keys `fold_in(rng, chunk)`; the last chunk is padded by repeating rows (one compiled shape)
    and the extra rows are dropped. Returns (rewards [N], {"ended_frac", "mean_length"}).
    """
    prompt_tokens, prompt_mask = np.asarray(prompt_tokens), np.asarray(prompt_mask)
    n = prompt_tokens.shape[0]
    bs = min(batch_size, n)
    rewards, ended, lengths = [], [], []
    norm_arr = _norm_arrays(norm)
    for c, s in enumerate(range(0, n, bs)):
        t, m = prompt_tokens[s:s + bs], prompt_mask[s:s + bs]
        k = t.shape[0]
        if k < bs:
            t = np.concatenate([t, np.repeat(t[-1:], bs - k, 0)])
            m = np.concatenate([m, np.repeat(m[-1:], bs - k, 0)])
        out = sampling.generate(policy_cfg, policy_params, t, m, jax.random.fold_in(rng, c),
                                max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                                temperature=temperature)
        r = _score_jit(rm_cfg, rm_params, out.sequence_tokens, out.sequence_mask, norm_arr)
        rewards.append(np.asarray(r)[:k])
        ended.append(np.asarray(out.ended)[:k])
        lengths.append(np.asarray(out.lengths)[:k])
    ended_a, len_a = np.concatenate(ended), np.concatenate(lengths)
    return np.concatenate(rewards), {"ended_frac": float(ended_a.mean()),
                                     "mean_length": float(len_a.mean())}


