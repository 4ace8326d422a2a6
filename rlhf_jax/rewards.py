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

from rlhf_jax import models, ops, sampling
from rlhf_jax.errors import UserError

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


def apply_eos_trick(scores: jax.Array, ended: jax.Array, no_eos_score: float | None) -> jax.Array:
    """Replace the RM score of responses that never produced EOS by `no_eos_score`.

    Ziegler et al. 2019 give -1 to continuations without a period; Huang et al. 2023 call this
    the "EOS trick": fixed-length sampling can then still teach the policy to end its response.
    `None` keeps the RM score (read at the last token) for truncated responses.
    """
    if no_eos_score is None:
        return scores
    return jnp.where(ended, scores, jnp.asarray(no_eos_score, scores.dtype))


@functools.partial(jax.jit, static_argnums=(0,))
def _score_jit(cfg, params, tokens, mask, norm):
    return score_sequences(cfg, params, tokens, mask, norm)


def _norm_arrays(norm: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
    # Always a dict of f32 scalars (identity when None): one compiled scorer per shape.
    norm = norm or {"gain": 1.0, "bias": 0.0}
    return {"gain": np.float32(norm["gain"]), "bias": np.float32(norm["bias"])}


def score_batches(cfg: models.ModelConfig, params: dict, tokens: np.ndarray, mask: np.ndarray,
                  norm: Mapping[str, Any] | None = None, batch_size: int = 256,
                  place=None) -> np.ndarray:
    """`score_sequences` over many rows [..., T] in fixed-size jitted chunks (last chunk padded).

    `place` (a Trainer) splits each chunk over the mesh's batch axes and gathers the scores on
    every process; without it the chunks run on the default device.
    """
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    lead = tokens.shape[:-1]
    norm_arr = _norm_arrays(norm)

    def one(chunk, start):
        if place is not None:
            chunk = place.shard_rows(chunk)
        return _score_jit(cfg, params, chunk["tokens"], chunk["mask"], norm_arr)

    flat = {"tokens": tokens.reshape(-1, tokens.shape[-1]), "mask": mask.reshape(-1, mask.shape[-1])}
    return ops.batched(one, flat, batch_size, ops.row_multiple(place)).astype(np.float32).reshape(lead)


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
        raise UserError("config.norm.method", f"{method!r} is not a normalisation",
                        f"use one of {NORM_METHODS}")
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
                      norm: Mapping[str, Any] | None = None,
                      place=None) -> tuple[np.ndarray, dict[str, float]]:
    """Raw (or `norm`-ed) rewards of fresh samples of the reference policy, one per prompt row.

    prompt_tokens / prompt_mask: [N, P] left-padded. Sampling is in chunks of `batch_size`, the
    chunk starting at row s with key `fold_in(rng, s)`; the last chunk is padded by repeating
    rows (one compiled shape) and the extra rows are dropped. Returns (rewards [N],
    {"ended_frac", "mean_length"}).
    """
    norm_arr = _norm_arrays(norm)

    def one(chunk, start):
        if place is not None:
            chunk = place.shard_rows(chunk)
        out = sampling.generate(policy_cfg, policy_params, chunk["prompt_tokens"],
                                chunk["prompt_mask"], jax.random.fold_in(rng, start),
                                max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                                temperature=temperature,
                                mesh=None if place is None else place.mesh,
                                rules=None if place is None else place.rules)
        r = _score_jit(rm_cfg, rm_params, out.sequence_tokens, out.sequence_mask, norm_arr)
        return {"reward": r, "ended": out.ended, "length": out.lengths}

    res = ops.batched(one, {"prompt_tokens": prompt_tokens, "prompt_mask": prompt_mask},
                      batch_size, ops.row_multiple(place))
    return res["reward"], {"ended_frac": float(res["ended"].mean()),
                           "mean_length": float(res["length"].mean())}
