"""Sample from a policy and judge the samples: the measurements every stage and experiment shares.

Gold judges only ever see text here — they measure, they never feed a reward.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np

from rlhf_jax import models, ops, sampling
from rlhf_jax.data import tokenize


def sample_texts(cfg: models.ModelConfig, params, tokenizer, prompts: Sequence[str], rng, *,
                 max_prompt_len: int, max_new_tokens: int, temperature: float = 1.0,
                 batch_size: int = 128) -> dict:
    """Sample one response per prompt in fixed-shape batches (one compile).

    Returns {"responses": list[str], "ended": bool[N], "lengths": int[N],
    "tokens", "mask": [N, max_new_tokens], "prompt_tokens", "prompt_mask": [N, P]}.
    The last batch is padded with repeats of the first prompt so shapes never change.
    """
    pad_id, eos_id = tokenize.special_ids(tokenizer)
    prompts = list(prompts)
    n = len(prompts)
    if n == 0:
        raise ValueError("sample_texts: no prompts")
    bs = min(batch_size, n)
    outs = []
    for start in range(0, n, bs):
        chunk = prompts[start:start + bs]
        chunk = chunk + [prompts[0]] * (bs - len(chunk))
        enc, _ = tokenize.encode_prompts(tokenizer, chunk, max_prompt_len)
        out = sampling.generate(
            cfg, params, enc["prompt_tokens"], enc["prompt_mask"], jax.random.fold_in(rng, start),
            max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id, temperature=temperature)
        out = jax.device_get(out)
        outs.append({"tokens": np.asarray(out.tokens), "mask": np.asarray(out.mask),
                     "ended": np.asarray(out.ended), "lengths": np.asarray(out.lengths),
                     "prompt_tokens": enc["prompt_tokens"], "prompt_mask": enc["prompt_mask"]})
    res = {k: np.concatenate([o[k] for o in outs])[:n] for k in outs[0]}
    res["responses"] = decode_responses(tokenizer, res["tokens"], res["mask"])
    return res


def decode_responses(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
    """Text of each response: the masked-in tokens, without the final EOS."""
    _, eos_id = tokenize.special_ids(tokenizer)
    texts = []
    for row, m in zip(np.asarray(tokens), np.asarray(mask)):
        ids = [int(t) for t, keep in zip(row, m) if keep]
        if ids and ids[-1] == eos_id:
            ids = ids[:-1]
        texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts


def judge(judge_obj, prompts: Sequence[str], samples: dict) -> dict[str, float]:
    """Mean gold score, EOS rate and mean length of `sample_texts` output."""
    gold = np.asarray(judge_obj.score(list(prompts), samples["responses"]), np.float64)
    return {
        "gold_mean": float(gold.mean()),
        "gold_std": float(gold.std()),
        "eos_rate": float(np.mean(samples["ended"])),
        "response_length": float(np.mean(samples["lengths"])),
        "_gold": gold,
    }


def sample_table(prompts: Sequence[str], responses: Sequence[str], n: int = 8, **columns) -> str:
    """A small markdown table of samples for logs (prompt | response | any score columns)."""
    names = list(columns)
    lines = ["| prompt | response | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for i in range(min(n, len(prompts))):
        vals = " | ".join(f"{float(columns[k][i]):+.3f}" for k in names)
        lines.append(f"| {prompts[i]} | {responses[i]} | {vals} |")
    return "\n".join(lines)


def sequence_kl(cfg: models.ModelConfig, params, ref_params, seq_tokens, seq_mask,
                prompt_len: int, temperature: float = 1.0, batch_size: int = 128) -> np.ndarray:
    """Per-sample k1 estimate of KL(π || π_ref) over the response: Σ_t log π − log π_ref.

    Unbiased when the samples come from π. Both log-probs use logits / temperature, the
    distribution the samples were drawn from (and the one PPO's KL penalty uses).
    """
    seq_tokens, seq_mask = np.asarray(seq_tokens), np.asarray(seq_mask)
    n = seq_tokens.shape[0]
    out = np.zeros((n,), np.float64)
    for s in range(0, n, batch_size):
        t, m = seq_tokens[s:s + batch_size], seq_mask[s:s + batch_size]
        k = t.shape[0]
        if k < batch_size and n > batch_size:  # keep one compiled shape
            t = np.concatenate([t, np.repeat(t[-1:], batch_size - k, 0)])
            m = np.concatenate([m, np.repeat(m[-1:], batch_size - k, 0)])
        out[s:s + k] = np.asarray(_kl_jit(cfg, params, ref_params, t, m, prompt_len, temperature))[:k]
    return out


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _kl_jit(cfg, params, ref_params, tokens, mask, prompt_len, temperature):
    lp, _ = ops.token_logprobs(cfg, params, tokens, mask, temperature=temperature)
    lr, _ = ops.token_logprobs(cfg, ref_params, tokens, mask, temperature=temperature)
    # Row t-1 of the log-probs scores token t: response tokens are t >= prompt_len.
    w = mask[:, 1:].astype(lp.dtype) * (jax.numpy.arange(tokens.shape[1] - 1) >= prompt_len - 1)
    return ((lp - lr) * w).sum(-1)
