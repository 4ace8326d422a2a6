"""Pieces every experiment shares: cached stages, method comparison, plots.

* `stage_key` / `run_stage`: a stage runs in a work dir named by a hash of its config and of its
  inputs' keys, so a finished stage is reused by any experiment that needs it with the same
  config, and an interrupted one resumes from its checkpoint.
* `compare_policies`: several policies against the SFT policy on the same held-out prompts —
  gold ± SEM, proxy (RM) score, KL from SFT, gold win rate vs SFT — through the shared
  `evaluation.PolicyEval`. Best-of-n takes part as a policy (`BestOfN`).
* `plot_gold_vs_kl`: one point per method.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from rlhf_jax import bon, checkpoint, evaluation, handoff, provenance, rng
from rlhf_jax.trainer import Placement


def stage_key(config, *upstream: str) -> str:
    """Hash of a stage config (without its work dir, and without fields at their
    `provenance.KEY_NEUTRAL` values) and of its inputs' keys."""
    d = provenance.key_dict(config)
    blob = json.dumps([d, upstream], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def child_config(stage_cfg, **fields):
    """A resolved, unlocked copy of a stage config with `fields` set (e.g. init_from, seed)."""
    c = stage_cfg.copy_and_resolve_references()
    with c.unlocked():
        for k, v in fields.items():
            c[k] = v
    return c


def _leaves(tree, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if hasattr(v, "items"):
            out.update(_leaves(v, path + "."))
        else:
            out[path] = v
    return out


def override_flags(config, config_file: str, arg: str | None = None, *, skip=(),
                   **fields) -> list[str]:
    """`--config.<field>=<value>` flags that turn `config_file:arg`'s config into `config`:
    one per leaf that differs (fields in `skip` left out), then one per `fields` item. What an
    experiment passes to sweep trials (`sweep.expand(..., base_args=...)`), so each trial runs
    its stage config exactly, through the stage's own command line."""
    from rlhf_jax.sweep import define

    module = define.load_config_module(config_file)
    stock = _leaves(module.get_config(arg).copy_and_resolve_references())
    want = _leaves(config.copy_and_resolve_references())
    unknown = sorted(set(want) - set(stock))
    if unknown:
        raise ValueError(f"override_flags: {unknown} are not fields of {config_file}:{arg}")
    flags = []
    for path, value in sorted(want.items()):
        if path in skip or path in fields or path == "workdir":
            continue
        if value != stock[path] or type(value) is not type(stock[path]):
            flags.append(f"--config.{path}={define.format_value(value, type(stock[path]))}")
    for path, value in fields.items():
        flags.append(f"--config.{path}={define.format_value(value, type(stock.get(path)))}")
    return flags


def run_sweep(trials, slots, sweep_dir: Path) -> list[dict]:
    """Run sweep trials (finished ones are skipped: their key is their resolved config);
    raises RuntimeError naming each trial that did not finish and its log."""
    from rlhf_jax import sweep

    rows = sweep.run_pool(trials, slots, sweep_dir)
    bad = [r for r in rows if r["status"] not in ("done", "skipped")]
    if bad:
        raise RuntimeError("sweep trials did not finish: " + "; ".join(
            f"{r['trial']} ({r['status']}, log {r['log']})" for r in bad))
    return rows


def eval_points(metrics_file: Path) -> list[dict]:
    """The evaluations of a stage's `metrics.jsonl`, in step order: {"step", and each `eval/<k>`
    as `<k>`} (a step logged twice, e.g. around a resume, keeps its last record)."""
    by_step = {}
    for line in Path(metrics_file).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        ev = {k[5:]: v for k, v in rec.items() if k.startswith("eval/")}
        if ev:
            by_step[int(rec["step"])] = {"step": int(rec["step"]), **ev}
    return [by_step[s] for s in sorted(by_step)]


def run_stage(name: str, module, config, workdir: Path, reuse: bool = True) -> Path:
    """Run `module.run(config)` in `workdir` unless a finished output is there (and `reuse`)."""
    if reuse and checkpoint.stage_is_complete(workdir):
        print(f"[{name}] reusing {workdir}", flush=True)
        return workdir
    print(f"[{name}] running in {workdir}", flush=True)
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.workdir = str(workdir)
    config.lock()
    t0 = time.perf_counter()
    module.run(config)
    print(f"[{name}] done in {time.perf_counter() - t0:.0f} s", flush=True)
    return workdir


@dataclasses.dataclass
class BestOfN:
    """Best-of-n of a policy as a policy: n samples per prompt, the one the RM scores highest.

    Its KL from the sampled policy is reported analytically, KL_bon = log n - (n - 1)/n
    (Stiennon et al. 2020; an upper bound when samples repeat).
    """

    n: int


def compare_policies(ev, policies: dict, sft_dir: Path, rm_dir: Path, seed: int,
                     place: Placement | None = None) -> dict:
    """Each policy (a stage work dir, or `BestOfN`) vs SFT on the same held-out prompts.

    `ev` is a `config_utils.policy_eval_config` block plus `prompts` (a data source). Policy i
    samples with `rng.key(seed, COMPARE, i)`. Returns {name: metrics} with `gold`, `gold_sem`,
    `rm_score`, `kl` (from SFT, k1 on the policy's own samples at the eval temperature),
    `eos_rate`, `response_length`, `win_rate_vs_sft`, and `_samples` (a few rows to print).
    """
    from rlhf_jax.data import sources

    shardings = None if place is None else place.model_shardings
    sft = handoff.load_policy(str(sft_dir), shardings=shardings)
    reward = handoff.load_reward_model(str(rm_dir), shardings=shardings)
    tokenizer, _ = handoff.tokenizer_for("", sft.meta)
    source = sources.from_config(ev.prompts, "config.eval.prompts")
    prompts = source.prompts("eval")
    pe = evaluation.PolicyEval.from_config(ev, prompts, tokenizer, reward=reward, reference=sft,
                                           place=place, world=source.world())
    results, gold = {}, {}
    for i, (name, what) in enumerate({"sft": sft_dir, **policies}.items()):
        key = rng.key(seed, rng.Purpose.COMPARE, i)
        if isinstance(what, BestOfN):
            metrics, rows = _best_of_n(pe, sft, what.n, key)
        else:
            params = sft.params if name == "sft" else handoff.load_policy(
                str(what), shardings=shardings).params
            metrics, rows = pe(sft.cfg, params, key)
        gold[name] = rows[f"gold/{pe.gold}"]
        metrics["win_rate_vs_sft"] = evaluation.win_rate(gold[name], gold["sft"])
        metrics["_samples"] = list(zip(prompts[:6], rows["response"][:6], gold[name][:6]))
        results[name] = metrics
    return results


def _best_of_n(pe: evaluation.PolicyEval, sft: handoff.Loaded, n: int, key) -> tuple[dict, dict]:
    """Sample n per prompt from SFT, keep the highest-RM-score sample of each prompt."""
    many = dataclasses.replace(pe, prompts=[p for p in pe.prompts for _ in range(n)],
                               reference=None, world=None)  # probes would see SFT, not BoN
    _, rows = many(sft.cfg, sft.params, key)
    P = len(pe.prompts)
    proxy = rows["rm_score"].reshape(P, n)
    pick = np.arange(P) * n + bon.best_of_n_indices(proxy)
    out = {k: (np.asarray(v)[pick] if not isinstance(v, list) else [v[j] for j in pick])
           for k, v in rows.items()}
    metrics = {k: float(np.mean(out[k])) for k in out if k.startswith(("gold/", "rm_score"))}
    g = out[f"gold/{pe.gold}"]
    metrics.update(gold=float(g.mean()), gold_sem=float(g.std() / np.sqrt(P)),
                   kl=float(bon.kl_bon(n)), eos_rate=float(np.mean(out["ended"])),
                   response_length=float(np.mean(out["length"])))
    return metrics, out


def plot_gold_vs_kl(results: dict, out: Path, judge: str) -> Path:
    """Gold (± SEM) and proxy against KL from SFT: one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        ax.errorbar(r["kl"], r["gold"], yerr=r["gold_sem"], fmt="o", capsize=3, label=name)
        ax.annotate(name, (r["kl"], r["gold"]), textcoords="offset points", xytext=(5, 4))
    ax.set_xlabel("KL(π || π_SFT) per response [nats]")
    ax.set_ylabel(f"gold score ({judge})")
    ax.set_title("Methods on the simulated world: gold vs KL")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_training(stage_dir: Path, out: Path) -> Path | None:
    """Gold and proxy score against KL over an RL stage's training (its metrics.jsonl)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()
            if line]
    rows = [r for r in rows if "kl" in r and "rm_score" in r]
    if not rows:
        return None
    kl = np.array([r["kl"] for r in rows])
    steps = np.array([r.get("step", i) for i, r in enumerate(rows)])
    fig, ax = plt.subplots(figsize=(6, 4))
    # KL does not grow monotonically, so points (shaded by update) read better than a line.
    series = [("rm_score", "proxy (RM) score", "Blues", "o")]
    if "gold" in rows[0]:
        series.append(("gold", "gold score (VADER)", "Oranges", "s"))
    for key, label, cmap, marker in series:
        ax.scatter(kl, [r[key] for r in rows], c=steps, cmap=cmap, vmin=-0.3 * steps.max(),
                   marker=marker, s=14, label=label)
    ax.set_xlabel("KL(π || π_SFT) per episode [nats]")
    ax.set_ylabel("mean score of rollouts")
    ax.set_title(f"{stage_dir.name.split('-')[0].upper()} on the simulated world "
                 "(darker = later update)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
