"""Best-of-n of the SFT policy against the RM: gold and proxy for every n <= N against sqrt(KL).

    python -m experiments.best_of_n                                   # N = 16, 512 prompts
    python -m experiments.best_of_n --config.n=256 --config.num_prompts=128   # Gao et al. 2022
    python -m experiments.best_of_n --config=configs/best_of_n_sim.py:tiny

The SFT and RM stages are the pipeline's (run, or reused from its cache: experiments.pipeline
`base_stages`), or `--config.sft_from` / `--config.rm_from`. N samples per held-out prompt are
drawn once (stream `rng.Purpose.BEST_OF_N_CURVES`), scored by the RM (the proxy best-of-n
maximises) and by the gold judges (never seen by the RM), and every n <= N is estimated from
them without bias (`rlhf_jax.bon`, Nakano et al. 2021), with bootstrap SEs over prompts, the
analytic KL_bon = log n - (n - 1)/n and the plug-in empirical KL of the samples.

Writes `<workdir>/bon.csv`, `<workdir>/bon.png` (gold and proxy vs sqrt(KL)) and
`<workdir>/summary.json`, and prints a table and a verdict: best-of-N's gold against SFT's
(n = 1, the same samples), with the paired bootstrap SE of the difference.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from experiments import lib
from rlhf_jax import bon, rng, validation
from rlhf_jax.errors import UserError
from rlhf_jax.trainer import Placement


def stage_dirs(config) -> tuple[Path, Path]:
    """The SFT and RM work dirs: given, or the pipeline's (run or reused)."""
    if bool(config.sft_from) != bool(config.rm_from):
        raise UserError("config.sft_from", "only one of sft_from / rm_from is set",
                        "give both finished stages, or neither to use the pipeline's")
    if config.sft_from:
        return Path(config.sft_from), Path(config.rm_from)
    from experiments import pipeline

    dirs, _ = pipeline.base_stages(config.pipeline)
    return dirs["sft"], dirs["rm"]


def validate(config) -> None:
    """Everything the run reads at its end, before the stages it samples from train: the
    best-of-n size, the gold judge, the prompt count against the held-out prompts, and that
    sft_from / rm_from come together."""
    from rlhf_jax import evaluation

    validation.check_best_of_n(config.n, "config.n")
    judges = tuple(config.eval.judges)
    evaluation.get_judges(judges, "config.eval.judges")
    if not config.eval.gold or config.eval.gold not in judges:
        raise UserError("config.eval.gold", f"{config.eval.gold!r} is not one of config.eval."
                        f"judges {judges}", "best-of-n needs a gold judge among the judges")
    validation.check_prompt_count(config.num_prompts, config.prompts, "config.num_prompts",
                                  "config.prompts")
    if bool(config.sft_from) != bool(config.rm_from):
        raise UserError("config.sft_from", "only one of sft_from / rm_from is set",
                        "give both finished stages, or neither to use the pipeline's")


def sample_and_score(config, sft_dir: Path, rm_dir: Path) -> lib.BonSamples:
    """N samples of each of the first `num_prompts` held-out prompts, scored by the RM (proxy
    "rm") and every judge of `config.eval.judges` (`lib.bon_samples`, on the SFT stage's mesh)."""
    from rlhf_jax.data import sources

    validate(config)
    n, judges = int(config.n), tuple(config.eval.judges)
    prompts = sources.from_config(config.prompts, "config.prompts").prompts("eval")
    return lib.bon_samples(sft_dir, {"rm": rm_dir}, prompts[:int(config.eval.num_prompts)], n,
                           config.eval, judges,
                           rng.key(config.seed, rng.Purpose.BEST_OF_N_CURVES),
                           place=Placement(config.pipeline.sft), field="config.eval")


def verdict(s: lib.BonSamples, gold: str, n_boot: int, seed: int) -> dict:
    """Best-of-N's gold vs SFT's (n = 1) on the same samples: both estimates with SEs, and the
    paired per-prompt difference with its bootstrap SE."""
    N = s.proxy["rm"].shape[1]
    per_prompt = s.per_prompt("rm", gold, [1, N])
    se = bon.bootstrap_se(per_prompt, n_boot, seed)
    pd = bon.paired_diff(per_prompt, 1, 0, n_boot, seed)
    d, diff_se = pd["diff"], pd["se"]
    z = d / diff_se if diff_se > 0 else float("inf") * np.sign(d)
    if abs(z) < 2:
        word = "not distinguishable from SFT's (|diff| < 2 SE)"
    else:
        word = "above SFT's" if d > 0 else "below SFT's (over-optimised)"
    return {"n": N, "gold_bon": float(per_prompt[:, 1].mean()), "gold_bon_se": float(se[1]),
            "gold_sft": float(per_prompt[:, 0].mean()), "gold_sft_se": float(se[0]),
            "diff": d, "diff_se": diff_se, "z": float(z), "verdict": word}


def run(config) -> dict:
    t0 = time.perf_counter()
    validate(config)  # before the stages train (and before the work dir exists)
    root = Path(config.workdir)
    root.mkdir(parents=True, exist_ok=True)
    sft_dir, rm_dir = stage_dirs(config)
    t_stages = time.perf_counter() - t0
    s = sample_and_score(config, sft_dir, rm_dir)
    gold = str(config.eval.gold)
    P, N = s.proxy["rm"].shape
    rows = s.curves("rm", gold, None, n_boot=int(config.n_boot), seed=int(config.seed))
    paths = bon.write_curves(rows, str(root), name="bon", overwrite=bool(config.overwrite),
                             title=f"best-of-n of SFT: {P} prompts x {N} samples "
                                   f"(gold = {gold})")
    v = verdict(s, gold, int(config.n_boot), int(config.seed))
    # Every judge's best-of-n means (the primary one is in the CSV with SEs).
    judges = {j: s.per_prompt("rm", j, None).mean(axis=0).tolist() for j in s.gold}
    summary = {"curves": rows, "verdict": v, "judges_by_n": judges, "gold_judge": gold,
               "prompts": P, "samples_per_prompt": N, "sft_dir": str(sft_dir),
               "rm_dir": str(rm_dir), "files": paths,
               "seconds": {"stages": round(t_stages, 1),
                           "total": round(time.perf_counter() - t0, 1)}}
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    (root / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    _print(summary)
    return summary


def _print(summary: dict) -> None:
    rows, v = summary["curves"], summary["verdict"]
    print(f"\n  best-of-n of the SFT policy: {summary['prompts']} held-out prompts x "
          f"{summary['samples_per_prompt']} samples; gold = {summary['gold_judge']}")
    print("      n   KL_bon  KL_empirical   gold ± SE          proxy (RM) ± SE")
    N = rows[-1]["n"]
    for r in rows:
        n = r["n"]
        if n & (n - 1) == 0 or n == N:  # 1, 2, 4, 8, ... and N
            print(f"  {n:5d}   {r['kl_bon']:6.3f}  {r['kl_empirical']:12.3f}   "
                  f"{r['gold']:+.3f} ± {r['gold_se']:.3f}   "
                  f"{r['proxy']:+.3f} ± {r['proxy_se']:.3f}")
    peak = max(rows, key=lambda r: r["gold"])
    print(f"\n  verdict: best-of-{v['n']} gold {v['gold_bon']:+.3f} ± {v['gold_bon_se']:.3f} vs "
          f"SFT {v['gold_sft']:+.3f} ± {v['gold_sft_se']:.3f}: difference {v['diff']:+.3f} ± "
          f"{v['diff_se']:.3f} (paired bootstrap, z = {v['z']:.1f}) — {v['verdict']}.")
    print(f"  gold peaks at n = {peak['n']} ({peak['gold']:+.3f}); at n = {N} the empirical KL is "
          f"{rows[-1]['kl_empirical']:.3f} nats vs the formula's {rows[-1]['kl_bon']:.3f} "
          "(N samples cannot show more than they hold; repeated outputs pull it lower).")
    print(f"  time: {summary['seconds']['total']:.0f} s (stages {summary['seconds']['stages']:.0f}"
          f" s)\n  csv: {summary['files']['csv']}\n  plot: {summary['files']['png']}\n")


DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "best_of_n_sim.py"


if __name__ == "__main__":
    import sys

    from rlhf_jax import config_utils

    if not any(a == "--config" or a.startswith("--config=") for a in sys.argv[1:]):
        sys.argv.insert(1, f"--config={DEFAULT_CONFIG}")
    config_utils.run_with_config(run)
