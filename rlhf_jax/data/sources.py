"""One interface over every data source a stage reads: the simulated world and local files.

A config's `data.source` is a dict whose `kind` picks the class:

    {"kind": "sim", "seed": 0, "num_train": ..., "num_eval": ..., [comparison fields]}
    {"kind": "jsonl", "train": "sft.jsonl", "eval": "...", "skip_malformed": False}
    {"kind": "preference_files", "format": "hh_rlhf", "train": (...), "eval": (...), ...}
    {"kind": "feedback_jsonl", "train": ("a.jsonl",), "eval": ("b.jsonl",)}   # KTO's labels

Stages ask a `DataSource` for what they need — prompts, demonstrations, pretraining text,
comparisons — instead of branching on `kind`. What only the simulated world can give (gold
judges, annotators that can label new samples, fresh held-out comparison pairs) is offered by
`SimSource` and reported as absent by the others (`has_world`), so a stage asks once and the
error for a missing capability names the field.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rlhf_jax.data import builders, feedback
from rlhf_jax.errors import UserError
from rlhf_jax.paths import cache_dir

SPLITS = ("train", "eval")


def as_dict(source) -> dict[str, Any]:
    if hasattr(source, "to_dict"):  # ml_collections.ConfigDict
        source = source.to_dict()
    if not isinstance(source, Mapping):
        raise UserError("config.data.source", f"must be a dict, got {type(source).__name__}", "")
    return dict(source)


class DataSource:
    """What a stage can read. Subclasses implement the kinds; unsupported reads raise UserError."""

    kind = ""
    has_world = False  # gold judges, annotators and fresh pairs of the simulated world

    def __init__(self, source: Mapping[str, Any], field: str = "config.data.source"):
        self.spec = dict(source)
        self.field = field

    def _unsupported(self, what: str):
        raise UserError(f"{self.field}.kind", f"a {self.kind!r} source has no {what}",
                        "use a source that provides it (the simulated world provides all)")

    def prompts(self, split: str) -> list[str]:
        """RL / evaluation prompts of a split."""
        self._unsupported("prompts")

    def demonstrations(self, split: str) -> tuple[list[str], list[str], dict]:
        """(prompts, completions, stats)."""
        self._unsupported("demonstrations")

    def pretrain_texts(self, split: str) -> tuple[list[str], dict]:
        self._unsupported("pretraining text")

    def comparisons(self, split: str) -> tuple[list[dict], dict]:
        """Preference records (`rlhf_jax.data.preference_formats` layout) and stats."""
        self._unsupported("comparisons")

    def tokenizer(self):
        """(tokenizer, directory) that comes with the data, or None (real data: the model's
        own tokenizer is used)."""
        return None

    # The simulated world only --------------------------------------------------------------
    def world(self):
        """The simulated world behind the source (`rlhf_jax.sim.world.World`: probe prompts,
        failure-mode features), or None for real data."""
        return None

    def annotator_names(self) -> dict[str, str] | None:
        return None

    def label(self, prompts: Sequence[str], responses: Sequence[Sequence[str]], seed: int):
        """Rank new responses with the source's annotators -> (ranks [N, K], annotator ids,
        gold [N, K], tau)."""
        self._unsupported("annotators to label new samples")

    def fresh_pairs(self, n: int) -> list[tuple[str, list[str]]]:
        """n held-out (prompt, [response, response]) pairs never used for training."""
        self._unsupported("fresh held-out comparison pairs")


class SimSource(DataSource):
    """The simulated world (`rlhf_jax.sim`): every read, gold judges and annotators."""

    kind = "sim"
    has_world = True

    @property
    def seed(self) -> int:
        return int(self.spec.get("seed", 0))

    def _base(self) -> dict:
        # Fields the text datasets take; comparison-only fields would fail their validation.
        keep = builders.SIM_TEXT_KEYS
        return {k: v for k, v in self.spec.items() if k in keep}

    def prompts(self, split: str) -> list[str]:
        return builders.load_prompts(self._base(), split, self.field)[0]

    def demonstrations(self, split: str):
        return builders.load_sft_texts(self._base(), split, self.field)

    def pretrain_texts(self, split: str):
        return builders.load_pretrain_texts(self._base(), split, self.field)

    def comparisons(self, split: str):
        return builders.load_comparisons(self.spec, split, self.field)

    def annotator_names(self) -> dict[str, str] | None:
        if self.spec.get("pool", "default") != "default":
            return None
        from rlhf_jax.sim import annotators

        return {str(a.annotator_id): f"{a.annotator_id}:{a.name}"
                for a in annotators.default_pool(1.0).annotators}

    def pool(self, tau: float):
        """The source's annotator pool at temperature `tau`, with its length / group biases."""
        from rlhf_jax.sim import labelling

        sp = self.spec
        return labelling.annotator_pool(
            tau, sp.get("pool", "default"), float(sp.get("flip_prob", 0.0)),
            float(sp.get("length_bias", 0.0)), float(sp.get("group_bias", 0.0)),
            f"{self.field}.pool")

    def label(self, prompts, responses, seed: int):
        from rlhf_jax.sim import annotators
        from rlhf_jax.sim.judges import get_judge

        k = len(responses[0])
        flat_p = [p for p, rs in zip(prompts, responses) for _ in rs]
        flat_r = [r for rs in responses for r in rs]
        gold = get_judge(str(self.spec.get("judge", "vader"))).score(flat_p, flat_r)
        gold = np.asarray(gold, np.float64).reshape(len(prompts), k)
        if not np.any(np.abs(gold[:, :, None] - gold[:, None, :]) > 1e-9):
            raise UserError(f"{self.field}.judge", "every sample got the same gold score: there "
                            "is nothing to rank", "sample more varied responses (temperature)")
        # tau is calibrated on these samples' own gold gaps, so the annotators agree with the
        # gold order `target_agreement` of the time, as for the world's candidates.
        tau = annotators.calibrate_tau(gold, float(self.spec.get("target_agreement", 0.73)),
                                       float(self.spec.get("flip_prob", 0.0)), seed=seed)
        ranks, ids = self.pool(tau).rank(gold, responses, np.random.default_rng([seed, 97]),
                                         prompts=list(prompts))
        return ranks, ids, gold, tau

    def world(self):
        from rlhf_jax.sim.world import get_world, world_spec

        return get_world(*world_spec(self.spec))

    def tokenizer(self):
        """The world's own tokenizer (its variant's vocabulary)."""
        from rlhf_jax.sim.tokenizer import world_tokenizer
        from rlhf_jax.sim.world import world_spec

        seed, variant = world_spec(self.spec)
        return world_tokenizer(seed, variant=variant)

    def fresh_pairs(self, n: int):
        items = self.world().comparison_candidates(0, n, 2, "test")
        return [(p, list(rs)) for p, rs, _ in items]


class JsonlSource(DataSource):
    """SFT JSONL files (`{"prompt", "completion"}` or chat `{"messages"}`): demonstrations,
    their prompts, and prompt + completion as pretraining text."""

    kind = "jsonl"

    def prompts(self, split: str) -> list[str]:
        return builders.load_prompts(self.spec, split, self.field)[0]

    def demonstrations(self, split: str):
        return builders.load_sft_texts(self.spec, split, self.field)

    def pretrain_texts(self, split: str):
        return builders.load_pretrain_texts(self.spec, split, self.field)


class PreferenceFileSource(DataSource):
    """Preference files in a published format (HH-RLHF, summarize-from-feedback comparisons,
    UltraFeedback-binarized, generic JSONL): comparisons, their distinct prompts, and the
    preferred responses as demonstrations."""

    kind = "preference_files"
    FIELDS = {"kind", "format", "train", "eval", "train_split", "eval_split", "skip_bad_rows",
              "data_dir"}

    def __init__(self, source, field="config.data.source"):
        super().__init__(source, field)
        self._records = None

    def _load(self):
        if self._records is None:
            self._records = load_preference_files(self.spec, self.field)
        return self._records

    def comparisons(self, split: str):
        records, stats = self._load()
        return records[split], stats[split]

    def prompts(self, split: str) -> list[str]:
        return list(dict.fromkeys(r["prompt"] for r in self._load()[0][split]))

    def demonstrations(self, split: str):
        recs = self._load()[0][split]
        best = [(r["prompt"], r["responses"][int(np.argmin(r["ranks"]))]) for r in recs]
        return [b[0] for b in best], [b[1] for b in best], {"examples": len(best),
                                                             "from": "preferred responses"}


class FeedbackFileSource(DataSource):
    """Binary-feedback JSONL files (`rlhf_jax.data.feedback`: `{"prompt", "completion",
    "label"}` rows, label true = desirable): the unpaired examples KTO learns from, and their
    distinct prompts."""

    kind = "feedback_jsonl"
    FIELDS = {"kind", "train", "eval"}

    def __init__(self, source, field="config.data.source"):
        super().__init__(source, field)
        unknown = sorted(set(self.spec) - self.FIELDS)
        if unknown:
            raise UserError(field, f"unknown field(s) {unknown} for kind 'feedback_jsonl'",
                            f"allowed: {sorted(self.FIELDS)}")

    def feedback(self, split: str) -> tuple[list[dict], dict]:
        """(examples `{"prompt", "completion", "desirable"}`, stats) of a split's files."""
        files = _files(self.spec.get(split))
        if not files:
            raise UserError(f"{self.field}.{split}", "names no file", "give one or more files")
        examples = [e for f in files for e in feedback.read_jsonl(f)]
        return examples, {**feedback.stats_of(examples), "files": files}

    def prompts(self, split: str) -> list[str]:
        return list(dict.fromkeys(e["prompt"] for e in self.feedback(split)[0]))


KINDS = {c.kind: c for c in (SimSource, JsonlSource, PreferenceFileSource, FeedbackFileSource)}


def from_config(source, field: str = "config.data.source") -> DataSource:
    """The DataSource a config's `data.source` describes."""
    spec = as_dict(source)
    kind = spec.get("kind", "sim")
    if kind not in KINDS:
        raise UserError(f"{field}.kind", f"{kind!r} is not a data source kind",
                        f"use one of {sorted(KINDS)}")
    return KINDS[kind](spec, field)


def _files(value) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def load_preference_files(src: Mapping[str, Any], field: str = "config.data.source"):
    """Records and stats of both splits of a `preference_files` source, through TFDS."""
    from rlhf_jax.data import preference_formats as pf

    unknown = sorted(set(src) - PreferenceFileSource.FIELDS)
    if unknown:
        raise UserError(field, f"unknown field(s) {unknown} for kind 'preference_files'",
                        f"allowed: {sorted(PreferenceFileSource.FIELDS)}")
    if src.get("format") not in pf.FORMATS:
        raise UserError(f"{field}.format", f"{src.get('format')!r} is not a known format",
                        f"use one of {sorted(pf.FORMATS)}")
    splits = {}
    for split in SPLITS:
        files = _files(src.get(split))
        if not files:
            raise UserError(f"{field}.{split}", "names no file", "give one or more file paths")
        for f in files:
            if not os.path.isfile(f):
                raise UserError(f"{field}.{split}", f"no such file {f!r}", "check the path")
        splits[split] = {"format": src["format"], "files": files,
                         "skip_bad_rows": bool(src.get("skip_bad_rows", False))}
        if src.get(f"{split}_split"):
            splits[split]["split"] = src[f"{split}_split"]
    data_dir = src.get("data_dir") or str(cache_dir() / "tfds")
    return pf.build_preference_dataset(splits, data_dir)
