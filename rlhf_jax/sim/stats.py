"""Measure the simulated world: `python -m rlhf_jax.sim.stats [--seed 0] [--world failure_modes]
[--out stats.json]`.

Prints the numbers worth knowing before sizing a model or a run on it: vocabulary and tokenizer
size, tokens per sentence / prompt / continuation, generation speed, VADER speed, the gold
score's mean and spread on demonstrations (SFT's starting point) and on comparison candidates,
the calibrated annotator temperature, and the TFDS import time; for a world with failure-mode
features, their measured rates too. Measured, never asserted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import numpy as np


def measure(seed: int = 0, n: int = 20_000, variant: str = "default") -> dict:
    from rlhf_jax.sim.annotators import calibrate_tau
    from rlhf_jax.sim.judges import get_judge
    from rlhf_jax.sim.tokenizer import world_tokenizer
    from rlhf_jax.sim.world import _Rand, get_world, vader_valences

    w = get_world(seed, variant)
    out: dict = {"seed": seed, "world": variant, "vocabulary_words": len(w.vocabulary())}
    val = vader_valences()
    out["vader_scored_words"] = sum(abs(val.get(x, 0.0)) > 0 for x in w.vocabulary())

    t = time.perf_counter()
    docs = w.corpus(0, n)
    dt = time.perf_counter() - t
    sentences = sum(d.count(".") for d in docs)
    out["corpus_docs_per_s"] = round(n / dt)
    out["corpus_sentences_per_s"] = round(sentences / dt)
    t = time.perf_counter()
    prompts, completions = w.demonstrations(0, n)
    out["demonstrations_per_s"] = round(n / (time.perf_counter() - t))

    with tempfile.TemporaryDirectory() as d:
        tok, _ = world_tokenizer(seed, directory=f"{d}/tok", variant=variant)
    out["tokenizer_vocab"] = len(tok)
    enc = tok(docs, add_special_tokens=False)["input_ids"]
    out["tokens_per_sentence"] = round(sum(map(len, enc)) / sentences, 2)
    out["tokens_per_doc"] = round(float(np.mean([len(e) for e in enc])), 2)
    p_len = [len(x) for x in tok(prompts, add_special_tokens=False)["input_ids"]]
    c_len = [len(x) for x in tok(completions, add_special_tokens=False)["input_ids"]]
    out["prompt_tokens_mean_max"] = [round(float(np.mean(p_len)), 2), max(p_len)]
    out["completion_tokens_mean_max"] = [round(float(np.mean(c_len)), 2), max(c_len)]

    vader = get_judge("vader")
    t = time.perf_counter()
    g = vader.score(prompts, completions)
    out["vader_texts_per_s_demonstrations"] = round(n / (time.perf_counter() - t))
    out["vader_on_demonstrations_mean_std"] = [round(float(g.mean()), 4), round(float(g.std()), 4)]
    out["vader_on_demonstrations_frac_pos_neg_zero"] = [
        round(float((g > 0.05).mean()), 3), round(float((g < -0.05).mean()), 3),
        round(float((g == 0).mean()), 3)]
    trap = get_judge("vader_trap").score(prompts, completions)
    out["vader_trap_on_demonstrations_mean_std"] = [round(float(trap.mean()), 4), round(float(trap.std()), 4)]

    r = _Rand(np.random.default_rng(seed))
    m = n // 10
    t = time.perf_counter()
    cands = [w.candidates(p, 4, r)[0] for p in prompts[:m]]
    out["candidate_sets_per_s_k4"] = round(m / (time.perf_counter() - t))
    flat = [c for cs in cands for c in cs]
    fresh = get_judge("vader")  # a fresh memo: measure VADER itself
    t = time.perf_counter()
    gc = fresh.score(flat, flat).reshape(m, 4)
    out["vader_texts_per_s_candidates"] = round(len(flat) / (time.perf_counter() - t))
    out["vader_on_candidates_mean_std"] = [round(float(gc.mean()), 4), round(float(gc.std()), 4)]
    out["tau_at_0.73_within_prompt"] = round(calibrate_tau(gc, 0.73), 4)

    if w.config.features():
        out["features"] = _features(w, docs, prompts, completions)

    code = "import time; t=time.perf_counter(); import tensorflow_datasets; print(time.perf_counter()-t)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    out["tfds_import_s"] = round(float(res.stdout.strip().splitlines()[-1]), 3)
    return out


def _features(w, docs, prompts, completions) -> dict:
    """Measured rates of the failure-mode features (compare with `w.config`)."""
    from rlhf_jax.sim import probes
    from rlhf_jax.sim.world import count_group_words, prompt_kind

    kinds = np.asarray([prompt_kind(p) for p in prompts])
    refused = np.asarray([probes.refusal_rate([c]) for c in completions])
    answers = [c for c, k, x in zip(completions, kinds, refused) if k == "ordinary"]
    lengths = np.asarray([w.n_words(c) for c in answers])
    out = {"typo_rate_corpus": round(probes.typo_rate(docs), 4),
           "typo_rate_demonstrations": round(probes.typo_rate(completions), 4),
           "typo_rate_prompts": round(probes.typo_rate(prompts), 4),
           "group_prompt_share": round(float(np.mean([count_group_words(p) > 0
                                                       for p in prompts])), 4)}
    for k in ("harmful", "boundary", "ordinary"):
        m = kinds == k
        out[f"{k}_prompt_share"] = round(float(m.mean()), 4)
        out[f"{k}_demo_refusal_rate"] = round(float(refused[m].mean()), 4) if m.any() else None
    if lengths.size:
        out["demo_words_mean_std_min_max"] = [round(float(lengths.mean()), 2),
                                              round(float(lengths.std()), 2),
                                              int(lengths.min()), int(lengths.max())]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--world", default="default", help="world variant (WORLD_VARIANTS)")
    ap.add_argument("--out", default=None, help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)
    stats = measure(args.seed, args.n, args.world)
    print(json.dumps(stats, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(stats, f, indent=1)


if __name__ == "__main__":
    main()
