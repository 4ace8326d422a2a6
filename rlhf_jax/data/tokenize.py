"""Text -> numpy token batches for every stage (the "Batches" table of docs/ARCHITECTURE.md).

Conventions shared by all encoders:

* `tokenizer` is a Hugging Face tokenizer (`AutoTokenizer.from_pretrained(dir)`, which is also
  how the simulated world's tokenizer loads). Texts are encoded with `add_special_tokens=False`:
  no BOS is prepended anywhere, and every sequence ends with the tokenizer's EOS.
* Masks, never token ids, say where a sequence is: with `pad_id == eos_id` (GPT-2 style
  checkpoints) the real EOS is a masked-in token and the pads after it are masked out.
  Pad id = `tokenizer.pad_token_id`, or the EOS id when the tokenizer has none.
* `loss_mask[t] = 1` means token t is a *target*, predicted from position t - 1 of the same
  segment; so the first token of a segment is never a target, and in SFT the first completion
  token is (predicted from the last prompt token; pitfall 13 in DESIGN.md).
* All arrays are int32. Every encoder returns `(batch, stats)`; stats count what was truncated
  so nothing is cut silently.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from rlhf_jax.errors import UserError


def load_tokenizer(path, where: str = "config.tokenizer"):
    """`AutoTokenizer.from_pretrained(path)`, its failures re-raised as a `UserError` naming
    `where` (the config field or flag that gave `path`) instead of transformers' message."""
    import os

    from transformers import AutoTokenizer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise UserError(where, f"{path!r} is not a directory",
                        "give a Hugging Face tokenizer directory (tokenizer.json or vocab files)")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UserError(where, f"cannot load a tokenizer from {path}: {first}",
                        "give a Hugging Face tokenizer directory (tokenizer.json or vocab files)"
                        ) from e


def special_ids(tokenizer) -> tuple[int, int]:
    """(pad_id, eos_id); pad falls back to EOS for tokenizers without a pad token (GPT-2)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise UserError(name, "has no eos_token_id: every sequence must end with EOS",
                        "use a tokenizer with an EOS token (set eos_token in its config)")
    pad = getattr(tokenizer, "pad_token_id", None)
    return (eos if pad is None else int(pad)), int(eos)


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added."""
    texts = list(texts)
    if not texts:
        return []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"text {i} is {type(t).__name__}, expected str")
    return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _check_len(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _pack(segments: list[tuple[list[int], int]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Greedy in-order packing of (ids, first_target) segments into rows of `seq_len`.

    `first_target` is the offset inside the segment of its first target token (>= 1). A segment
    that does not fit the room left in a row starts a new row; none is longer than `seq_len`.
    """
    rows: list[list[tuple[list[int], int]]] = []
    room = 0
    for seg in segments:
        if len(seg[0]) > room:
            rows.append([])
            room = seq_len
        rows[-1].append(seg)
        room -= len(seg[0])
    n = max(len(rows), 0)
    out = {k: np.zeros((n, seq_len), np.int32) for k in ("tokens", "mask", "loss_mask",
                                                       "segment_ids", "positions")}
    out["tokens"][:] = pad_id
    for r, row in enumerate(rows):
        at = 0
        for s, (ids, first_target) in enumerate(row, start=1):
            m = len(ids)
            out["tokens"][r, at:at + m] = ids
            out["mask"][r, at:at + m] = 1
            out["loss_mask"][r, at + max(first_target, 1):at + m] = 1
            out["segment_ids"][r, at:at + m] = s
            out["positions"][r, at:at + m] = np.arange(m)
            at += m
    return out


def _rows(seqs: list[tuple[list[int], int]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One (ids, first_target) sequence per row, right-padded."""
    n = len(seqs)
    tokens = np.full((n, seq_len), pad_id, np.int32)
    mask = np.zeros((n, seq_len), np.int32)
    loss_mask = np.zeros((n, seq_len), np.int32)
    for i, (ids, first_target) in enumerate(seqs):
        m = len(ids)
        tokens[i, :m] = ids
        mask[i, :m] = 1
        loss_mask[i, max(first_target, 1):m] = 1
    return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}


def encode_lm(tokenizer, texts: Sequence[str], seq_len: int, pack: bool = False):
    """Pretraining batches: each text + EOS, every token after a segment's first is a target.

    Unpacked: one text per row, right-padded; longer texts are cut at `seq_len` (counted in
    stats["truncated"]). Packed: texts are concatenated in order into rows with `segment_ids`
    (1..n, 0 on pad) and `positions` restarting at 0 in each segment; a text longer than a row is
    split into row-sized pieces (stats["split"]), so no token is dropped.
    """
    _check_len("seq_len", seq_len, 2)
    pad_id, eos_id = special_ids(tokenizer)
    seqs = [ids + [eos_id] for ids in encode_texts(tokenizer, texts)]
    stats = {"examples": len(seqs), "truncated": 0, "split": 0,
             "tokens": int(sum(len(s) for s in seqs))}
    if not pack:
        stats["truncated"] = sum(len(s) > seq_len for s in seqs)
        batch = _rows([(s[:seq_len], 1) for s in seqs], seq_len, pad_id)
    else:
        segments = []
        for s in seqs:
            if len(s) > seq_len:
                stats["split"] += 1
            segments.extend((s[i:i + seq_len], 1) for i in range(0, len(s), seq_len))
        batch = _pack(segments, seq_len, pad_id)
    stats["rows"] = int(batch["tokens"].shape[0])
    return batch, stats


def _sft_example(p: list[int], c: list[int], max_len: int, stats: dict) -> tuple[list[int], int]:
    if len(c) > max_len:
        # Even the completion does not fit: keep its start (it loses the EOS); counted.
        stats["completion_truncated"] += 1
        c, p = c[:max_len], []
    elif len(p) + len(c) > max_len:
        stats["prompt_truncated"] += 1
        p = p[len(p) + len(c) - max_len:]  # keep the prompt's end, next to the completion
    if not p:
        # Without BOS nothing predicts a sequence's first token, so a completion with no prompt
        # in front loses its first token as a target.
        stats["no_prompt"] += 1
    return p + c, len(p)


def encode_sft(tokenizer, prompts: Sequence[str], completions: Sequence[str], max_len: int,
               pack: bool = False):
    """SFT batches: prompt + completion + EOS; targets are the completion tokens and the EOS.

    Over-long examples lose prompt tokens from the left (stats["prompt_truncated"]); if the
    completion + EOS alone exceed `max_len` it is cut at the right (stats["completion_truncated"]).
    `pack=True` packs examples into rows with `segment_ids` / `positions` like `encode_lm`.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"encode_sft: {len(prompts)} prompts but {len(completions)} completions")
    _check_len("max_len", max_len, 2)
    pad_id, eos_id = special_ids(tokenizer)
    p_ids = encode_texts(tokenizer, prompts)
    c_ids = encode_texts(tokenizer, completions)
    stats = {"examples": len(p_ids), "prompt_truncated": 0, "completion_truncated": 0,
             "no_prompt": 0}
    seqs = [_sft_example(p, c + [eos_id], max_len, stats) for p, c in zip(p_ids, c_ids)]
    batch = _pack(seqs, max_len, pad_id) if pack else _rows(seqs, max_len, pad_id)
    stats["rows"] = int(batch["tokens"].shape[0])
    stats["target_tokens"] = int(batch["loss_mask"].sum())
    return batch, stats


def encode_prompts(tokenizer, prompts: Sequence[str], max_prompt_len: int):
    """RL prompts, LEFT-padded so generation continues every row at the same column.

    Returns `prompt_tokens`, `prompt_mask` [B, P]. Prompts longer than P keep their last P tokens
    (stats["truncated"]). Position ids for left padding are `cumsum(mask) - 1` (pitfall 3).
    """
    _check_len("max_prompt_len", max_prompt_len)
    pad_id, _ = special_ids(tokenizer)
    ids = encode_texts(tokenizer, prompts)
    n = len(ids)
    tokens = np.full((n, max_prompt_len), pad_id, np.int32)
    mask = np.zeros((n, max_prompt_len), np.int32)
    truncated = 0
    for i, p in enumerate(ids):
        if not p:
            raise ValueError(f"prompt {i} ({prompts[i]!r}) encodes to no tokens; a policy needs "
                             "at least one token to condition on")
        if len(p) > max_prompt_len:
            truncated += 1
            p = p[-max_prompt_len:]
        tokens[i, max_prompt_len - len(p):] = p
        mask[i, max_prompt_len - len(p):] = 1
    return {"prompt_tokens": tokens, "prompt_mask": mask}, {"examples": n, "truncated": truncated}


def encode_comparisons(tokenizer, prompts: Sequence[str], responses: Sequence[Sequence[str]],
                       ranks: Sequence[Sequence[int]], max_len: int):
    """RM batches: K (prompt + response + EOS) sequences per prompt and their ranking.

    Returns `tokens`, `mask`, `response_mask` [N, K, L] (response_mask is 1 on response tokens
    and the EOS) and `rank` [N, K] (0 = best; -1 marks an absent response when rows have fewer
    than K = max responses; absent rows are all padding). All K sequences of a prompt keep the
    same prompt tokens: when the longest response does not fit, the prompt loses tokens from the
    left for all of them (stats["prompt_truncated"]); a response + EOS longer than `max_len` is
    cut at the right (stats["response_truncated"]).
    """
    n = len(prompts)
    if len(responses) != n or len(ranks) != n:
        raise ValueError(f"encode_comparisons: {n} prompts, {len(responses)} response lists, "
                         f"{len(ranks)} rank lists")
    _check_len("max_len", max_len, 2)
    pad_id, eos_id = special_ids(tokenizer)
    for i in range(n):
        k = len(responses[i])
        if k < 2:
            raise ValueError(f"comparison {i}: needs >= 2 responses, got {k}")
        if len(ranks[i]) != k:
            raise ValueError(f"comparison {i}: {k} responses but {len(ranks[i])} ranks")
        r = [int(x) for x in ranks[i]]
        if min(r) < 0 or max(r) >= k or len(set(r)) < 2:
            raise ValueError(f"comparison {i}: ranks {r} must lie in [0, {k}) and not all tie")
    K = max((len(r) for r in responses), default=2)
    p_ids = encode_texts(tokenizer, prompts)
    flat = [t for row in responses for t in row]
    r_flat = encode_texts(tokenizer, flat)
    tokens = np.full((n, K, max_len), pad_id, np.int32)
    mask = np.zeros((n, K, max_len), np.int32)
    response_mask = np.zeros((n, K, max_len), np.int32)
    rank = np.full((n, K), -1, np.int32)
    stats = {"examples": n, "prompt_truncated": 0, "response_truncated": 0, "no_prompt": 0}
    at = 0
    for i in range(n):
        rs = [ids + [eos_id] for ids in r_flat[at:at + len(responses[i])]]
        at += len(responses[i])
        longest = max(len(r) for r in rs)
        keep = max(max_len - longest, 0)
        p = p_ids[i]
        if len(p) > keep:
            stats["prompt_truncated"] += 1
            p = p[len(p) - keep:] if keep else []
        if not p:
            stats["no_prompt"] += 1
        for j, r in enumerate(rs):
            if len(r) > max_len:
                stats["response_truncated"] += 1
                r = r[:max_len]
            seq = p + r
            tokens[i, j, :len(seq)] = seq
            mask[i, j, :len(seq)] = 1
            response_mask[i, j, len(p):len(seq)] = 1
            rank[i, j] = int(ranks[i][j])
    batch = {"tokens": tokens, "mask": mask, "response_mask": response_mask, "rank": rank}
    return batch, stats
