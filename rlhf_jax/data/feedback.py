"""Binary feedback: unpaired (prompt, completion, desirable?) examples, what KTO learns from.

Two ways in:

* `from_comparisons`: each ranking's best response becomes a desirable example and its worst
  an undesirable one (Ethayarajh et al. 2024 turn preference data into KTO data this way), so
  KTO can read every comparison source the RM and DPO read.
* `read_jsonl`: JSON lines, one example a line,

      {"prompt": "the movie was", "completion": " a delight.", "label": true}

  `label` is a JSON boolean (true = desirable, thumbs-up); `prompt` and `completion` are
  strings, the completion non-empty. Blank lines are skipped. Any other row raises one
  `DataFormatError` (a `UserError`) naming `file:line` and what is wrong with it. A data source
  `{"kind": "feedback_jsonl", "train": [files], "eval": [files]}` serves such files
  (`rlhf_jax.data.sources.FeedbackFileSource`).

`mismatched` pairs each example's prompt with another example's completion: the rows whose
log-ratio estimates KTO's reference point KL(π || π_ref).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rlhf_jax.errors import UserError


class DataFormatError(UserError):
    """A malformed feedback row; `where` is `file:line`."""


FIX = 'each line must be {"prompt": str, "completion": str, "label": true|false}'


def read_jsonl(path: str | Path) -> list[dict]:
    """Examples `{"prompt", "completion", "desirable"}` of one binary-feedback JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(str(path), "no such file", "check config.data.source")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(where, f"not JSON ({e.msg})", FIX) from None
        if not isinstance(row, dict):
            raise DataFormatError(where, f"a {type(row).__name__}, not an object", FIX)
        missing = [k for k in ("prompt", "completion", "label") if k not in row]
        if missing:
            raise DataFormatError(where, f"missing {missing}", FIX)
        if not isinstance(row["label"], bool):
            raise DataFormatError(where, f"label {row['label']!r} is not true or false", FIX)
        if not isinstance(row["prompt"], str) or not isinstance(row["completion"], str):
            raise DataFormatError(where, "prompt and completion must be strings", FIX)
        if not row["completion"].strip():
            raise DataFormatError(where, "the completion is empty", FIX)
        out.append({"prompt": row["prompt"], "completion": row["completion"],
                    "desirable": row["label"]})
    if not out:
        raise UserError(str(path), "holds no examples", FIX)
    return out


def from_comparisons(records: Sequence[dict]) -> tuple[list[dict], dict]:
    """(examples, stats): the best-ranked response of each comparison as desirable and the
    worst-ranked as undesirable (the first of tied ones; gold scores kept when present)."""
    out = []
    for r in records:
        ranks = [int(x) for x in r["ranks"]]
        for desirable, i in ((True, ranks.index(min(ranks))), (False, ranks.index(max(ranks)))):
            ex = {"prompt": r["prompt"], "completion": r["responses"][i], "desirable": desirable}
            if "gold" in r:
                ex["gold"] = float(r["gold"][i])
            out.append(ex)
    return out, stats_of(out)


def stats_of(examples: Sequence[dict]) -> dict:
    d = sum(bool(e["desirable"]) for e in examples)
    return {"examples": len(examples), "desirable": d, "undesirable": len(examples) - d}


def mismatched(examples: Sequence[dict], seed: int) -> list[str]:
    """For each example, the completion of another example: a random cycle through the
    examples, so every example is used once and never with its own completion."""
    n = len(examples)
    if n < 2:
        raise UserError("data", f"{n} feedback example(s)", "KTO needs at least two")
    order = np.random.default_rng(seed).permutation(n)
    out = [""] * n
    for j, i in enumerate(order):
        out[i] = examples[order[(j + 1) % n]]["completion"]
    return out
