"""Real preference data sets, read from local files in their published formats.

Every format is parsed into the same record, a ranked set of responses to one prompt:

    {"prompt": str, "responses": [str, ...], "ranks": [int, ...],   # rank 0 = best
     "annotator": str, "bucket": str, "source": "file:line"}

so a pairwise row is `responses = [chosen, rejected], ranks = [0, 1]`. `prompt + response` is
the text the reward model scores (the prompt ends where the response starts, spaces included).

Formats (`FORMATS`):

* `hh_rlhf` — Anthropic HH-RLHF jsonl (optionally `.gz`): `{"chosen": dialogue, "rejected":
  dialogue}`, both `"\\n\\nHuman: ...\\n\\nAssistant: ..."`. The prompt is everything up to and
  including the last `"\\n\\nAssistant:"`; it must be the same in both dialogues.
* `summarize_comparisons` — OpenAI summarize-from-feedback `comparisons/*.json` (one JSON object
  a line): `{"info": {"id", "post", "title", "subreddit"}, "summaries": [{"text"}, {"text"}],
  "choice": 0|1, "worker", "batch", "split"}`. The prompt is the TL;DR query of Huang et al. 2024
  (`"SUBREDDIT: r/...\\n\\nTITLE: ...\\n\\nPOST: ...\\n\\nTL;DR:"`); CNN/DM rows (`info.article`)
  become `"ARTICLE\\n\\nTL;DR:"`. `worker` is the annotator and `batch` the bucket.
* `ultrafeedback` — UltraFeedback-binarized style (`.jsonl` or `.parquet`): `{"prompt",
  "chosen": [{"role", "content"}, ...], "rejected": [...]}`. Both conversations must share every
  turn but the last, which must be the assistant's; the shared turns are rendered in the HH
  format (`"\\n\\nHuman: ...\\n\\nAssistant:"`) and responses get HH's leading space, so one
  reward model sees one text format whatever the source.
* `jsonl` — generic: `{"prompt", "chosen", "rejected"}` or a K-wise ranking `{"prompt",
  "responses": [...], "ranks": [...]}`; optional `"annotator"` and `"bucket"` strings.

Bad rows raise `PreferenceDataError` (a `rlhf_jax.errors.UserError`) naming `file:line` and the
reason, unless
`skip_bad_rows=True`, which skips and counts them (`ParseStats.bad`, first messages kept in
`ParseStats.bad_examples`). Rows whose responses are all identical carry no preference: they
are dropped and counted (`ParseStats.identical`) either way. Over-long examples are cut at
tokenization, where the length is known: `rlhf_jax.data.tokenize.encode_comparisons` drops prompt
tokens from the left and counts it (the RM stage reports the count in summary.json). A split
with no usable row at all raises a `UserError` naming its files; a file that cannot be read
(corrupt gzip / parquet, not UTF-8) names the file.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from rlhf_jax.errors import UserError

__all__ = [
    "FORMATS", "ParseStats", "PreferenceDataError", "PreferenceBuilder", "build_preference_dataset",
    "parse_file", "parse_files", "parse_hh_dialogue", "render_messages", "records_from_source",
]

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_MAX_BAD_EXAMPLES = 20
_FIELDS = ("prompt", "responses", "ranks", "annotator", "bucket", "source")


class PreferenceDataError(UserError):
    """A malformed row; `where` is `file:line`."""


@dataclasses.dataclass
class ParseStats:
    """What happened to the rows of one or more files (reported in the RM stage's summary)."""

    rows: int = 0  # non-blank rows read
    kept: int = 0
    bad: int = 0  # malformed rows skipped (only with skip_bad_rows=True)
    identical: int = 0  # rows whose responses were all the same text: dropped
    bad_examples: list[str] = dataclasses.field(default_factory=list)

    def merge(self, other: "ParseStats") -> "ParseStats":
        return ParseStats(
            rows=self.rows + other.rows, kept=self.kept + other.kept, bad=self.bad + other.bad,
            identical=self.identical + other.identical,
            bad_examples=(self.bad_examples + other.bad_examples)[:_MAX_BAD_EXAMPLES],
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _RowError(Exception):
    """Raised by a row parser; `parse_file` adds file:line."""


def _need(row: Any, key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    if not isinstance(row, dict):
        raise _RowError(f"expected a JSON object{where}, got {type(row).__name__}")
    if key not in row:
        raise _RowError(f"missing field {where + '.' if where else ''}{key!r}")
    value = row[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _RowError(f"field {key!r}{where} must be {names}, got {type(value).__name__}")
    return value


def _record(prompt: str, responses: list[str], ranks: list[int], annotator: Any = "",
            bucket: Any = "") -> dict[str, Any]:
    return {"prompt": prompt, "responses": responses, "ranks": [int(r) for r in ranks],
            "annotator": "" if annotator is None else str(annotator),
            "bucket": "" if bucket is None else str(bucket)}


# ---------------------------------------------------------------------------------------------
# Row parsers: dict -> record (raise _RowError on anything malformed).


def parse_hh_dialogue(text: str) -> tuple[str, str]:
    """Split an HH dialogue into (prompt ending in "\\n\\nAssistant:", final assistant reply)."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise _RowError(f"dialogue has no {ASSISTANT!r} turn")
    if not text.startswith(HUMAN):
        raise _RowError(f"dialogue does not start with {HUMAN!r}")
    end = cut + len(ASSISTANT)
    reply = text[end:]
    if HUMAN in reply:
        # A Human turn after the last Assistant turn: there is no final reply to score.
        raise _RowError("dialogue ends with a Human turn, not an Assistant reply")
    return text[:end], reply


def _hh_rlhf(row: Any) -> dict[str, Any]:
    chosen = _need(row, "chosen", str)
    rejected = _need(row, "rejected", str)
    try:
        prompt, chosen_reply = parse_hh_dialogue(chosen)
    except _RowError as e:
        raise _RowError(f"field 'chosen': {e}") from None
    try:
        prompt_r, rejected_reply = parse_hh_dialogue(rejected)
    except _RowError as e:
        raise _RowError(f"field 'rejected': {e}") from None
    if prompt_r != prompt:
        raise _RowError("'chosen' and 'rejected' dialogues differ before the last Assistant turn")
    return _record(prompt, [chosen_reply, rejected_reply], [0, 1])


def _summarize_comparisons(row: Any) -> dict[str, Any]:
    info = _need(row, "info", dict)
    summaries = _need(row, "summaries", list)
    choice = _need(row, "choice", int)
    if isinstance(choice, bool) or choice not in (0, 1):
        raise _RowError(f"field 'choice' must be 0 or 1, got {choice!r}")
    if len(summaries) != 2:
        raise _RowError(f"field 'summaries' must hold 2 summaries, got {len(summaries)}")
    texts = [_need(s, "text", str, f" (summaries[{i}])") for i, s in enumerate(summaries)]
    if isinstance(info.get("post"), str):
        title = _need(info, "title", str, " (info)")
        subreddit = _need(info, "subreddit", str, " (info)")
        # The TL;DR query format of Stiennon et al. 2020 / Huang et al. 2024.
        prompt = f"SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {info['post']}\n\nTL;DR:"
    elif isinstance(info.get("article"), str):
        prompt = f"{info['article']}\n\nTL;DR:"
    else:
        raise _RowError("field 'info' has neither a 'post' nor an 'article' string")
    return _record(prompt, [texts[choice], texts[1 - choice]], [0, 1],
                   annotator=row.get("worker", ""), bucket=row.get("batch", ""))


def render_messages(messages: Sequence[dict[str, Any]], where: str = "") -> str:
    """Chat turns in the HH text format, ending with the cue for the assistant's reply."""
    names = {"user": "Human", "human": "Human", "assistant": "Assistant", "system": "System"}
    parts = []
    for i, m in enumerate(messages):
        role = _need(m, "role", str, f" ({where}[{i}])")
        content = _need(m, "content", str, f" ({where}[{i}])")
        if role not in names:
            raise _RowError(f"{where}[{i}].role={role!r} is not one of {sorted(names)}")
        parts.append(f"\n\n{names[role]}: {content}")
    return "".join(parts) + ASSISTANT


def _ultrafeedback(row: Any) -> dict[str, Any]:
    chosen = _need(row, "chosen", list)
    rejected = _need(row, "rejected", list)
    replies = []
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if not conv:
            raise _RowError(f"field {name!r} is an empty conversation")
        last = conv[-1]
        if _need(last, "role", str, f" ({name}[-1])") != "assistant":
            raise _RowError(f"the last turn of {name!r} must have role 'assistant', "
                            f"got {last['role']!r}")
        replies.append(_need(last, "content", str, f" ({name}[-1])"))
    if chosen[:-1] != rejected[:-1]:
        raise _RowError("'chosen' and 'rejected' differ before their last turn")
    context = chosen[:-1]
    if not context:
        # Some exports keep only the replies in the lists; the prompt is then its own field.
        context = [{"role": "user", "content": _need(row, "prompt", str)}]
    prompt = render_messages(context, "chosen")
    return _record(prompt, [" " + replies[0], " " + replies[1]], [0, 1],
                   bucket=row.get("source", ""))


def _generic(row: Any) -> dict[str, Any]:
    prompt = _need(row, "prompt", str)
    for key in ("annotator", "bucket"):
        if key in row and not isinstance(row[key], (str, int)):
            raise _RowError(f"field {key!r} must be a string, got {type(row[key]).__name__}")
    if "responses" in row:
        responses = _need(row, "responses", list)
        ranks = _need(row, "ranks", list)
        if len(responses) < 2:
            raise _RowError(f"field 'responses' needs at least 2 responses, got {len(responses)}")
        if len(ranks) != len(responses):
            raise _RowError(f"'ranks' has {len(ranks)} entries but 'responses' has "
                            f"{len(responses)}")
        for i, (r, k) in enumerate(zip(responses, ranks)):
            if not isinstance(r, str):
                raise _RowError(f"responses[{i}] must be a string, got {type(r).__name__}")
            if not isinstance(k, int) or isinstance(k, bool) or k < 0:
                raise _RowError(f"ranks[{i}] must be an int >= 0 (0 = best), got {k!r}")
        if len(set(ranks)) == 1:
            raise _RowError("all 'ranks' are equal: the row states no preference")
        return _record(prompt, list(responses), list(ranks), row.get("annotator"),
                       row.get("bucket"))
    chosen = _need(row, "chosen", str)
    rejected = _need(row, "rejected", str)
    return _record(prompt, [chosen, rejected], [0, 1], row.get("annotator"), row.get("bucket"))


FORMATS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "hh_rlhf": _hh_rlhf,
    "summarize_comparisons": _summarize_comparisons,
    "ultrafeedback": _ultrafeedback,
    "jsonl": _generic,
}


# ---------------------------------------------------------------------------------------------
# Files.


def _rows(path: str) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, decoded row or None, JSON error or None) for each non-blank row; a file
    that cannot be read at all raises a `UserError` naming it."""
    try:
        yield from _read_rows(path)
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise UserError(path, f"cannot be read: {type(e).__name__}: {e}",
                        "give a .jsonl / .json (optionally .gz) or .parquet file") from e
    except ValueError as e:  # pyarrow's ArrowInvalid (a corrupt parquet file)
        if type(e).__module__.startswith("pyarrow"):
            raise UserError(path, f"cannot be read as parquet: {e}") from e
        raise


def _read_rows(path: str) -> Iterator[tuple[int, Any, str | None]]:
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:  # pragma: no cover - pyarrow ships with the test environment
            raise ImportError(f"{path}: reading .parquet needs pyarrow "
                              "(pip install pyarrow)") from e
        # Parquet has no lines: "line" is the 1-based row number.
        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield i, row, None
        return
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line), None
            except json.JSONDecodeError as e:
                yield lineno, None, f"invalid JSON ({e.msg} at column {e.colno})"


def parse_file(path: str, fmt: str, *, skip_bad_rows: bool = False,
               split: str | None = None) -> tuple[list[dict[str, Any]], ParseStats]:
    """Parse one file into records. `split` keeps only rows whose `"split"` field equals it
    (summarize-from-feedback marks rows train/valid1/valid2); rows without the field are kept."""
    if fmt not in FORMATS:
        raise UserError("config.data.source.format", f"{fmt!r} is unknown",
                        f"choose one of {sorted(FORMATS)}")
    if not os.path.isfile(path):
        raise UserError(path, "no such preference data file")
    parser = FORMATS[fmt]
    stats, records = ParseStats(), []
    for lineno, row, error in _rows(path):
        where = f"{path}:{lineno}"
        other_split = isinstance(row, dict) and row.get("split", split) != split
        if error is None and split is not None and other_split:
            continue
        stats.rows += 1
        try:
            if error is not None:
                raise _RowError(error)
            rec = parser(row)
        except _RowError as e:
            message = f"{where}: {e} (format {fmt!r})"
            if not skip_bad_rows:
                raise PreferenceDataError(
                    where, f"{e} (format {fmt!r})",
                    "fix the row, or pass skip_bad_rows=True to skip and count such rows"
                ) from None
            stats.bad += 1
            if len(stats.bad_examples) < _MAX_BAD_EXAMPLES:
                stats.bad_examples.append(message)
            continue
        if len(set(rec["responses"])) == 1:
            stats.identical += 1
            continue
        rec["source"] = where
        records.append(rec)
        stats.kept += 1
    return records, stats


def parse_files(paths: Sequence[str], fmt: str, *, skip_bad_rows: bool = False,
                split: str | None = None) -> tuple[list[dict[str, Any]], ParseStats]:
    records, stats = [], ParseStats()
    for p in paths:
        r, s = parse_file(p, fmt, skip_bad_rows=skip_bad_rows, split=split)
        records += r
        stats = stats.merge(s)
    return records, stats


# ---------------------------------------------------------------------------------------------
# TFDS builder.


def records_from_source(source: dict[str, Any]) -> tuple[list[dict[str, Any]], ParseStats]:
    """`source = {"format", "files", "skip_bad_rows", "split"?}` -> parse_files(...)."""
    files = source["files"]
    files = [files] if isinstance(files, str) else list(files)
    records, stats = parse_files(files, source["format"],
                                 skip_bad_rows=bool(source.get("skip_bad_rows", False)),
                                 split=source.get("split"))
    if not records:
        why = (f"{stats.rows} rows read: {stats.bad} malformed, {stats.identical} with identical "
               "responses" if stats.rows else "no rows" + (
                   f" with split={source['split']!r}" if source.get("split") else ""))
        raise UserError(", ".join(files), f"no usable comparison ({why})",
                        f"give a non-empty file in the {source['format']!r} format")
    return records, stats


def _source_key(splits: dict[str, dict[str, Any]]) -> str:
    """A cache key for a builder: the splits' settings and each file's size and mtime."""
    desc = []
    for name in sorted(splits):
        s = dict(splits[name])
        files = [s["files"]] if isinstance(s["files"], str) else list(s["files"])
        s["files"] = [(os.path.abspath(f), os.path.getsize(f), os.path.getmtime(f)) for f in files]
        desc.append((name, sorted(s.items())))
    return hashlib.sha1(json.dumps(desc, default=str).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _builder_class():
    import tensorflow_datasets as tfds

    from rlhf_jax.data.builders import quiet_tfds_logs

    # Builds are seconds long; per-split progress bars would bury the stage's own progress.
    tfds.disable_progress_bar()
    quiet_tfds_logs()

    # Not in TFDS's global registry: the data are local files, never looked up by name.
    class PreferenceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Ranked responses from local files; one TFDS split per entry of `splits`.

        Each example: `prompt` (text), `responses` (text sequence), `ranks` (int32 sequence),
        `annotator`, `bucket`, `source` ("file:line"). The parse statistics of each split are
        in `builder.info.metadata["stats"][split]`.
        """

        name = "rlhf_jax_preferences"
        VERSION = tfds.core.Version("1.0.0")
        # Local files have no download checksums file to look up next to the code. Finding that
        # file would walk the package resources, which needs `importlib_resources` (not installed).
        code_path = None

        def __init__(self, *, splits: dict[str, dict[str, Any]], **kwargs):
            self._splits = {k: dict(v) for k, v in splits.items()}
            key = _source_key(self._splits)
            kwargs.setdefault("config",
                              tfds.core.BuilderConfig(name=key, description="local files"))
            kwargs.setdefault("file_format", "array_record")
            super().__init__(**kwargs)

        def _info(self):
            f = tfds.features
            return tfds.core.DatasetInfo(
                builder=self,
                features=f.FeaturesDict({
                    "prompt": f.Text(),
                    "responses": f.Sequence(f.Text()),
                    "ranks": f.Sequence(np.int32),
                    "annotator": f.Text(),
                    "bucket": f.Text(),
                    "source": f.Text(),
                }),
                metadata=tfds.core.MetadataDict(),
            )

        def _split_generators(self, dl_manager):
            out, stats = {}, {}
            for name, source in self._splits.items():
                records, st = records_from_source(source)
                stats[name] = st.to_dict()
                out[name] = records
            self.info.metadata["stats"] = stats
            return {name: self._generate_examples(records) for name, records in out.items()}

        def _generate_examples(self, records):
            for i, r in enumerate(records):
                yield i, {k: r[k] for k in _FIELDS}

        # Nothing downloads: `build_preference_dataset` logs one line instead of TFDS's two.
        def _log_download_bytes(self):
            pass

        def _log_download_done(self):
            pass

    return PreferenceBuilder


def __getattr__(name):
    # The builder class is made on first use so that parsing alone does not import TFDS.
    if name == "PreferenceBuilder":
        return _builder_class()
    raise AttributeError(name)


def _decode(x):
    return x.decode("utf-8") if isinstance(x, bytes) else x


def build_preference_dataset(splits: dict[str, dict[str, Any]], data_dir: str
                             ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, Any]]]:
    """Prepare (or reuse) the TFDS dataset for `splits` under `data_dir` and read it back.

    Returns ({split: [record, ...]}, {split: parse stats}). Records come back from the
    array_record files through `as_data_source`, so what the RM trains on is what TFDS stored.
    """
    from rlhf_jax.data.builders import prepare

    files = [f for s in splits.values() for f in ([s["files"]] if isinstance(s["files"], str)
                                                 else s["files"])]
    builder, _ = prepare(lambda: _builder_class()(splits=splits, data_dir=data_dir),
                         "preference", ", ".join(files))
    stats = dict(builder.info.metadata.get("stats", {}))
    source = builder.as_data_source()
    out = {}
    for name in splits:
        ds = source[name]
        recs = []
        for i in range(len(ds)):
            ex = ds[i]
            recs.append({
                "prompt": _decode(ex["prompt"]),
                "responses": [_decode(t) for t in ex["responses"]],
                "ranks": [int(r) for r in ex["ranks"]],
                "annotator": _decode(ex["annotator"]),
                "bucket": _decode(ex["bucket"]),
                "source": _decode(ex["source"]),
            })
        out[name] = recs
    return out, stats
