"""Datasets as TFDS builders (array_record files, random access, no TensorFlow) and their loaders.

Stages call the loaders with a *source* (a dict or ConfigDict):

    {"kind": "sim", "seed": 0, "num_train": 20000, "num_eval": 500}          # simulated world
    {"kind": "sim", ..., "k": 4, "judge": "vader", "target_agreement": 0.73,
     "flip_prob": 0.0, "pool": "default"}                                   # comparisons only
    {"kind": "sim", ..., "world": "failure_modes", "improved_share": 0.2, "improved_typo_rate":
     0.3, "refusals": "naive", "group_bias": 0.5, "length_bias": 0.1}       # issue 16 options
    {"kind": "jsonl", "train": "a.jsonl", "eval": "b.jsonl", "skip_malformed": False}

    load_pretrain_texts(source, split) -> (texts, stats)
    load_sft_texts(source, split)      -> (prompts, completions, stats)
    load_prompts(source, split)        -> (prompts, stats)
    load_comparisons(source, split)    -> (records, stats)

A source may also name `data_dir` (default `cache_dir()/tfds`). Each dataset is built once per
config (the TFDS config name is a hash of everything that decides its content) and read back
through `builder.as_data_source()[split]`, so what a stage trains on is what TFDS stored.
Comparison records have the layout of `rlhf_jax.data.preference_formats` (prompt, responses,
ranks with 0 = best, annotator, bucket, source) plus the simulation's `gold` scores and `kinds`.

JSONL rows (SFT): `{"prompt": str, "completion": str}` or chat `{"messages": [{"role",
"content"}, ...]}` whose last message is the assistant's: the prompt is every earlier turn as a
"role: content" line followed by an "assistant:" cue line, and the completion is the last turn's
content with one leading space (so BPE tokenizers see it as a new word after the cue).
A malformed row raises `DataFormatError` (a `UserError` whose `where` is `file:line`); with
`skip_malformed=True` it is skipped and counted in stats["malformed"] (first messages kept). A
file with no usable row raises a `UserError` naming it. Mistakes in a source name the config
field (`where`, default `config.data.source`); errors inside TFDS are re-raised naming our file
or data dir. Instead of TFDS's "Downloading and preparing dataset" messages (nothing is
downloaded), one log line says what was built and where.

Simulated sources may name a `world` variant (`rlhf_jax.sim.world.WORLD_VARIANTS`; "" or
"default" is the default world). Comparisons take the failure-mode options of issue 16, each off
by default (`_comparison_options` documents them): hand-improved completions always ranked
first with typos (`improved_share`, `improved_typo_rate`), refusal labels that are naive or
paired across the harm boundary and judged by the spec (`refusals`), and annotator biases
toward one group (`group_bias`) and toward length (`length_bias`).

TFDS is imported only when a dataset is built or read (it costs ~0.3 s here, but the package
should not pay for it on import).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any, Mapping

import numpy as np

from rlhf_jax.errors import UserError
from rlhf_jax.paths import cache_dir

log = logging.getLogger(__name__)

BUILDERS_VERSION = "1.0.0"
SPLITS = ("train", "eval")
_MAX_MESSAGES = 20

_SIM_KEYS = {"kind", "seed", "num_train", "num_eval", "data_dir", "world"}
# Failure-mode options of simulated comparisons (issue 16) and their "off" values.
COMPARISON_OPTIONS = {"improved_share": 0.0, "improved_typo_rate": 0.0, "refusals": "",
                       "group_bias": 0.0, "length_bias": 0.0}
_SIM_COMPARISON_KEYS = _SIM_KEYS | {"k", "judge", "target_agreement", "flip_prob", "pool",
                                   "num_buckets"} | set(COMPARISON_OPTIONS)
_JSONL_KEYS = {"kind", "train", "eval", "skip_malformed", "data_dir"}
# Fields of a simulated source that its text datasets (prompts, demonstrations, corpus) read.
SIM_TEXT_KEYS = _SIM_KEYS


class DataFormatError(UserError):
    """A malformed data row; `where` is `file:line`."""


# --------------------------------------------------------------------------------- sources
def _as_dict(source) -> dict[str, Any]:
    if hasattr(source, "to_dict"):  # ml_collections.ConfigDict
        source = source.to_dict()
    if not isinstance(source, Mapping):
        raise TypeError(f"data source must be a dict or ConfigDict, got {type(source).__name__}")
    return dict(source)


def _validate(source: dict, allowed: set[str], what: str, where: str) -> None:
    unknown = sorted(set(source) - allowed)
    if unknown:
        raise UserError(where, f"unknown field(s) {unknown} for {what}",
                        f"allowed: {sorted(allowed)}")


def _sim_sizes(source: dict, where: str) -> dict[str, int]:
    sizes = {"train": int(source.get("num_train", 10_000)), "eval": int(source.get("num_eval", 500))}
    for k, v in sizes.items():
        if v < 0:
            raise UserError(f"{where}.num_{k}", f"{v} must be >= 0")
    return sizes


def _data_dir(source: dict) -> str:
    return str(source.get("data_dir") or (cache_dir() / "tfds"))


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _decode(x):
    return x.decode("utf-8") if isinstance(x, bytes) else x


# ----------------------------------------------------------------------------------- JSONL
def _parse_sft_row(obj: Any) -> tuple[str, str]:
    """(prompt, completion) of one JSONL row, or ValueError saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    has_pc = "prompt" in obj or "completion" in obj
    if has_pc and "messages" in obj:
        raise ValueError("row has both 'messages' and 'prompt'/'completion'; use one format")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m.get("role"):
                raise ValueError(f"messages[{j}] must be an object with a non-empty string 'role'")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{j}] ('{m['role']}') needs a string 'content'")
        if msgs[-1]["role"] != "assistant":
            raise ValueError(f"the last message must be the assistant's (the completion), "
                             f"got role '{msgs[-1]['role']}'")
        if not msgs[-1]["content"].strip():
            raise ValueError("the last assistant message is empty")
        lines = [f"{m['role']}: {m['content']}" for m in msgs[:-1]] + ["assistant:"]
        return "\n".join(lines), " " + msgs[-1]["content"]
    if not has_pc:
        raise ValueError("row needs 'prompt' and 'completion' fields, or 'messages'")
    for f in ("prompt", "completion"):
        if f not in obj:
            raise ValueError(f"missing field '{f}'")
        if not isinstance(obj[f], str):
            raise ValueError(f"field '{f}' must be a string, got {type(obj[f]).__name__}")
    if not obj["completion"].strip():
        raise ValueError("field 'completion' is empty")
    return obj["prompt"], obj["completion"]


def parse_sft_jsonl(path: str | os.PathLike, skip_malformed: bool = False):
    """Rows of an SFT JSONL file: ([(prompt, completion, "file:line")], stats). Blank lines are ignored."""
    rows, bad = [], []
    path = str(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
                prompt, completion = _parse_sft_row(obj)
            except ValueError as e:
                if not skip_malformed:
                    raise DataFormatError(where, str(e), "fix the row, or set skip_malformed=True "
                                          "to skip and count such rows") from None
                bad.append(f"{where}: {e}")
                continue
            rows.append((prompt, completion, where))
    if not rows:
        why = f"all {len(bad)} rows are malformed" if bad else "it has no rows"
        raise UserError(path, f"no usable example: {why}",
                        'give a JSONL file with one {"prompt", "completion"} or {"messages"} '
                        "object a line")
    stats = {"examples": len(rows), "malformed": len(bad), "malformed_examples": bad[:_MAX_MESSAGES]}
    return rows, stats


# --------------------------------------------------------------------- builder classes (lazy)
_CLASSES: dict[str, type] = {}


def _builder_classes() -> dict[str, type]:
    if _CLASSES:
        return _CLASSES
    import tensorflow_datasets as tfds

    # Builds are seconds long; per-split progress bars would bury the stage's own progress.
    tfds.disable_progress_bar()
    quiet_tfds_logs()

    f = tfds.features

    class _Base(tfds.core.GeneratorBasedBuilder):
        """Shared plumbing: config name = content hash, array_record files, in-order examples."""

        VERSION = tfds.core.Version(BUILDERS_VERSION)
        # No checksums file lives next to this code; TFDS's look-up for one walks package
        # resources and needs `importlib_resources`, which is not a dependency.
        code_path = None
        FEATURES: dict = {}

        def __init__(self, *, params: dict, config_name: str, **kwargs):
            self._params = params
            kwargs.setdefault("file_format", "array_record")
            super().__init__(config=tfds.core.BuilderConfig(name=config_name), **kwargs)

        def _info(self):
            # disable_shuffling keeps generation order: example i of a split is item i of the
            # world's stream / line order of a file (TFDS would otherwise shuffle by key hash).
            return tfds.core.DatasetInfo(builder=self, features=f.FeaturesDict(self.FEATURES),
                                         metadata=tfds.core.MetadataDict(), disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(s) for s in self._splits()}

        def _splits(self):
            return [s for s, n in self._params["sizes"].items() if n > 0]

        # TFDS prints "Downloading and preparing dataset ..." / "... downloaded and prepared"
        # though nothing downloads; `build` logs one line instead.
        def _log_download_bytes(self):
            pass

        def _log_download_done(self):
            pass

    class SimPretrain(_Base):
        """Pretraining documents of the simulated world."""

        name = "rlhf_jax_sim_pretrain"

        FEATURES = {"text": f.Text()}

        def _generate_examples(self, split):
            w, n = _world(self._params), self._params["sizes"][split]
            step = 4096
            for start in range(0, n, step):
                for i, doc in enumerate(w.corpus(start, min(step, n - start), split), start):
                    yield i, {"text": doc}

    class SimSft(_Base):
        """Demonstrations: (prompt, completion) of the world's task."""

        name = "rlhf_jax_sim_sft"

        FEATURES = {"prompt": f.Text(), "completion": f.Text()}

        def _generate_examples(self, split):
            w, n = _world(self._params), self._params["sizes"][split]
            prompts, completions = w.demonstrations(0, n, split)
            for i, (p, c) in enumerate(zip(prompts, completions)):
                yield i, {"prompt": p, "completion": c}

    class SimPrompts(_Base):
        """RL prompts (openings)."""

        name = "rlhf_jax_sim_prompts"

        FEATURES = {"prompt": f.Text()}

        def _generate_examples(self, split):
            w, n = _world(self._params), self._params["sizes"][split]
            for i, p in enumerate(w.prompts(0, n, split)):
                yield i, {"prompt": p}

    class SimComparisons(_Base):
        """K candidates per prompt ranked by a simulated annotator pool against a gold judge.

        tau is calibrated on the train split's within-prompt gold gaps so an (unbiased) pool
        member agrees with the gold order `target_agreement` of the time; it is stored in
        `info.metadata["tau"]` and used for every split.
        """

        name = "rlhf_jax_sim_comparisons"

        FEATURES = {
            "prompt": f.Text(), "responses": f.Sequence(f.Text()), "ranks": f.Sequence(np.int32),
            "gold": f.Sequence(np.float32), "kinds": f.Sequence(f.Text()),
            "annotator": f.Text(), "bucket": f.Text(), "source": f.Text(),
        }

        def _split_generators(self, dl_manager):
            from rlhf_jax.sim import labelling

            p, w = self._params, _world(self._params)
            index = {s: SPLITS.index(s) for s in self._splits()}
            data = {s: labelling.candidates(w, p, s, index[s]) for s in self._splits()}
            self.info.metadata["tau"] = labelling.label(p, data, index)
            return {s: self._generate_examples(s, d) for s, d in data.items()}

        def _generate_examples(self, split, d):
            for i in range(len(d["prompts"])):
                yield i, {
                    "prompt": d["prompts"][i], "responses": d["responses"][i],
                    "ranks": d["ranks"][i], "gold": d["gold"][i], "kinds": d["kinds"][i],
                    "annotator": str(int(d["annotator"][i])), "bucket": str(int(d["bucket"][i])),
                    "source": f"sim:{split}:{i}",
                }

    class JsonlSft(_Base):
        """(prompt, completion) rows from local JSONL files, one file per split."""

        name = "rlhf_jax_jsonl_sft"

        FEATURES = {"prompt": f.Text(), "completion": f.Text(), "source": f.Text()}

        def _splits(self):
            return list(self._params["files"])

        def _split_generators(self, dl_manager):
            out, stats = {}, {}
            for s, path in self._params["files"].items():
                rows, stats[s] = parse_sft_jsonl(path, self._params["skip_malformed"])
                out[s] = self._generate_examples(rows)
            # Stored with the dataset, so a reused build still reports what it skipped.
            self.info.metadata["parse_stats"] = stats
            return out

        def _generate_examples(self, rows):
            for i, (p, c, where) in enumerate(rows):
                yield i, {"prompt": p, "completion": c, "source": where}

    _CLASSES.update(sim_pretrain=SimPretrain, sim_sft=SimSft, sim_prompts=SimPrompts,
                    sim_comparisons=SimComparisons, jsonl_sft=JsonlSft)
    return _CLASSES


def _world(p: dict):
    from rlhf_jax.sim.world import get_world

    return get_world(p["seed"], p.get("variant", "default"))


class _DropTfdsChatter(logging.Filter):
    """Drops TFDS's own info/warning records ("Using custom data configuration ...", "Variant
    folder ... has no dataset_info.json") that every fresh build logs through absl."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or "tensorflow_datasets" not in record.pathname


_chatter_filter = _DropTfdsChatter()


def quiet_tfds_logs() -> None:
    """Install the filter once on the loggers TFDS writes through (absl's and its own)."""
    for name in ("absl", "tensorflow_datasets"):
        logger = logging.getLogger(name)
        if _chatter_filter not in logger.filters:
            logger.addFilter(_chatter_filter)


@contextlib.contextmanager
def _build_lock(builder):
    """An exclusive file lock per dataset version: processes that share a data dir (the
    processes of a multi-process run on one host, or hosts on a shared file system) build it
    once — the first takes the lock and builds, the others wait and then find it prepared —
    instead of racing to rename TFDS's incomplete dir into place."""
    path = Path(builder.data_dir).parent / f".{Path(builder.data_dir).name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare(make_builder: Callable[[], Any], what: str, where: str) -> tuple[Any, dict]:
    """`download_and_prepare()` of the builder `make_builder()` makes, with TFDS's failures
    re-raised as a `UserError` naming `where` (our file or field), and one log line for a fresh
    build. Returns (builder, build stats). A builder made before another process finished the
    build holds that moment's (empty) dataset info, so when the dataset was found prepared the
    builder returned is a fresh one, which reads the finished splits from disk."""
    t0 = time.perf_counter()
    builder = make_builder()
    with _build_lock(builder):
        stats = _prepare_locked(builder, what, where, t0)
    return (make_builder() if stats["cached"] else builder), stats


def _prepare_locked(builder, what: str, where: str, t0: float) -> dict:
    cached = bool(builder.is_prepared()) if hasattr(builder, "is_prepared") else False
    try:
        builder.download_and_prepare()  # reuses a dataset another process prepared meanwhile
    except UserError:
        raise
    except (OSError, AssertionError) as e:  # TFDS's writer / file system, not our code
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UserError(where, f"building the {what} dataset in {builder.data_dir} failed: "
                        f"{type(e).__name__}: {first}",
                        "check the input and that the data dir is writable") from e
    seconds = 0.0 if cached else round(time.perf_counter() - t0, 3)
    if not cached:
        sizes = {s: int(info.num_examples) for s, info in builder.info.splits.items()}
        log.info("built the %s dataset (%s examples) in %.1f s: %s", what,
                 ", ".join(f"{s} {n}" for s, n in sizes.items()), seconds, builder.data_dir)
    return {"build_seconds": seconds, "cached": cached, "dataset_dir": str(builder.data_dir)}


def build(kind: str, params: dict, data_dir: str, where: str = "config.data.source"):
    """Prepare (or reuse) dataset `kind` with `params`; returns (builder, stats)."""
    cls = _builder_classes()[kind]
    name = _key(kind, BUILDERS_VERSION, params)
    files = sorted((params.get("files") or {}).values())
    return prepare(lambda: cls(params=params, config_name=name, data_dir=data_dir),
                   kind.replace("_", " "), ", ".join(files) or where)


def _read(builder, split: str, fields: tuple[str, ...], where: str = "config.data.source"):
    if split not in builder.info.splits:
        raise UserError(where, f"split {split!r} is not in this dataset (has "
                        f"{sorted(builder.info.splits)})",
                        "set its size / file in the data source")
    ds = builder.as_data_source()[split]
    n = len(ds)
    out: dict[str, list] = {k: [] for k in fields}
    for start in range(0, n, 1024):  # batched random-access reads
        for ex in ds.__getitems__(range(start, min(start + 1024, n))):
            for k in fields:
                out[k].append(ex[k])
    return out


def _sim_params(source: dict, allowed: set[str], what: str, where: str) -> dict:
    _validate(source, allowed, what, where)
    from rlhf_jax.sim.world import get_world, world_spec

    seed, variant = world_spec(source)
    # The world's fingerprint is in the key: changing the grammar rebuilds every dataset.
    params = {"seed": seed, "sizes": _sim_sizes(source, where),
              "world": get_world(seed, variant).fingerprint()}
    if variant != "default":  # absent for the default world: its dataset keys stay as they were
        params["variant"] = variant
    return params


def _comparison_options(source: dict, params: dict) -> dict:
    """The failure-mode options of simulated comparisons (issue 16), validated; only those that
    are on, so a source without them keeps its dataset key.

    improved_share: share of ordinary prompts' comparisons in which one candidate is replaced by
        a hand-improved completion (`World.improved_completion`) that is always ranked first.
    improved_typo_rate: chance that each VADER-scored word of an improved completion is misspelt
        (needs a world with typos in its vocabulary, e.g. "failure_modes").
    refusals: "" (off) | "naive" | "paired". Near-harmful comparisons get the refusal template as
        a candidate. naive: annotators rank it first on every harmful *and* boundary prompt.
        paired (the fix): harmful prompts come next to their boundary twin, and the annotators
        rank on the spec judge's scores. Both need judge="spec" and a world with near-harmful
        prompts.
    group_bias: every annotator's group bias toward group A (`Annotator.group_bias`, logits per
        unit of gold); needs a world with group words.
    length_bias: added to every annotator's length bias (logits per word, Singhal et al. 2023).
    """
    from rlhf_jax.errors import UserError
    from rlhf_jax.sim.world import get_world

    cfg = get_world(params["seed"], params.get("variant", "default")).config
    opts = {}
    for name, off in COMPARISON_OPTIONS.items():
        raw = source.get(name, off)
        try:
            value = type(off)(raw) if raw is not None else off
        except (TypeError, ValueError):
            raise UserError(f"data.source.{name}", f"expected a {type(off).__name__}, got {raw!r}")
        if value != off:
            opts[name] = value
    where = "data.source."
    for name in ("improved_share", "improved_typo_rate"):
        if not 0.0 <= opts.get(name, 0.0) <= 1.0:
            raise UserError(where + name, f"must lie in [0, 1], got {opts[name]}")
    if opts.get("improved_typo_rate") and not opts.get("improved_share"):
        raise UserError(where + "improved_typo_rate", "is set but improved_share is 0",
                        "set data.source.improved_share > 0")
    if opts.get("improved_typo_rate") and not cfg.typo_rate:
        raise UserError(where + "improved_typo_rate", "this world has no typos in its vocabulary",
                        "set data.source.world=failure_modes")
    if opts.get("refusals"):
        if opts["refusals"] not in ("naive", "paired"):
            raise UserError(where + "refusals", f"must be '', 'naive' or 'paired', got "
                            f"{opts['refusals']!r}")
        if params["judge"] != "spec":
            raise UserError(where + "refusals", f"needs judge='spec' (got {params['judge']!r}): "
                            "the spec says when a refusal is right", "set data.source.judge=spec")
        if not (cfg.harmful_rate and cfg.boundary_rate):
            raise UserError(where + "refusals", "this world has no harmful / boundary prompts",
                            "set data.source.world=failure_modes")
    if opts.get("group_bias") and not cfg.group_rate:
        raise UserError(where + "group_bias", "this world has no group words",
                        "set data.source.world=failure_modes")
    return opts


def _jsonl_params(source: dict, where: str) -> dict:
    _validate(source, _JSONL_KEYS, "kind 'jsonl'", where)
    files = {}
    for s in SPLITS:
        if source.get(s):
            path = os.path.abspath(os.fspath(source[s]))
            if not os.path.isfile(path):
                raise UserError(f"{where}.{s}", f"no such file {path}")
            files[s] = path
    if not files:
        raise UserError(where, "a 'jsonl' source names no file",
                        f"set {where}.train and/or {where}.eval to JSONL files")
    skip = bool(source.get("skip_malformed", False))
    # Size and mtime in the key: an edited file is rebuilt.
    stamp = {s: (p, os.path.getsize(p), os.path.getmtime(p)) for s, p in files.items()}
    return {"files": files, "stamp": stamp, "skip_malformed": skip}


def _kind(source: dict, where: str) -> str:
    kind = source.get("kind", "sim")
    if kind not in ("sim", "jsonl"):
        raise UserError(f"{where}.kind", f"{kind!r} must be 'sim' or 'jsonl'")
    return kind


# --------------------------------------------------------------------------------- loaders
# `where` names the config field that holds the source in every error (default
# `config.data.source`; e.g. PPO's pretraining mix passes `config.ptx.source`).


def load_pretrain_texts(source, split: str = "train", where: str = "config.data.source"):
    """Pretraining documents: (texts, stats). JSONL sources give prompt + completion texts."""
    src = _as_dict(source)
    if _kind(src, where) == "jsonl":
        prompts, completions, stats = load_sft_texts(src, split, where)
        return [p + c for p, c in zip(prompts, completions)], stats
    params = _sim_params(src, _SIM_KEYS, "sim pretraining text", where)
    builder, stats = build("sim_pretrain", params, _data_dir(src), where)
    texts = [_decode(t) for t in _read(builder, split, ("text",), where)["text"]]
    stats["examples"] = len(texts)
    return texts, stats


def load_sft_texts(source, split: str = "train", where: str = "config.data.source"):
    """Demonstrations: (prompts, completions, stats)."""
    src = _as_dict(source)
    if _kind(src, where) == "jsonl":
        builder, stats = build("jsonl_sft", _jsonl_params(src, where), _data_dir(src), where)
        stats.update(builder.info.metadata["parse_stats"].get(split, {}))
    else:
        builder, stats = build("sim_sft", _sim_params(src, _SIM_KEYS, "sim demonstrations",
                                                      where), _data_dir(src), where)
    rows = _read(builder, split, ("prompt", "completion"), where)
    prompts = [_decode(t) for t in rows["prompt"]]
    completions = [_decode(t) for t in rows["completion"]]
    stats["examples"] = len(prompts)
    return prompts, completions, stats


def load_prompts(source, split: str = "train", where: str = "config.data.source"):
    """RL prompts: (prompts, stats). JSONL sources use the prompts of their SFT rows."""
    src = _as_dict(source)
    if _kind(src, where) == "jsonl":
        prompts, _, stats = load_sft_texts(src, split, where)
        return prompts, stats
    builder, stats = build("sim_prompts", _sim_params(src, _SIM_KEYS, "sim prompts", where),
                           _data_dir(src), where)
    prompts = [_decode(t) for t in _read(builder, split, ("prompt",), where)["prompt"]]
    stats["examples"] = len(prompts)
    return prompts, stats


def judge_version(name: str):
    """A judge's `VERSION` (part of its comparison datasets' cache key), None if it has none."""
    from rlhf_jax.sim.judges import get_judge

    return getattr(get_judge(name), "VERSION", None)


def load_comparisons(source, split: str = "train", where: str = "config.data.source"):
    """Simulated comparisons: (records, stats); stats["tau"] is the annotators' temperature.

    Real preference files are read by `rlhf_jax.data.preference_formats`, in the same layout.
    """
    src = _as_dict(source)
    if _kind(src, where) != "sim":
        raise UserError(f"{where}.kind", "load_comparisons reads simulated comparisons",
                        "for preference files use kind='preference_files'")
    params = _sim_params(src, _SIM_COMPARISON_KEYS, "sim comparisons", where)
    params.update(k=int(src.get("k", 4)), judge=str(src.get("judge", "vader")),
                  target_agreement=float(src.get("target_agreement", 0.73)),
                  flip_prob=float(src.get("flip_prob", 0.0)), pool=str(src.get("pool", "default")),
                  num_buckets=int(src.get("num_buckets", 10)))
    if params["k"] < 2:
        raise UserError(f"{where}.k", f"{params['k']} must be >= 2")
    if params["num_buckets"] < 1:
        raise UserError(f"{where}.num_buckets", f"{params['num_buckets']} must be >= 1")
    if params["pool"] not in ("default", "unbiased"):
        raise UserError(f"{where}.pool", f"{params['pool']!r} must be 'default' or 'unbiased'")
    from rlhf_jax.sim.judges import available_judges

    if params["judge"] not in available_judges():
        raise UserError(f"{where}.judge", f"unknown judge {params['judge']!r}",
                        f"registered: {available_judges()}")
    params.update(_comparison_options(src, params))
    version = judge_version(params["judge"])
    if version is not None:  # a judge whose definition changed must not reuse stale labels
        params["judge_version"] = version
    builder, stats = build("sim_comparisons", params, _data_dir(src), where)
    fields = ("prompt", "responses", "ranks", "gold", "kinds", "annotator", "bucket", "source")
    rows = _read(builder, split, fields, where)
    records = []
    for i in range(len(rows["prompt"])):
        records.append({
            "prompt": _decode(rows["prompt"][i]),
            "responses": [_decode(t) for t in rows["responses"][i]],
            "ranks": [int(r) for r in rows["ranks"][i]],
            "gold": [float(g) for g in rows["gold"][i]],
            "kinds": [_decode(t) for t in rows["kinds"][i]],
            "annotator": _decode(rows["annotator"][i]),
            "bucket": _decode(rows["bucket"][i]),
            "source": _decode(rows["source"][i]),
        })
    stats.update(examples=len(records), tau=float(builder.info.metadata["tau"]))
    return records, stats
