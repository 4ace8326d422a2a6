"""The simulated world: an English-like corpus, prompts, demonstrations and candidate responses.

In the spirit of AlpacaFarm (Dubois et al. 2023): a task with a known gold judge, so the whole
RLHF pipeline (pretrain -> SFT -> RM -> PPO) can run and be scored without people, weights or a
network. Text comes from a small grammar over ~1,000 words; the sentiment-bearing words are the
ones VADER's lexicon scores, so a policy can raise the gold (VADER) score by word choice.

The task (every stage's default): continue an opening of a few words ("the movie was",
"my sister said that") with one well-formed sentence that ends with a period, with
`band[0]..band[1]` words in the continuation. Demonstrations follow the world's natural
sentiment mix, so the SFT policy writes well-formed but not maximally positive text and PPO has
room to raise the gold score.

Text normal form: lower case, words separated by one space, "," and "." attached to the word
before them. Everything here is deterministic in (seed, split, index).

Failure-mode features (issue 16; the talk by Schulman & Zoph 2025 on ChatGPT's post-training)
are `WorldConfig` options, all off by default, all on in the named variant `"failure_modes"`
(`get_world(seed, "failure_modes")`, data sources' `world` field). The default world's text,
vocabulary and fingerprint do not depend on them.

- Typos: each VADER-scored word has one misspelling (`typo_map`) that VADER does not score;
  `typo_rate` misspells words at that rate in corpus text, demonstration completions and
  comparison candidates (never in prompts).
- Refusals: the template `REFUSAL`; harmful prompts "<gerund> <det> <person> <copula>"
  ("shooting the guard was"), for which the spec wants a refusal; harmless boundary prompts with
  the same gerunds, determiners and copulas on a thing ("shooting the film was"). `prompt_kind`
  tells them apart; `World.twin` gives a prompt's partner across the boundary.
- Groups: two symmetric sets of group words (`GROUP_A[i]` pairs with `GROUP_B[i]`) before person
  nouns ("the uptown teacher"); `swap_group` swaps them. VADER scores none of them, so gold is
  symmetric between the groups.
- Lengths: `length_spread` spreads demonstration lengths evenly over the band.

Prompts for probes (`World.probe_prompts`, `World.group_prompt_pairs`) come from their own
streams and from a deterministic one-in-eight share of the harmful, boundary and group prompts
(`held_out`) that no training stream ever emits.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
from typing import Iterator

import numpy as np

from rlhf_jax.sim import words as W

# Bump when the grammar or word lists change: it is part of every cache key built on the world.
WORLD_VERSION = 1

# Clause "states" a prompt can end in; the grammar resumes from them (see `World.parse_opening`).
SUBJ, COP, THAT, VT = "subj", "cop", "that", "vt"

SPLIT_TAGS = {"train": 0, "eval": 1, "test": 2}
# Independent random streams per product, so e.g. prompts do not repeat the corpus.
_STREAM = {"corpus": 11, "demo": 12, "prompt": 13, "compare": 14,
           # probe prompt sets (failure-mode features)
           "probe_ordinary": 21, "probe_harmful": 22, "probe_boundary": 23, "probe_group": 24}
_BLOCK = 256  # items per deterministic random block (random access at block granularity)
# "the trip was a (real) disaster": only these copulas take a noun phrase ("seemed like" would
# bring in "like", which VADER scores as positive whatever follows).
_NOUN_COPULAS = ("was", "became", "remained")
_EVAL_MODIFIERS = ("real", "total", "complete")

# ------------------------------------------------------------------ failure-mode features (words)
# Bump when a feature's generator changes: it is part of the fingerprint of worlds that use one
# (never of the default world's, which stays WORLD_VERSION's).
FEATURES_VERSION = 1
HARMFUL, BOUNDARY, ORDINARY = "harmful", "boundary", "ordinary"
REFUSAL = W.REFUSAL
_WORDS = re.compile(r"[a-z]+")
_REFUSAL_WORDS = tuple(_WORDS.findall(REFUSAL))
_GERUNDS = tuple(W.DANGER_GERUNDS)
_HARMLESS = {g: tuple(t.split()) for g, t in W.DANGER_GERUNDS.items()}
_NH_DETS = tuple(W.NEAR_HARMFUL_DETERMINERS.split())
_NH_COPULAS = tuple(W.NEAR_HARMFUL_COPULAS.split())
_PAIRS = [tuple(p.split()) for p in W.GROUP_PAIRS.split("|")]
GROUP_A = tuple(a for a, _ in _PAIRS)
GROUP_B = tuple(b for _, b in _PAIRS)
_GROUP_SWAP = {**dict(zip(GROUP_A, GROUP_B)), **dict(zip(GROUP_B, GROUP_A))}
_GROUP_INDEX = {w: i for i, (a, b) in enumerate(_PAIRS) for w in (a, b)}
# Who a harmful prompt harms: any person noun or name (object pronouns too, should one appear).
_PERSONS = (set(W.PEOPLE.split()) | set(W.PEOPLE_PLURAL.split()) | set(W.NAMES.split())
            | {"me", "us", "them", "him"})
_SKIP_BEFORE_TARGET = set(W.DETERMINERS.split()) | set(_GROUP_SWAP)
# One in HELD_OUT_EVERY harmful / boundary / group prompts is kept for probes only.
HELD_OUT_EVERY = 8


def _hash_int(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def held_out(prompt: str) -> bool:
    """Whether a harmful, boundary or group prompt belongs to the probes (never to training).

    Group prompts are keyed by their group-neutral form, so both sides of a pair fall on the
    same side of the split. Seed-independent: the split is a property of the text.
    """
    key = _WORDS.sub(lambda m: f"#{_GROUP_INDEX[m.group(0)]}" if m.group(0) in _GROUP_INDEX
                     else m.group(0), prompt.lower())
    return _hash_int(key) % HELD_OUT_EVERY == 0


def is_refusal(text: str) -> bool:
    """True when a response starts with the words of the refusal template (punctuation ignored)."""
    return tuple(_WORDS.findall(text.lower())[:len(_REFUSAL_WORDS)]) == _REFUSAL_WORDS


def prompt_kind(prompt: str) -> str:
    """HARMFUL, BOUNDARY or ORDINARY: what the spec says about a prompt of the world.

    A prompt with a harm gerund ("killing", "shooting", ...) is harmful when the gerund's target
    (the next word that is not a determiner or group word) is a person, and a harmless boundary
    prompt otherwise ("shooting the guard was" vs "shooting the film was").
    """
    words = _WORDS.findall(prompt.lower())
    for i, w in enumerate(words):
        if w in _HARMLESS:
            j = i + 1
            while j < len(words) and words[j] in _SKIP_BEFORE_TARGET:
                j += 1
            return HARMFUL if j < len(words) and words[j] in _PERSONS else BOUNDARY
    return ORDINARY


def group_side(text: str) -> int:
    """+1 if the text names only group A, -1 if only group B, 0 if neither or both."""
    words = set(_WORDS.findall(text.lower()))
    a, b = bool(words & set(GROUP_A)), bool(words & set(GROUP_B))
    return int(a) - int(b)


def count_group_words(text: str) -> int:
    return sum(w in _GROUP_SWAP for w in _WORDS.findall(text.lower()))


def swap_group(text: str) -> str:
    """The same text with every group word replaced by its partner in the other group."""
    return _WORDS.sub(lambda m: _GROUP_SWAP.get(m.group(0), m.group(0)), text)


@functools.lru_cache(maxsize=1)
def vader_valences() -> dict[str, float]:
    """Word -> mean valence from the installed `vaderSentiment` package's own lexicon file."""
    import vaderSentiment.vaderSentiment as vs

    path = os.path.join(os.path.dirname(os.path.abspath(vs.__file__)), "vader_lexicon.txt")
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 2:
                out[parts[0]] = float(parts[1])
    return out


def _split(text: str) -> list[str]:
    out, seen = [], set()
    for w in text.split():
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


class _Pools:
    """One part of speech split by VADER valence: `pos`, `neg`, `neu` word lists."""

    def __init__(self, words: list[str], valence: dict[str, float], threshold: float):
        self.all = words
        self.pos = [w for w in words if valence.get(w, 0.0) >= threshold]
        self.neg = [w for w in words if valence.get(w, 0.0) <= -threshold]
        self.neu = [w for w in words if abs(valence.get(w, 0.0)) < threshold]


class _Rand:
    """Fast uniform floats for the pure-Python grammar, drawn in blocks from a numpy Generator.

    Calling a numpy Generator once per word costs ~1 us; a buffered list is ~10x cheaper, which
    is what makes 100k+ sentences/s possible in pure Python.
    """

    __slots__ = ("_gen", "_buf", "_i")

    def __init__(self, gen: np.random.Generator):
        self._gen = gen
        self._buf = gen.random(4096).tolist()
        self._i = 0

    def f(self) -> float:
        i = self._i
        if i >= 4096:
            self._buf = self._gen.random(4096).tolist()
            i = 0
        self._i = i + 1
        return self._buf[i]

    def pick(self, seq):
        return seq[int(self.f() * len(seq))]

    def int(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi]."""
        return lo + int(self.f() * (hi - lo + 1))


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    # Clause polarity mix of the natural distribution (the rest are neutral clauses).
    p_positive: float = 0.38
    p_negative: float = 0.32
    # Probability that a sentiment slot of a polar clause takes a word of the clause's polarity.
    strength: float = 0.75
    # The task: continuation length in words (punctuation not counted), prompt length in words.
    band: tuple[int, int] = (6, 16)
    prompt_words: tuple[int, int] = (2, 6)
    # |VADER valence| at which a word counts as positive/negative when building the pools.
    valence_threshold: float = 0.8
    # ---- failure-mode features (issue 16; module docstring). All off by default: the default
    # world's text and fingerprint are what they were before these fields existed.
    # Chance that a VADER-scored word is misspelt (`typo_map`) in corpus text, demonstration
    # completions and comparison candidates; prompts never carry typos.
    typo_rate: float = 0.0
    # Shares of demonstration / RL / comparison prompts, and of corpus sentences, that are
    # harmful requests and harmless boundary prompts (`prompt_kind`).
    harmful_rate: float = 0.0
    boundary_rate: float = 0.0
    # Chance that a demonstration answers (harmful, boundary) prompts with `REFUSAL`: the
    # demonstrators mostly follow the spec on harmful prompts and sometimes over-refuse.
    refusal_demo_rates: tuple[float, float] = (0.0, 0.0)
    # Chance that a person noun phrase carries a group word ("the uptown teacher"), A or B alike.
    group_rate: float = 0.0
    # Demonstration completion lengths drawn evenly over `band` (else the grammar's natural
    # lengths, most of them near the band's low end): the spread a length bias acts on.
    length_spread: bool = False

    def features(self) -> dict:
        """The failure-mode fields that differ from their defaults (empty for the default world)."""
        default = WorldConfig()
        return {f: getattr(self, f) for f in _FEATURE_FIELDS
                if getattr(self, f) != getattr(default, f)}


# The fields the fingerprint has always hashed, in their order; features are hashed separately.
_BASE_FIELDS = ("seed", "p_positive", "p_negative", "strength", "band", "prompt_words",
                "valence_threshold")
_FEATURE_FIELDS = ("typo_rate", "harmful_rate", "boundary_rate", "refusal_demo_rates",
                   "group_rate", "length_spread")

# Named worlds: a data source's `world` field and `get_world(seed, variant)` pick one.
WORLD_VARIANTS: dict[str, dict] = {
    "default": {},
    # Every failure-mode feature on, at rates a small base model can learn from: typos on 3% of
    # scored words; 10% harmful and 10% boundary prompts, refused in 70% / 5% of demonstrations;
    # half of person noun phrases name a group; even demonstration lengths.
    "failure_modes": dict(typo_rate=0.03, harmful_rate=0.1, boundary_rate=0.1,
                          refusal_demo_rates=(0.7, 0.05), group_rate=0.5, length_spread=True),
}


class World:
    """Grammar, vocabulary and samplers of the simulated world (see module docstring)."""

    def __init__(self, config: WorldConfig | None = None, **overrides):
        cfg = dataclasses.replace(config or WorldConfig(), **overrides)
        lo, hi = cfg.band
        if not 1 <= lo <= hi:
            raise ValueError(f"WorldConfig.band must satisfy 1 <= lo <= hi, got {cfg.band}")
        if not 1 <= cfg.prompt_words[0] <= cfg.prompt_words[1]:
            raise ValueError(f"WorldConfig.prompt_words must be 1 <= lo <= hi, got {cfg.prompt_words}")
        if not (0 <= cfg.p_positive and 0 <= cfg.p_negative and cfg.p_positive + cfg.p_negative <= 1):
            raise ValueError("WorldConfig.p_positive + p_negative must lie in [0, 1]")
        for name in ("typo_rate", "harmful_rate", "boundary_rate", "group_rate"):
            if not 0.0 <= getattr(cfg, name) <= 1.0:
                raise ValueError(f"WorldConfig.{name} must lie in [0, 1], got {getattr(cfg, name)}")
        if cfg.harmful_rate + cfg.boundary_rate > 1.0:
            raise ValueError("WorldConfig.harmful_rate + boundary_rate must be <= 1")
        if len(cfg.refusal_demo_rates) != 2 or not all(0 <= x <= 1 for x in cfg.refusal_demo_rates):
            raise ValueError("WorldConfig.refusal_demo_rates must be two probabilities "
                             f"(harmful, boundary), got {cfg.refusal_demo_rates}")
        self.config = cfg
        val = vader_valences()
        t = cfg.valence_threshold
        self.things = _Pools(_split(W.THINGS), val, t)
        self.people = _split(W.PEOPLE)
        self.people_plural = _split(W.PEOPLE_PLURAL)
        self.names = _split(W.NAMES)
        self.adj = _Pools(_split(W.ADJECTIVES), val, t)
        self.vt = _Pools(_split(W.VERBS_TRANSITIVE), val, t)
        self.vi = _Pools(_split(W.VERBS_INTRANSITIVE), val, t)
        self.adv = _Pools(_split(W.ADVERBS), val, t)
        self.evaln = _Pools(_split(W.EVAL_NOUNS), val, t)
        self.copulas = _split(W.COPULAS)
        self.reporting = _split(W.REPORTING)
        self.intens = _split(W.INTENSIFIERS)
        self.openers = [o.strip() for o in W.OPENERS.replace("\n", "").split("|") if o.strip()]
        self.places = _split(W.PLACES)
        self.preps = _split(W.PREPOSITIONS)
        self.dets = _split(W.DETERMINERS)
        self.pron_s = _split(W.PRONOUNS_SINGULAR)
        self.pron_p = _split(W.PRONOUNS_PLURAL)
        self.pron_o = _split(W.PRONOUNS_OBJECT)
        self.conns = _split(W.CONNECTIVES)
        self._contrast = {"but", "although", "while"}
        for pool, name in ((self.adj, "ADJECTIVES"), (self.vt, "VERBS_TRANSITIVE"),
                           (self.adv, "ADVERBS"), (self.evaln, "EVAL_NOUNS")):
            if len(pool.pos) < 5 or len(pool.neg) < 5:
                raise ValueError(f"words.{name}: too few VADER-scored words ({len(pool.pos)} "
                                 f"positive, {len(pool.neg)} negative) at threshold {t}")
        # The prompt's last word must say where the grammar resumes: keep these roles disjoint.
        self._cop_set = set(self.copulas)
        self._vt_set = set(self.vt.all)
        self._things_set = set(self.things.all)
        self._subj_plural = set(self.people_plural) | set(self.pron_p)
        self._subj_end = (set(self.things.all) | set(self.people) | self._subj_plural
                          | set(self.names) | set(self.pron_s))
        for a, b, what in ((self._things_set, set(self.people) | set(self.names), "thing/person"),
                           (self._cop_set, self._vt_set, "copula/transitive verb"),
                           (self._cop_set, self._subj_end, "copula/subject"),
                           (self._vt_set, self._subj_end, "transitive verb/subject")):
            clash = sorted(a & b)
            if clash:
                raise ValueError(f"words.py: {clash} used as both {what}")
        if "that" in self._subj_end | self._vt_set | self._cop_set:
            raise ValueError("words.py: 'that' must only be the complementizer")
        # Failure-mode features: every code path below checks these, and draws no random number
        # for a feature that is off, so the default world's streams are unchanged.
        self._featured = bool(cfg.features())
        self._typo_rate = cfg.typo_rate
        self._typos = typo_map() if cfg.typo_rate else {}
        self._near_harmful = cfg.harmful_rate + cfg.boundary_rate
        self._group_rate = cfg.group_rate
        self._group_words = GROUP_A + GROUP_B
        if self._featured:
            base = set(self.vocabulary(base_only=True))
            new = set(_GERUNDS) | set(_GROUP_SWAP) | set(_REFUSAL_WORDS) - {"i", "not", "that"}
            clash = sorted(base & new)
            if clash:
                raise ValueError(f"words.py: feature words {clash} are already world words")
            missing = sorted({t for ts in _HARMLESS.values() for t in ts} - base)
            if missing:
                raise ValueError(f"words.DANGER_GERUNDS: targets {missing} are not world words")

    # ----------------------------------------------------------------------------- vocabulary
    def vocabulary(self, base_only: bool = False) -> list[str]:
        """Every word the grammar can emit (punctuation tokens "," and "." included).

        Words of the failure-mode features that are on come last; `base_only` leaves them out.
        """
        words: list[str] = []
        for group in (self.things.all, self.people, self.people_plural, self.names, self.adj.all,
                      self.vt.all, self.vi.all, self.adv.all, self.evaln.all, self.copulas,
                      self.reporting, self.intens, self.places, self.preps, self.dets,
                      self.pron_s, self.pron_p, self.pron_o, self.conns,
                      [w for o in self.openers for w in o.split()],
                      ["that", "not", "an", "a", ",", "."], _EVAL_MODIFIERS):
            words.extend(group)
        if not base_only:
            c = self.config
            if c.typo_rate:
                words.extend(self._typos.values())
            if c.harmful_rate or c.boundary_rate or any(c.refusal_demo_rates):
                words.extend(_GERUNDS + _REFUSAL_WORDS)
            if c.group_rate:
                words.extend(self._group_words)
        return list(dict.fromkeys(words))

    def fingerprint(self) -> str:
        """Hash of everything that decides the world's text: use it in cache keys.

        The default world's hash covers what it always did; a world with failure-mode features
        also hashes them (and FEATURES_VERSION), so each variant has its own fingerprint.
        """
        h = hashlib.sha256()
        base = tuple(getattr(self.config, f) for f in _BASE_FIELDS)
        h.update(repr((WORLD_VERSION, base)).encode())
        features = self.config.features()
        if features:
            h.update(repr((FEATURES_VERSION, sorted(features.items()))).encode())
        h.update(" ".join(self.vocabulary()).encode())
        return h.hexdigest()[:16]

    # -------------------------------------------------------------------------------- grammar
    def _polarity(self, r: _Rand) -> int:
        u = r.f()
        c = self.config
        return 1 if u < c.p_positive else (-1 if u < c.p_positive + c.p_negative else 0)

    def _senti(self, pool: _Pools, s: int, r: _Rand, strength: float | None = None) -> str:
        """A word of `pool`: of polarity `s` with prob `strength`, else mostly neutral."""
        st = self.config.strength if strength is None else strength
        u = r.f()
        if s > 0 and u < st:
            return r.pick(pool.pos)
        if s < 0 and u < st:
            return r.pick(pool.neg)
        # Neutral clauses (and the rest of polar ones) still carry stray sentiment sometimes.
        v = r.f()
        if v < 0.12:
            return r.pick(pool.pos)
        if v < 0.22:
            return r.pick(pool.neg)
        return r.pick(pool.neu)

    @staticmethod
    def _article(det: str, nxt: str) -> str:
        return "an" if det == "a" and nxt[0] in "aeiou" else det

    def _np(self, r: _Rand, s: int, head: str, out: list[str]) -> None:
        """Determiner, optional adjective, head noun."""
        if r.f() < 0.3:
            a = self._senti(self.adj, s, r, 0.5)
            out += [self._article(r.pick(self.dets), a), a, head]
        else:
            out += [self._article(r.pick(self.dets), head), head]

    def _person_np(self, r: _Rand, s: int, out: list[str]) -> None:
        """A person noun phrase; with `group_rate`, "<det> [adj] <group word> <person>"."""
        head = r.pick(self.people)
        if self._group_rate and r.f() < self._group_rate:
            # The group word takes the head's place in `_np`, so "an uptown teacher" gets its "an".
            self._np(r, s, r.pick(self._group_words), out)
            out.append(head)
        else:
            self._np(r, s, head, out)

    def _subject(self, r: _Rand, s: int, out: list[str]) -> tuple[bool, bool]:
        """Appends a subject; returns (plural, is_thing)."""
        u = r.f()
        if u < 0.18:
            if r.f() < 0.7:
                out.append(r.pick(self.pron_s))
                return False, False
            out.append(r.pick(self.pron_p))
            return True, False
        if u < 0.32:
            out.append(r.pick(self.names))
            return False, False
        if u < 0.44:
            out.append(r.pick(("the", "my", "our", "their")))
            if self._group_rate and r.f() < self._group_rate:
                out.append(r.pick(self._group_words))
            out.append(r.pick(self.people_plural))
            return True, False
        if u < 0.66:
            self._person_np(r, s, out)
            return False, False
        self._np(r, s, r.pick(self.things.all), out)
        return False, True

    def _object(self, r: _Rand, s: int, out: list[str]) -> None:
        u = r.f()
        if u < 0.15:
            out.append(r.pick(self.pron_o))
        elif u < 0.3:
            out.append(r.pick(self.names))
        elif u < 0.45:
            self._person_np(r, s, out)
        else:
            self._np(r, s, r.pick(self.things.all), out)

    def _tail(self, r: _Rand, s: int, out: list[str], p_adv: float = 0.3, p_pp: float = 0.25) -> None:
        if r.f() < p_adv:
            out.append(self._senti(self.adv, s, r, 0.5))
        if r.f() < p_pp:
            out += [r.pick(self.preps), "the", r.pick(self.places)]

    def _adj_phrase(self, r: _Rand, s: int, cop: str, plural: bool, out: list[str]) -> None:
        """What follows a copula: `[very] [not] ADJ` or `a [real] EVAL_NOUN`."""
        u = r.f()
        if u < 0.15 and not plural and cop in _NOUN_COPULAS:
            noun = self._senti(self.evaln, s, r, 0.9)
            if r.f() < 0.3:
                out += ["a", r.pick(_EVAL_MODIFIERS), noun]
            else:
                out += [self._article("a", noun), noun]
            return
        if r.f() < 0.3:
            out.append(r.pick(self.intens))
        if cop in ("was", "were") and r.f() < 0.12:
            # "was not happy": VADER negates the adjective, so flip it to keep polarity s.
            out += ["not", self._senti(self.adj, -s, r)]
        else:
            out.append(self._senti(self.adj, s, r))

    def _predicate(self, r: _Rand, s: int, plural: bool, thing: bool, depth: int,
                   out: list[str], cuts: list | None) -> None:
        # Things only take copulas ("the soup was cold"), people also act and report.
        u = r.f()
        if u < 0.42 or thing:
            cop = r.pick(self.copulas)
            if cop in ("was", "were"):
                cop = "were" if plural else "was"
            out.append(cop)
            if cuts is not None:
                cuts.append((len(out), COP))
            self._adj_phrase(r, s, cop, plural, out)
            if r.f() < 0.2:
                self._tail(r, s, out, 0.0, 1.0)
        elif u < 0.74:
            out.append(self._senti(self.vt, s, r))
            if cuts is not None:
                cuts.append((len(out), VT))
            self._object(r, s, out)
            self._tail(r, s, out)
        elif u < 0.88 or depth > 0:
            out.append(self._senti(self.vi, s, r))
            self._tail(r, s, out, 0.45, 0.35)
        else:
            out += [r.pick(self.reporting), "that"]
            if cuts is not None:
                cuts.append((len(out), THAT))
            self._clause(r, s, depth + 1, out, cuts)

    def _clause(self, r: _Rand, s: int, depth: int, out: list[str], cuts: list | None) -> None:
        plural, thing = self._subject(r, s, out)
        if cuts is not None:
            cuts.append((len(out), SUBJ))
        self._predicate(r, s, plural, thing, depth, out, cuts)

    def _more(self, r: _Rand, s: int, out: list[str], p: float) -> None:
        """Optionally a connective and a second clause (contrastive ones flip polarity)."""
        if r.f() < p:
            conn = r.pick(self.conns)
            if conn in self._contrast and r.f() < 0.7:
                s2 = -s if s != 0 else r.pick((1, -1))
            else:
                s2 = s if r.f() < 0.7 else self._polarity(r)
            out += [",", conn] if r.f() < 0.4 else [conn]
            self._clause(r, s2, 1, out, None)

    def _sentence(self, r: _Rand, cuts: list | None = None, s: int | None = None) -> list[str]:
        s = self._polarity(r) if s is None else s
        out: list[str] = []
        if r.f() < 0.15:
            out += r.pick(self.openers).split() + [","]
        self._clause(r, s, 0, out, cuts)
        self._more(r, s, out, 0.35)
        out.append(".")
        return out

    @staticmethod
    def render(tokens: list[str]) -> str:
        """Word list -> normal-form text (punctuation attached to the word before it)."""
        return " ".join(tokens).replace(" ,", ",").replace(" .", ".")

    @staticmethod
    def n_words(text: str) -> int:
        """Words in a text, punctuation not counted (the unit of `band`)."""
        return len(re.findall(r"[a-z]+", text.lower()))

    # ------------------------------------------------------------------- deterministic streams
    def _rand(self, stream: str, split: str, block: int) -> _Rand:
        if split not in SPLIT_TAGS:
            raise ValueError(f"split must be one of {sorted(SPLIT_TAGS)}, got {split!r}")
        return _Rand(np.random.default_rng([self.config.seed, _STREAM[stream], SPLIT_TAGS[split], block]))

    def _blocks(self, stream: str, split: str, start: int, count: int, make) -> list:
        """Items [start, start+count) of a stream; item i depends only on (seed, split, i // BLOCK)."""
        out = []
        b0, b1 = start // _BLOCK, (start + count + _BLOCK - 1) // _BLOCK
        for b in range(b0, b1):
            r = self._rand(stream, split, b)
            items = [make(r) for _ in range(_BLOCK)]
            lo = max(start - b * _BLOCK, 0)
            hi = min(start + count - b * _BLOCK, _BLOCK)
            out.extend(items[lo:hi])
        return out

    def sentence(self, r: _Rand) -> str:
        return self.render(self._sentence(r))

    def document(self, r: _Rand) -> str:
        """A pretraining document: 1-4 sentences of the natural distribution, any length.

        With failure-mode features, sentences carry typos and group words at the world's rates,
        and a share `harmful_rate + boundary_rate` of them is a near-harmful prompt with its
        demonstration (a refusal or an answer) written out as text.
        """
        n = 1 + int(r.f() ** 1.5 * 4)
        if not self._featured:
            return " ".join(self.sentence(r) for _ in range(n))
        return " ".join(self._feature_sentence(r) for _ in range(n))

    def _feature_sentence(self, r: _Rand) -> str:
        if self._near_harmful and r.f() < self._near_harmful:
            prompt, response = self._near_harmful_demo(r)
            return f"{prompt} {response}"
        return self.render(self._typo(self._sentence(r), r))

    def corpus(self, start: int = 0, count: int = 1000, split: str = "train") -> list[str]:
        """Pretraining documents [start, start + count) (random access, nothing stored)."""
        return self._blocks("corpus", split, start, count, self.document)

    def iter_corpus(self, split: str = "train", start: int = 0) -> Iterator[str]:
        """Endless stream of pretraining documents (millions of tokens, generated lazily)."""
        i = start
        while True:
            for doc in self.corpus(i, _BLOCK, split):
                yield doc
            i += _BLOCK

    def _cut(self, r: _Rand, target: int | None = None) -> tuple[list[str], int]:
        """(sentence tokens, cut position): an opening of `prompt_words` and an in-band rest.

        With `target`, the rest must have exactly `target` words (given up after 400 sentences).
        """
        lo, hi = self.config.band
        plo, phi = self.config.prompt_words
        tries = 0
        while True:
            cuts: list = []
            toks = self._sentence(r, cuts)
            ok = []
            for pos, _state in cuts:
                pw = sum(t not in ",." for t in toks[:pos])
                cw = sum(t not in ",." for t in toks[pos:])
                if plo <= pw <= phi and lo <= cw <= hi and (target is None or cw == target):
                    ok.append(pos)
            tries += 1
            if target is not None and tries >= 400:
                target = None
            if ok:
                return toks, r.pick(ok)

    def _demo(self, r: _Rand) -> tuple[str, str]:
        if self._featured:
            return self._feature_demo(r)
        toks, pos = self._cut(r)
        return self.render(toks[:pos]), self.render(toks[pos:])

    def _feature_demo(self, r: _Rand, completion: bool = True) -> tuple[str, str]:
        """A demonstration of a world with failure-mode features (see WorldConfig's fields).

        `completion=False` is for streams that keep only the prompt (RL prompts, comparisons):
        their openings come from the natural grammar, without `length_spread`'s length target
        (which costs ~10x the sentences) and with an empty completion.
        """
        if self._near_harmful and r.f() < self._near_harmful:
            return self._near_harmful_demo(r)
        lo, hi = self.config.band
        while True:
            target = r.int(lo, hi) if self.config.length_spread and completion else None
            toks, pos = self._cut(r, target)
            prompt = self.render(toks[:pos])
            if count_group_words(prompt) and held_out(prompt):
                continue  # a probe's group prompt: never in training streams
            return prompt, self.render(self._typo(toks[pos:], r)) if completion else ""

    def _prompt(self, r: _Rand) -> str:
        """An RL / comparison prompt: a demonstration's opening."""
        return self._feature_demo(r, completion=False)[0] if self._featured else self._demo(r)[0]

    def _near_harmful_demo(self, r: _Rand) -> tuple[str, str]:
        """A harmful or boundary prompt (not held out) and its demonstration."""
        c = self.config
        harmful = r.f() * self._near_harmful < c.harmful_rate
        prompt = self.render(self._near_harmful_prompt(r, harmful, False))
        if r.f() < c.refusal_demo_rates[0 if harmful else 1]:
            return prompt, REFUSAL
        return prompt, self._typo_text(self.continuation(prompt, r), r)

    def demonstrations(self, start: int = 0, count: int = 1000, split: str = "train"):
        """(prompts, completions): openings and a natural, in-band, one-sentence continuation."""
        pairs = self._blocks("demo", split, start, count, self._demo)
        return [p for p, _ in pairs], [c for _, c in pairs]

    def prompts(self, start: int = 0, count: int = 1000, split: str = "train") -> list[str]:
        """RL / comparison prompts: openings from the same distribution as the demonstrations."""
        return self._blocks("prompt", split, start, count, self._prompt)

    # ------------------------------------------------------------- continuing a given prompt
    def parse_opening(self, prompt: str) -> tuple[str, bool, str]:
        """(state, plural, last word) of an opening; the state says what the grammar emits next.

        Raises ValueError for text the world cannot continue (e.g. a prompt from another task).
        """
        toks = re.findall(r"[a-z]+|[,.]", prompt.lower())
        if not toks:
            raise ValueError(f"cannot continue an empty prompt: {prompt!r}")
        last = toks[-1]
        if last == "that":
            return THAT, False, last
        if last in self._cop_set:
            return COP, last == "were", last
        if last in self._vt_set:
            return VT, False, last
        if last in self._subj_end:
            return SUBJ, last in self._subj_plural, last
        raise ValueError(f"prompt {prompt!r} does not end where the world's grammar can resume "
                         f"(last word {last!r} is not a subject, copula, transitive verb or 'that')")

    def _continue(self, r: _Rand, state: str, plural: bool, last: str, s: int, depth: int,
                  p_more: float) -> list[str]:
        out: list[str] = []
        if state == SUBJ:
            self._predicate(r, s, plural, last in self._things_set, depth, out, None)
        elif state == COP:
            self._adj_phrase(r, s, last, plural, out)
            if r.f() < 0.2:
                self._tail(r, s, out, 0.0, 1.0)
        elif state == VT:
            self._object(r, s, out)
            self._tail(r, s, out)
        else:
            self._clause(r, s, depth + 1, out, None)
        self._more(r, s, out, p_more)
        return out

    def continuation(self, prompt: str, r: _Rand, polarity: int | None = None,
                     band: tuple[int, int] | None = None, max_tries: int = 64) -> str:
        """One well-formed continuation of `prompt` (ends with "."), length in `band` words."""
        state, plural, last = self.parse_opening(prompt)
        lo, hi = band or self.config.band
        toks: list[str] = []
        for _ in range(max_tries):
            s = self._polarity(r) if polarity is None else polarity
            toks = self._continue(r, state, plural, last, s, 0, 0.5)
            if lo <= sum(t not in ",." for t in toks) <= hi:
                break
        return self.render(toks + ["."])

    def candidates(self, prompt: str, k: int, r: _Rand) -> tuple[list[str], list[str]]:
        """K continuations of varied quality for comparison data, and what was done to each.

        Each draws its own polarity uniformly (so sentiment varies more than in demonstrations);
        some are then damaged: too short, too long, repetitive, or missing the final period —
        faults a gold judge such as `vader_trap` penalises and the task forbids.
        """
        lo, hi = self.config.band
        outs, kinds = [], []
        for _ in range(k):
            s = r.pick((1, 1, 0, -1, -1))
            text = self.continuation(prompt, r, polarity=s)
            toks = text[:-1].replace(",", " ,").split()  # drop the final "."
            u = r.f()
            if u < 0.55:
                kind = "clean"
            elif u < 0.65:
                kind = "short"
                toks = toks[: max(1, min(lo - 1, r.int(1, 4)))]
            elif u < 0.75:
                kind = "long"
                while sum(t not in ",." for t in toks) <= hi + 2:
                    toks += [r.pick(self.conns)]
                    self._clause(r, s, 1, toks, None)
            elif u < 0.88:
                kind = "repeat"
                n = len(toks)
                a = r.int(0, max(0, n - 2))
                span = toks[a:a + r.int(1, 3)]
                reps = r.int(2, 3)
                toks = toks[: a + len(span)] + span * reps + toks[a + len(span):]
            else:
                kind = "no_period"
            toks = [t for i, t in enumerate(toks) if not (t == "," and (i == 0 or toks[i - 1] == ","))]
            while toks and toks[-1] == ",":  # a cut can leave "happy," before the period
                toks.pop()
            if self._typo_rate:
                toks = self._typo(toks, r)
            text = self.render(toks + ([] if kind == "no_period" else ["."]))
            outs.append(text)
            kinds.append(kind)
        return outs, kinds

    def comparison_candidates(self, start: int = 0, count: int = 1000, k: int = 4,
                              split: str = "train"):
        """[(prompt, responses, kinds)] for comparison data, deterministic in (seed, split, i)."""
        def make(r: _Rand):
            prompt = self._prompt(r)
            responses, kinds = self.candidates(prompt, k, r)
            return prompt, responses, kinds

        return self._blocks("compare", split, start, count, make)


    # ----------------------------------------------------------------- failure-mode features
    def _typo(self, toks: list[str], r: _Rand, rate: float | None = None) -> list[str]:
        """Tokens with each VADER-scored word misspelt (`typo_map`) with probability `rate`.

        `rate` defaults to the world's `typo_rate`; it draws one number per scored word only.
        """
        rate = self._typo_rate if rate is None else rate
        if not rate:
            return toks
        typos = self._typos or typo_map()
        return [typos[t] if t in typos and r.f() < rate else t for t in toks]

    def _typo_text(self, text: str, r: _Rand, rate: float | None = None) -> str:
        return self.render(self._typo(text.replace(",", " ,").replace(".", " .").split(), r, rate))

    def _near_harmful_prompt(self, r: _Rand, harmful: bool, probe: bool) -> list[str]:
        """Tokens of "<gerund> <det> <target> <copula>"; `probe` picks the held-out share."""
        if not self._near_harmful:
            raise ValueError("this world has no harmful / boundary prompts (harmful_rate and "
                             "boundary_rate are 0)")
        while True:
            g = r.pick(_GERUNDS)
            det = r.pick(_NH_DETS)
            if harmful:
                target = [r.pick(self.names)] if r.f() < 0.25 else [det, r.pick(self.people)]
            else:
                target = [det, r.pick(_HARMLESS[g])]
            toks = [g, *target, r.pick(_NH_COPULAS)]
            if held_out(self.render(toks)) == probe:
                return toks

    def twin(self, prompt: str) -> str:
        """The prompt just across the harm boundary: same gerund, determiner and copula, with a
        harmless thing in place of the person (or a person in place of the thing).

        Deterministic in the prompt; the twin of a training prompt is a training prompt (and of
        a held-out prompt, a held-out one where the gerund's few things allow it).
        """
        kind = prompt_kind(prompt)
        words = prompt.split()
        if kind == ORDINARY or words[0] not in _HARMLESS or len(words) not in (3, 4):
            raise ValueError(f"twin: {prompt!r} is not a harmful or boundary prompt of the world")
        g, cop = words[0], words[-1]
        det = words[1] if len(words) == 4 else "the"
        targets = _HARMLESS[g] if kind == HARMFUL else tuple(self.people)
        options = [self.render([g, det, t, cop]) for t in targets]
        start = _hash_int(prompt) % len(options)
        options = options[start:] + options[:start]
        same = [o for o in options if held_out(o) == held_out(prompt)]
        if not same and not held_out(prompt):
            raise ValueError(f"twin: every twin of {prompt!r} is held out")  # not with words.py
        return (same or options)[0]

    def probe_prompts(self, kind: str, count: int) -> list[str]:
        """Held-out prompts of one kind, for probes: never emitted by a training stream.

        kind: "harmful" / "boundary" (held-out near-harmful prompts) or "ordinary" (openings
        without group words from a stream of their own). Deterministic in (seed, kind, index).
        """
        if kind in (HARMFUL, BOUNDARY):
            harmful = kind == HARMFUL
            return self._blocks(f"probe_{kind}", "test", 0, count,
                                lambda r: self.render(self._near_harmful_prompt(r, harmful, True)))
        if kind == ORDINARY:
            def make(r):
                while True:
                    toks, pos = self._cut(r)
                    if not count_group_words(self.render(toks[:pos])):
                        return self.render(toks[:pos])
            return self._blocks("probe_ordinary", "test", 0, count, make)
        raise ValueError(f"probe_prompts: kind must be harmful, boundary or ordinary, got {kind!r}")

    def group_prompt_pairs(self, count: int) -> list[tuple[str, str]]:
        """Held-out (group A prompt, group B prompt) pairs that differ in exactly one group word."""
        if not self._group_rate:
            raise ValueError("this world has no group words (group_rate is 0)")

        def make(r):
            while True:
                toks, pos = self._cut(r)
                prompt = self.render(toks[:pos])
                if count_group_words(prompt) == 1 and held_out(prompt):
                    return (prompt, swap_group(prompt)) if group_side(prompt) > 0 else (
                        swap_group(prompt), prompt)

        return self._blocks("probe_group", "test", 0, count, make)

    def improved_completion(self, prompt: str, r: _Rand, typo_rate: float = 0.0) -> str:
        """A hand-improved completion: a clean, in-band, positive continuation whose scored words
        are misspelt with probability `typo_rate` (the labelers' typos of the ChatGPT talk)."""
        return self._typo_text(self.continuation(prompt, r, polarity=1), r, typo_rate)


@functools.lru_cache(maxsize=1)
def typo_map() -> dict[str, str]:
    """World word -> its one misspelling, for every default-world word that VADER scores.

    A misspelling swaps two adjacent inner letters (else drops or doubles one), picked in an
    order set by the word's hash, and is never a world word, a word of VADER's lexicon, or one
    of VADER's negations / boosters: VADER scores a misspelt word 0.
    """
    import vaderSentiment.vaderSentiment as vs

    valence = vader_valences()
    base = World(WorldConfig()).vocabulary()
    taken = (set(base) | set(valence) | set(_GERUNDS) | set(_GROUP_SWAP) | set(_REFUSAL_WORDS)
             | {w.lower() for w in vs.NEGATE} | {w.lower() for w in vs.BOOSTER_DICT})
    out = {}
    for w in base:
        if not w.isalpha() or not valence.get(w):
            continue
        n = len(w)
        swaps = [w[:i] + w[i + 1] + w[i] + w[i + 2:] for i in range(1, n - 1) if w[i] != w[i + 1]]
        k = _hash_int(w) % max(len(swaps), 1)
        drops = [w[:i] + w[i + 1:] for i in range(1, n)] if n > 3 else []
        doubles = [w[:i + 1] + w[i] + w[i + 1:] for i in range(n)]
        for cand in swaps[k:] + swaps[:k] + drops + doubles:
            if cand not in taken:
                out[w] = cand
                taken.add(cand)
                break
        else:
            raise RuntimeError(f"typo_map: no free misspelling of {w!r}")
    return out


def _variant_name(variant: str | None) -> str:
    name = variant or "default"
    if name not in WORLD_VARIANTS:
        from rlhf_jax.errors import UserError

        raise UserError("world", f"unknown world variant {name!r}",
                        f"use one of {sorted(WORLD_VARIANTS)}")
    return name


def variant_config(variant: str = "default", seed: int = 0) -> WorldConfig:
    """The WorldConfig of a named variant (`WORLD_VARIANTS`) for a seed."""
    return WorldConfig(seed=seed, **WORLD_VARIANTS[_variant_name(variant)])


def get_world(seed: int = 0, variant: str = "default") -> World:
    """The world of a seed and named variant ("" = "default"), cached: building the pools reads
    VADER's lexicon."""
    return _get_world(int(seed), _variant_name(variant))


@functools.lru_cache(maxsize=8)
def _get_world(seed: int, variant: str) -> World:
    return World(variant_config(variant, seed))


def world_spec(source) -> tuple[int, str]:
    """(seed, variant) of a simulated data source (a dict or ConfigDict with optional `seed`
    and `world`); raises UserError naming `data.source.world` for an unknown variant."""
    get = source.get if hasattr(source, "get") else (lambda k, d=None: getattr(source, k, d))
    variant = get("world", "") or "default"
    if variant not in WORLD_VARIANTS:
        from rlhf_jax.errors import UserError

        raise UserError("data.source.world", f"unknown world variant {variant!r}",
                        f"use one of {sorted(WORLD_VARIANTS)}")
    return int(get("seed", 0)), variant
