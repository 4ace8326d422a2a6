"""Binary classification data for weak-to-strong experiments: world tasks and user JSONL files.

Every source gives rows `(text, label)` with `label` in {0, 1}; `rlhf_jax.w2s` tokenizes them
(text + EOS, read at the last real token) and runs the protocol.

Tasks of the simulated world (`WORLD_TASKS`), generated deterministically from (world seed,
split, index), with the ground truth from a gold judge (`rlhf_jax.sim.judges`):

* `sentiment`: one sentence of the world's natural distribution (a demonstration's opening and
  continuation); label 1 when its VADER compound score is positive. Sentences VADER calls
  neutral (|compound| < 0.05, VADER's own neutral band) carry no sign and are dropped (counted).
* `preference`: a reward-modelling task. Two candidate responses to one opening
  (`World.comparison_candidates`) are rendered as one text, `"<prompt> <a> <sep> <prompt> <b>"`,
  where `sep` is the tokenizer's EOS token (each half reads like a finished document); label 1
  when the gold judge prefers the second response. Pairs the judge scores within `tie_margin`
  are dropped (counted).
* `form`: an opening and one candidate response (`World.comparison_candidates`: clean, or
  damaged — too short, too long, a repeated phrase, no final period); label 1 when the response
  keeps the task's form, i.e. the gold judge `vader_trap` gives it no penalty. The faults differ
  in difficulty: a missing period is one token, length needs counting, and a repeated phrase
  needs the model to compare the text with itself (the zoo's sim-0.1m caught 59% of those,
  sim-0.4m 63%). Of the tasks tried, the one where the larger zoo models did best (measured:
  see the README); on `sentiment` they did not.

Every task is balanced (half of each label) and the order of its rows is random (fixed by the
world seed), so accuracy 0.5 is chance. Splits: `train` and `test` are disjoint world streams.

User data (`load_jsonl`): one JSON object a line, `{"text": str, "label": 0 | 1}`. A malformed
row raises `UserError("file:line", what, fix)` unless `skip_bad_rows=True`, in which case it is
skipped and counted in the stats (`bad`, first messages in `bad_examples`), as the other loaders
do. Blank lines are not rows.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from rlhf_jax.errors import UserError

WORLD_TASKS = ("sentiment", "preference", "form")
SPLITS = ("train", "test")
VADER_NEUTRAL = 0.05  # VADER's own neutral band for the compound score (Hutto & Gilbert 2014)
_MAX_BAD_EXAMPLES = 20
_CHUNK = 1024  # world items generated per draw while filling a task


# ----------------------------------------------------------------------------------------------
# User JSONL


def _parse_row(line: str) -> tuple[str, int]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    for key in ("text", "label"):
        if key not in row:
            raise ValueError(f"missing field {key!r}")
    text, label = row["text"], row["label"]
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"field 'text' must be a non-empty string, got {text!r:.40}")
    # bool is an int in Python; `true` is not a label.
    if isinstance(label, bool) or label not in (0, 1):
        raise ValueError(f"field 'label' must be 0 or 1, got {label!r:.40}")
    return text, int(label)


def load_jsonl(path: str | os.PathLike, skip_bad_rows: bool = False,
               where: str = "config.task.train") -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """(texts, labels int32 [N], stats) of a `{"text", "label"}` JSONL file.

    `where` names the config field that gave the path (for a missing file). Stats: `rows`
    (non-blank lines), `kept`, `bad`, `bad_examples`, `positive_frac`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(where, f"no such file {path!r}", "give the path of a JSONL file")
    texts, labels, bad = [], [], []
    rows = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            rows += 1
            try:
                text, label = _parse_row(line)
            except ValueError as e:
                if not skip_bad_rows:
                    raise UserError(f"{path}:{lineno}", str(e),
                                    "fix the row, or set config.task.skip_bad_rows=True to skip "
                                    "and count malformed rows") from None
                bad.append(f"{path}:{lineno}: {e}")
                continue
            texts.append(text)
            labels.append(label)
    if not texts:
        raise UserError(path, f"no usable rows ({rows} rows, {len(bad)} malformed)",
                        'each line must be {"text": ..., "label": 0 or 1}')
    y = np.asarray(labels, np.int32)
    stats = {"rows": rows, "kept": len(texts), "bad": len(bad),
             "bad_examples": bad[:_MAX_BAD_EXAMPLES], "positive_frac": float(y.mean())}
    return texts, y, stats


# ----------------------------------------------------------------------------------------------
# World tasks. Each generator maps (world, judge, split, start, count) -> candidate rows
# (text, label or -1 when the row carries no label), deterministic in its arguments.


def _vader_sign(scores: np.ndarray) -> np.ndarray:
    return np.where(scores >= VADER_NEUTRAL, 1, np.where(scores <= -VADER_NEUTRAL, 0, -1))


def _sentences(world, split: str, start: int, count: int) -> list[str]:
    prompts, completions = world.demonstrations(start, count, split)
    return [f"{p} {c}" for p, c in zip(prompts, completions)]


def _gen_sentiment(world, task, split, start, count):
    from rlhf_jax.sim.judges import get_judge

    texts = _sentences(world, split, start, count)
    scores = get_judge("vader").score(texts, texts)
    return texts, _vader_sign(scores)


def _gen_preference(world, task, split, start, count):
    from rlhf_jax.sim.judges import get_judge

    items = world.comparison_candidates(start, count, 2, split)
    judge = get_judge(task["judge"])
    flat_p = [p for p, rs, _ in items for _ in rs]
    flat_r = [r for _, rs, _ in items for r in rs]
    gold = judge.score(flat_p, flat_r).reshape(-1, 2)
    diff = gold[:, 1] - gold[:, 0]
    labels = np.where(np.abs(diff) <= task["tie_margin"], -1, (diff > 0).astype(np.int64))
    sep = task["sep"]
    texts = [f"{p} {rs[0]} {sep} {p} {rs[1]}" for p, rs, _ in items]
    return texts, labels


def _gen_form(world, task, split, start, count):
    from rlhf_jax.sim.judges import get_judge

    items = world.comparison_candidates(start, count, 1, split)
    prompts = [p for p, _, _ in items]
    responses = [rs[0] for _, rs, _ in items]
    penalty = get_judge("vader_trap").penalties(responses)
    return [f"{p} {r}" for p, r in zip(prompts, responses)], (penalty == 0).astype(np.int64)


_GENERATORS: dict[str, Callable] = {"sentiment": _gen_sentiment, "preference": _gen_preference,
                                    "form": _gen_form}


def world_task(kind: str, split: str, n: int, *, seed: int = 0, judge: str = "vader",
               tie_margin: float = 0.0, sep: str = "<eos>") -> tuple[list[str], np.ndarray, dict]:
    """(texts, labels int32 [n], stats) of a balanced world task (see the module docstring).

    Rows are drawn from the world's `split` stream in order; the first n/2 of each label are
    kept (rows without a label are dropped and counted in stats["dropped"]), then shuffled with
    a generator fixed by (seed, task, split). `n` must be even.
    """
    if kind not in _GENERATORS:
        raise UserError("config.task.kind", f"{kind!r} is not a world task",
                        f"choose one of {WORLD_TASKS} or 'jsonl'")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 2 or n % 2:
        raise UserError(f"config.task.num_{split}", f"{n} rows cannot be balanced",
                        "use an even number >= 2")
    from rlhf_jax.sim.world import get_world

    world = get_world(int(seed))
    world_split = "train" if split == "train" else "test"
    task = {"judge": judge, "tie_margin": float(tie_margin), "sep": sep}
    want = n // 2
    kept: dict[int, list[str]] = {0: [], 1: []}
    drawn = dropped = 0
    while min(len(kept[0]), len(kept[1])) < want:
        if drawn > 50 * n + 10 * _CHUNK:
            raise RuntimeError(f"world task {kind!r}: {drawn} rows gave only {len(kept[0])} / "
                               f"{len(kept[1])} of labels 0 / 1")
        texts, labels = _GENERATORS[kind](world, task, world_split, drawn, _CHUNK)
        drawn += _CHUNK
        for t, y in zip(texts, labels):
            if y < 0:
                dropped += 1
            elif len(kept[int(y)]) < want:
                kept[int(y)].append(t)
    texts = kept[0] + kept[1]
    labels = np.repeat(np.asarray([0, 1], np.int32), want)
    order = np.random.default_rng([int(seed), WORLD_TASKS.index(kind), SPLITS.index(split),
                                   7]).permutation(n)
    stats = {"rows": n, "drawn": drawn, "dropped_no_label": dropped, "positive_frac": 0.5}
    return [texts[i] for i in order], labels[order], stats


def encode(tokenizer, texts: list[str], max_len: int) -> tuple[dict[str, np.ndarray], dict]:
    """Texts -> right-padded `tokens`, `mask` [N, max_len]: each text's tokens + EOS.

    The classifier reads the last real token (the EOS). A text longer than `max_len - 1`
    tokens keeps its end (its first tokens are dropped; counted in stats["truncated"]).
    """
    from rlhf_jax.data.tokenize import encode_texts, special_ids

    if max_len < 2:
        raise UserError("config.task.max_len", f"{max_len} leaves no room for a token and EOS",
                        "use >= 2")
    pad_id, eos_id = special_ids(tokenizer)
    ids = encode_texts(tokenizer, texts)
    n = len(ids)
    tokens = np.full((n, max_len), pad_id, np.int32)
    mask = np.zeros((n, max_len), np.int32)
    truncated = empty = 0
    for i, t in enumerate(ids):
        empty += not t
        if len(t) > max_len - 1:
            truncated += 1
            t = t[len(t) - (max_len - 1):]
        seq = t + [eos_id]
        tokens[i, :len(seq)] = seq
        mask[i, :len(seq)] = 1
    lengths = mask.sum(1)
    stats = {"rows": n, "truncated": truncated, "empty": empty,
             "mean_tokens": float(lengths.mean()) if n else 0.0}
    return {"tokens": tokens, "mask": mask}, stats


def load_task(task: Mapping[str, Any], eos_token: str) -> dict[str, Any]:
    """Both splits of a task config: {"train": (texts, labels), "test": (...), "stats": {...}}.

    `task` fields: kind (a world task or "jsonl"); world tasks: num_train, num_test,
    world_seed, judge, tie_margin; jsonl: train, test, skip_bad_rows. `eos_token` is the
    tokenizer's EOS string (the `preference` task's separator).
    """
    task = dict(task.to_dict() if hasattr(task, "to_dict") else task)
    out: dict[str, Any] = {"stats": {}}
    if task["kind"] == "jsonl":
        for split in SPLITS:
            if not task.get(split):
                raise UserError(f"config.task.{split}", "is empty for kind='jsonl'",
                                'give a JSONL file of {"text": ..., "label": 0 or 1} rows')
            texts, labels, stats = load_jsonl(task[split], bool(task.get("skip_bad_rows")),
                                              where=f"config.task.{split}")
            out[split] = (texts, labels)
            out["stats"][split] = stats
        return out
    for split in SPLITS:
        texts, labels, stats = world_task(
            task["kind"], split, int(task[f"num_{split}"]), seed=int(task.get("world_seed", 0)),
            judge=str(task.get("judge", "vader")), tie_margin=float(task.get("tie_margin", 0.0)),
            sep=eos_token)
        out[split] = (texts, labels)
        out["stats"][split] = stats
    return out


# ----------------------------------------------------------------------------------------------
# A task's rows, its A/B halves and encodings, cached per process (rlhf_jax.w2s's data).


@functools.lru_cache(maxsize=16)
def tokenizer(path: str):
    """The tokenizer in directory `path` (one load per process)."""
    from rlhf_jax.data.tokenize import load_tokenizer

    return load_tokenizer(path, "the model's tokenizer_dir")


@functools.lru_cache(maxsize=8)
def _task_rows(task_json: str, eos: str) -> dict:
    return load_task(json.loads(task_json)["task"], eos)


@functools.lru_cache(maxsize=16)
def _task_encoded(task_json: str, eos: str, tok_dir: str) -> dict:
    raw = _task_rows(task_json, eos)
    max_len = int(json.loads(task_json)["task"]["max_len"])
    out: dict[str, Any] = {"stats": {}}
    for split in ("train", "test"):
        out[split], out["stats"][split] = encode(tokenizer(tok_dir), raw[split][0], max_len)
    return out


class TaskData:
    """The task's rows, the A/B halves of the training split, and encodings per tokenizer.

    Rows and encodings are cached per process (keyed by the task config, the files' size and
    mtime for JSONL, and the tokenizer), so trials run in one process share them.
    """

    def __init__(self, config):
        self.kind = config.task.kind
        self.key = json.dumps({"task": config.task.to_dict(), "files": self._files(config)},
                              sort_keys=True)
        first = self._load("<eos>")
        n = len(first["train"][0])
        if n < 4:
            raise UserError("config.task", f"the training split has {n} rows",
                            "give at least 4 (two per half)")
        # The halves depend on the number of rows only, so every tokenizer sees the same split.
        perm = np.random.default_rng([int(config.seed), 1]).permutation(n)
        self.half_a, self.half_b = np.sort(perm[: n // 2]), np.sort(perm[n // 2:])
        self.stats = first["stats"]

    @staticmethod
    def _files(config) -> dict:
        if config.task.kind != "jsonl":
            return {}
        out = {}
        for split in ("train", "test"):
            path = config.task[split]
            if path and os.path.isfile(path):  # a missing file is reported by the loader
                out[split] = [os.path.abspath(path), os.path.getsize(path),
                              os.path.getmtime(path)]
        return out

    def _eos(self, eos: str) -> str:
        # Only the preference task renders the EOS token into its text.
        return eos if self.kind == "preference" else ""

    def _load(self, eos: str) -> dict:
        return _task_rows(self.key, self._eos(eos))

    def labels(self, split: str) -> np.ndarray:
        return self._load("<eos>")[split][1]

    def encoded(self, tok_dir: str) -> dict:
        return _task_encoded(self.key, self._eos(tokenizer(tok_dir).eos_token), tok_dir)

    def fingerprint(self) -> str:
        return self.key
