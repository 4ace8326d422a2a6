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
_STREAM = {"corpus": 11, "demo": 12, "prompt": 13, "compare": 14}
_BLOCK = 256  # items per deterministic random block (random access at block granularity)
# "the trip was a (real) disaster": only these copulas take a noun phrase ("seemed like" would
# bring in "like", which VADER scores as positive whatever follows).
_NOUN_COPULAS = ("was", "became", "remained")
_EVAL_MODIFIERS = ("real", "total", "complete")


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

    # ----------------------------------------------------------------------------- vocabulary
    def vocabulary(self) -> list[str]:
        """Every word the grammar can emit (punctuation tokens "," and "." included)."""
        words: list[str] = []
        for group in (self.things.all, self.people, self.people_plural, self.names, self.adj.all,
                      self.vt.all, self.vi.all, self.adv.all, self.evaln.all, self.copulas,
                      self.reporting, self.intens, self.places, self.preps, self.dets,
                      self.pron_s, self.pron_p, self.pron_o, self.conns,
                      [w for o in self.openers for w in o.split()],
                      ["that", "not", "an", "a", ",", "."], _EVAL_MODIFIERS):
            words.extend(group)
        return list(dict.fromkeys(words))

    def fingerprint(self) -> str:
        """Hash of everything that decides the world's text: use it in cache keys."""
        h = hashlib.sha256()
        h.update(repr((WORLD_VERSION, dataclasses.astuple(self.config))).encode())
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
            out += [r.pick(("the", "my", "our", "their")), r.pick(self.people_plural)]
            return True, False
        if u < 0.66:
            self._np(r, s, r.pick(self.people), out)
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
            self._np(r, s, r.pick(self.people), out)
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
        """A pretraining document: 1-4 sentences of the natural distribution, any length."""
        n = 1 + int(r.f() ** 1.5 * 4)
        return " ".join(self.sentence(r) for _ in range(n))

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

    def _demo(self, r: _Rand) -> tuple[str, str]:
        lo, hi = self.config.band
        plo, phi = self.config.prompt_words
        while True:
            cuts: list = []
            toks = self._sentence(r, cuts)
            ok = []
            for pos, _state in cuts:
                pw = sum(t not in ",." for t in toks[:pos])
                cw = sum(t not in ",." for t in toks[pos:])
                if plo <= pw <= phi and lo <= cw <= hi:
                    ok.append(pos)
            if ok:
                pos = r.pick(ok)
                return self.render(toks[:pos]), self.render(toks[pos:])

    def demonstrations(self, start: int = 0, count: int = 1000, split: str = "train"):
        """(prompts, completions): openings and a natural, in-band, one-sentence continuation."""
        pairs = self._blocks("demo", split, start, count, self._demo)
        return [p for p, _ in pairs], [c for _, c in pairs]

    def prompts(self, start: int = 0, count: int = 1000, split: str = "train") -> list[str]:
        """RL / comparison prompts: openings from the same distribution as the demonstrations."""
        return self._blocks("prompt", split, start, count, lambda r: self._demo(r)[0])

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
            text = self.render(toks + ([] if kind == "no_period" else ["."]))
            outs.append(text)
            kinds.append(kind)
        return outs, kinds

    def comparison_candidates(self, start: int = 0, count: int = 1000, k: int = 4,
                              split: str = "train"):
        """[(prompt, responses, kinds)] for comparison data, deterministic in (seed, split, i)."""
        def make(r: _Rand):
            prompt = self._demo(r)[0]
            responses, kinds = self.candidates(prompt, k, r)
            return prompt, responses, kinds

        return self._blocks("compare", split, start, count, make)


@functools.lru_cache(maxsize=8)
def get_world(seed: int = 0) -> World:
    """The default world for a seed (cached: building the pools reads VADER's lexicon)."""
    return World(WorldConfig(seed=seed))
