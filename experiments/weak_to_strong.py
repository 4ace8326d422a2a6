"""Weak-to-strong generalization across model sizes (Burns et al. 2023, Figs. 3-5).

    python -m experiments.weak_to_strong                                      # the default
    python -m experiments.weak_to_strong --config=configs/w2s_sim.py:tiny     # CI-sized
    python -m experiments.weak_to_strong --config=configs/w2s_sim.py:task=preference,seeds=5
    python -m experiments.weak_to_strong --config.train.epochs=3   # applies to every trial
    python -m experiments.weak_to_strong --workers=2               # one process per trial
    python -m experiments.weak_to_strong --no_compile_cache        # no persistent XLA cache

The trials are `configs/w2s_sim.py`'s `get_sweep(arg)`: every (weak < strong) pair of its
`SIZES` (sim-0.1m unpretrained, zoo sim-0.4m, sim-1.6m) x {naive, aux} x seeds
(`:diagonal=True` adds the weak == strong pairs, whose PGR is undefined: their ceiling is the
weak model's own size), each the protocol of `rlhf_jax.w2s` (weak supervisor on half A, strong
student on its labels of half B, ceiling on B's ground truth, test accuracy of all three).
They run as sweep trials (`rlhf_jax.sweep`, through `lib.run_trials`): keyed by their resolved
config, a finished one skipped on a rerun; `--workers=0` (default) runs them in this process
(task data and compiled steps shared between trials), `--workers=N` as N worker processes.
Weak supervisors and ceilings are shared between trials (trained once, in `shared_dir`).
`--config.<field>=v` overrides apply to every trial.

Writes under `<root>/<task>/` (root: the preset key `root`, default runs/w2s):

* `trials/`: one sweep trial dir per trial (its `summary.json`, the student's run);
* `w2s_trials.csv`: one row per trial (accuracies, PGR, agreement, sizes, seconds);
* `w2s_results.json`: per (weak, strong, loss): PGR with its CI over seeds
  (`experiments.w2s_stats`), mean accuracies; per pair: the aux - naive PGR difference with its
  CI; the verdicts;
* `w2s_accuracy.png`: test accuracy against the strong model's size, one line per weak size
  (naive solid, aux dashed), the ceiling (strong on ground truth) and each weak model alone; and
  PGR per pair with CIs;

and prints the verdicts on the paper's two claims as measured (`lib.Verdict`): PGR > 0 for
naive students, and the auxiliary confidence loss raises PGR for the largest weak-strong gap.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments import lib
from experiments.w2s_stats import mean_ci, pgr_ci
from rlhf_jax import config_utils, sweep
from rlhf_jax.errors import UserError

DEFAULT_CONFIG = lib.ROOT / "configs" / "w2s_sim.py"


# ------------------------------------------------------------------------------------ trials


def trials(config_file: str, arg: str, base_args: Sequence[str], out_dir: Path
           ) -> list[sweep.Trial]:
    """The sweep trials of `get_sweep(arg)`, each with the command line's `--config.*` flags,
    in `<out_dir>/trials/<weak>_to_<strong>-<loss>-seed<seed>-<key>`."""
    items = sweep.load_sweep(str(config_file), arg)
    labels = [f"{o['weak']}_to_{o['strong']}-{o['loss.kind']}-seed{o['seed']}"
              .replace("zoo:", "").replace(":", "-") for o in items]
    return sweep.expand(str(config_file), arg, items, workdir=out_dir / "trials",
                        base_args=base_args, labels=labels)


def trial_row(s: dict) -> dict:
    """One CSV row of a trial's summary."""
    runs = {k: r for k, r in s["runs"].items() if not s.get("trial_reused")}
    return {**{k: s.get(k) for k in CSV_FIELDS},
            "weak_params": s["runs"]["weak"]["params"],
            "strong_params": s["runs"]["strong"]["params"],
            "trained_seconds": round(sum(r["seconds"] for r in runs.values()
                                         if not r["reused"]), 2),
            "trained_cpu_seconds": round(sum(r.get("cpu_seconds") or 0.0 for r in runs.values()
                                             if not r["reused"]), 2)}


CSV_FIELDS = ("task", "weak", "strong", "loss", "seed", "acc_weak", "acc_w2s", "acc_ceiling",
              "pgr", "student_supervisor_agreement", "weak_label_accuracy", "weak_params",
              "strong_params", "seconds", "trained_seconds", "trained_cpu_seconds")


# ---------------------------------------------------------------------------------- analysis


def analyse(summaries: Sequence[dict]) -> dict[str, Any]:
    """PGR per (weak, strong, loss) over seeds, aux - naive per pair, and the two verdicts
    (`lib.Verdict`s as dicts)."""
    params: dict[str, int] = {}
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for s in summaries:
        params[s["weak"]] = s["runs"]["weak"]["params"]
        params[s["strong"]] = s["runs"]["strong"]["params"]
        groups.setdefault((s["weak"], s["strong"], s["loss"]), []).append(s)
    sizes = sorted(params, key=params.get)
    cells = []
    for (weak, strong, loss), rows in sorted(groups.items(), key=lambda kv: (
            params[kv[0][0]], params[kv[0][1]], kv[0][2])):
        rows = sorted(rows, key=lambda r: r["seed"])
        acc = {k: [r[k] for r in rows] for k in ("acc_weak", "acc_w2s", "acc_ceiling")}
        cells.append({
            "weak": weak, "strong": strong, "loss": loss, "seeds": [r["seed"] for r in rows],
            "pgr": pgr_ci(acc["acc_weak"], acc["acc_w2s"], acc["acc_ceiling"]),
            **{k: mean_ci(v) for k, v in acc.items()},
            "student_supervisor_agreement": mean_ci([r["student_supervisor_agreement"]
                                                     for r in rows])})
    diffs = []
    for weak, strong in {(c["weak"], c["strong"]) for c in cells}:
        by = {c["loss"]: c for c in cells if (c["weak"], c["strong"]) == (weak, strong)}
        if {"naive", "aux"} <= set(by):
            naive = {r["seed"]: r for r in groups[(weak, strong, "naive")]}
            aux = {r["seed"]: r for r in groups[(weak, strong, "aux")]}
            seeds = sorted(set(naive) & set(aux))
            # Paired by seed (same weak supervisor and ceiling): (aux - naive) / gap.
            d = pgr_ci([naive[s]["acc_w2s"] for s in seeds], [aux[s]["acc_w2s"] for s in seeds],
                       [naive[s]["acc_w2s"] + naive[s]["acc_ceiling"] - naive[s]["acc_weak"]
                        for s in seeds])
            diffs.append({"weak": weak, "strong": strong, "seeds": seeds, "aux_minus_naive": d})
    diffs.sort(key=lambda d: (params[d["weak"]], params[d["strong"]]))
    return {"sizes": sizes, "params": params, "cells": cells, "aux_vs_naive": diffs,
            "verdicts": [v.to_dict() for v in verdicts(cells, diffs, sizes)]}


def _interval(ci: dict) -> str:
    if math.isnan(ci.get("lo", float("nan"))):
        return f"{ci['pgr']:+.2f} (no CI: one seed)"
    return f"{ci['pgr']:+.2f} [{ci['lo']:+.2f}, {ci['hi']:+.2f}]"


NAIVE_CLAIM = "naive weak-to-strong students recover part of the gap: PGR > 0"
AUX_CLAIM = "the auxiliary confidence loss raises PGR for the largest weak-strong gap"


def verdicts(cells: list[dict], diffs: list[dict], sizes: list[str]) -> list[lib.Verdict]:
    """The paper's two claims, as measured (CI level as in `w2s_stats.pgr_ci`)."""
    naive = [c for c in cells if c["loss"] == "naive" and c["weak"] != c["strong"]]
    lines = []
    for c in naive:
        p = c["pgr"]
        if not p.get("gap_resolved", True):
            word = "ceiling - weak gap within noise: PGR undefined"
        elif p["pgr"] > 0 and p.get("lo", float("nan")) > 0:
            word = "PGR > 0 (CI excludes 0)"
        elif p["pgr"] > 0:
            word = "PGR > 0 but the CI includes 0"
        else:
            word = "PGR <= 0"
        lines.append(f"{c['weak']} -> {c['strong']}: naive PGR {_interval(p)}: {word}")
    # Pairs whose ceiling - weak gap is within noise cannot test the claim.
    tested = [c for c in naive if c["pgr"].get("gap_resolved", True)]
    out = [lib.Verdict(NAIVE_CLAIM, all(c["pgr"]["pgr"] > 0 and c["pgr"].get("lo", -1) > 0
                                        for c in tested) if tested else None,
                       "; ".join(lines) or "no naive trial with weak != strong")]
    big = [d for d in diffs if len(sizes) >= 2 and d["weak"] == sizes[0]
           and d["strong"] == sizes[-1]]
    if not big:
        return out + [lib.Verdict(AUX_CLAIM, None, "needs naive and aux trials of the smallest "
                                  "weak and the largest strong model")]
    d, held = big[0]["aux_minus_naive"], None
    if not d.get("gap_resolved", True):
        word = "ceiling - weak gap within noise: undefined"
    elif math.isnan(d.get("lo", float("nan"))):
        word = "one seed: no CI"
    elif d["lo"] > 0:
        word, held = "aux raises PGR (CI excludes 0), as the paper found for NLP tasks", True
    elif d["hi"] < 0:
        word, held = "aux lowers PGR (CI excludes 0), unlike the paper's NLP tasks", False
    else:
        word, held = "no resolved difference (the CI includes 0)", False
    return out + [lib.Verdict(AUX_CLAIM, held, f"{sizes[0]} -> {sizes[-1]}: aux - naive PGR "
                              f"{_interval(d)}: {word}")]


# ------------------------------------------------------------------------------------ outputs


def plot(result: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params, sizes, cells = result["params"], result["sizes"], result["cells"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {w: plt.cm.viridis(i / max(len(sizes) - 1, 1)) for i, w in enumerate(sizes)}

    def err(ci):
        return [[ci["mean"] - ci["lo"]], [ci["hi"] - ci["mean"]]] if not math.isnan(
            ci["lo"]) else None

    ceiling = {}
    for c in cells:
        ceiling.setdefault(c["strong"], c["acc_ceiling"])
    xs = sorted(ceiling, key=params.get)
    ax.plot([params[s] for s in xs], [ceiling[s]["mean"] for s in xs], "k-o",
            label="ceiling (strong on ground truth)")
    for weak in sizes:
        for loss, style in (("naive", "-"), ("aux", "--")):
            row = sorted((c for c in cells if c["weak"] == weak and c["loss"] == loss),
                         key=lambda c: params[c["strong"]])
            if not row:
                continue
            x = [params[c["strong"]] for c in row]
            ax.plot(x, [c["acc_w2s"]["mean"] for c in row], style, marker="o",
                    color=colors[weak], label=f"weak {weak}, {loss}")
            for xi, c in zip(x, row):
                e = err(c["acc_w2s"])
                if e:
                    ax.errorbar([xi], [c["acc_w2s"]["mean"]], yerr=e, color=colors[weak],
                                capsize=2, lw=0.8)
        weak_acc = next((c["acc_weak"] for c in cells if c["weak"] == weak), None)
        if weak_acc:
            ax.plot([params[weak]], [weak_acc["mean"]], marker="*", ms=13, ls="none",
                    color=colors[weak], markeredgecolor="k", label=f"weak {weak} alone")
    ax.set_xscale("log")
    ax.set_xlabel("strong student parameters")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)

    pairs = [c for c in cells if c["weak"] != c["strong"]]
    names = list(dict.fromkeys(f"{c['weak'][4:]}\n-> {c['strong'][4:]}" if c["weak"].startswith(
        "zoo:") else f"{c['weak']}\n-> {c['strong']}" for c in pairs))
    for j, loss in enumerate(("naive", "aux")):
        row = [c for c in pairs if c["loss"] == loss]
        x = np.arange(len(row)) + (j - 0.5) * 0.38
        y = [c["pgr"]["pgr"] for c in row]
        yerr = np.array([[c["pgr"]["pgr"] - c["pgr"]["lo"], c["pgr"]["hi"] - c["pgr"]["pgr"]]
                         if not math.isnan(c["pgr"].get("lo", float("nan"))) else [0, 0]
                         for c in row]).T if row else None
        bx.bar(x, y, width=0.38, yerr=yerr, capsize=3, label=loss,
               color="tab:blue" if loss == "naive" else "tab:orange")
    bx.axhline(0, color="k", lw=0.8)
    bx.axhline(1, color="k", lw=0.5, ls=":")
    # A gap within noise makes PGR and its interval huge: keep the axis on the useful range.
    ends = [v for c in pairs for v in (c["pgr"]["pgr"], c["pgr"].get("lo"), c["pgr"].get("hi"))
            if v is not None and not math.isnan(v)]
    if ends and (min(ends) < -1.5 or max(ends) > 2.5):
        bx.set_ylim(max(min(ends), -1.5) - 0.1, min(max(ends), 2.5) + 0.1)
        bx.set_title("performance gap recovered (axis clipped)")
    else:
        bx.set_title("performance gap recovered")
    bx.set_xticks(np.arange(len(names)), names, fontsize=8)
    bx.set_ylabel("PGR (95% CI over seeds)")
    bx.grid(alpha=0.3, axis="y")
    bx.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(result: dict, summaries: Sequence[dict], seconds: float) -> str:
    w = max([len(c["weak"]) for c in result["cells"]] + [4])
    header = (f"  {'weak':<{w}} -> {'strong':<{w}}  loss   acc weak  acc w2s  acc ceiling"
              "  PGR [95% CI]")
    lines = ["", header]
    for c in result["cells"]:
        lines.append(f"  {c['weak']:<{w}} -> {c['strong']:<{w}}  {c['loss']:<5}  "
                     f"{c['acc_weak']['mean']:8.3f} {c['acc_w2s']['mean']:8.3f} "
                     f"{c['acc_ceiling']['mean']:12.3f}  {_interval(c['pgr'])}")
    new = [r for s in summaries if not s.get("trial_reused")
           for r in s["runs"].values() if not r["reused"]]
    lines.append(f"\n  {len(summaries)} trials in {seconds:.0f} s: {len(new)} models trained in "
                 f"{sum(r['seconds'] for r in new):.0f} s "
                 f"({sum(r.get('cpu_seconds') or 0 for r in new):.0f} CPU s), the rest reused")
    return "\n".join(lines)


def enable_compilation_cache() -> str:
    """JAX's persistent compilation cache under the project cache: the trials of one seed and
    the next compile the same programs (same shapes and constants), so from the second seed on
    each model skips XLA compilation (measured: ~8 CPU s saved per model run on 2 cores).
    Subprocess trials inherit it through the environment."""
    import os

    import jax

    from rlhf_jax.paths import cache_dir

    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(cache_dir() / "jax_compilation")
    os.environ.update(JAX_COMPILATION_CACHE_DIR=path,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


# -------------------------------------------------------------------------------------- main


def _jsonable(x):
    """NaN (an undefined PGR or a one-seed interval) -> null: JSON has no NaN."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def run(argv: Sequence[str]) -> dict:
    """`argv`: `[prog, --config=<file>[:<arg>], --config.<field>=<value>..., --workers=N,
    --no_compile_cache]`."""
    argv, workers, compile_cache = list(argv), 0, True
    for a in list(argv[1:]):
        if a.startswith("--workers="):
            value = a.split("=", 1)[1]
            if not value.isdigit():
                raise UserError("--workers", f"{value!r} is not a worker count",
                                "give 0 (in this process) or a number of processes")
            workers = int(value)
            argv.remove(a)
        elif a == "--no_compile_cache":
            compile_cache = False
            argv.remove(a)
        elif not (a.startswith("--config=") or a.startswith("--config.") or a == "--config"
                  or argv[argv.index(a) - 1] == "--config"):
            raise UserError(a.split("=", 1)[0], "is not a flag of experiments.weak_to_strong",
                            "use --config=<file>[:<preset>], --config.<field>=<value>, "
                            "--workers=N or --no_compile_cache")
    if not any(a == "--config" or a.startswith("--config=") for a in argv[1:]):
        argv.insert(1, f"--config={DEFAULT_CONFIG}")
    spec = next(a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config="))
    config_file, _, arg = spec.partition(":")
    if "diagonal" not in config_utils.parse_preset(arg):
        # weak == strong pairs have no gap to recover (PGR undefined) and would add a third to
        # the default's budget; `:diagonal=True` runs them as the reference sweep does.
        arg = ",".join(x for x in (arg, "diagonal=False") if x)
    base_args = [a for a in argv[1:] if a.startswith("--config.")]
    # --config.workdir names the study's root (the preset key `root`): every trial, the shared
    # weak supervisors and the outputs go under it.
    workdir = next((a.split("=", 1)[1] for a in base_args if a.startswith("--config.workdir=")),
                   None)
    if workdir is not None:
        if "root" in config_utils.parse_preset(arg):
            raise UserError("--config.workdir", "and the preset key `root` both name the study's "
                            "directory", "give one of them")
        base_args = [a for a in base_args if not a.startswith("--config.workdir=")]
        arg = ",".join(x for x in (arg, f"root={workdir}") if x)
    config = config_utils.parse_config_argv([argv[0], f"--config={config_file}:{arg}",
                                             *base_args])
    items = sweep.load_sweep(config_file, arg)
    out_dir = Path(items[0].get("shared_dir", config.shared_dir)).parent / config.task.kind
    out_dir.mkdir(parents=True, exist_ok=True)
    ts = trials(config_file, arg, base_args, out_dir)

    if compile_cache:
        enable_compilation_cache()
    t0 = time.perf_counter()
    rows = lib.run_trials(ts, out_dir / "trials", workers)
    seconds = time.perf_counter() - t0
    summaries = [{**lib.trial_summary(r), **({"trial_reused": True}
                                              if r["status"] == "skipped" else {})} for r in rows]
    result = analyse(summaries)
    result.update(task=config.task.kind, config_file=str(config_file), arg=arg,
                  overrides=base_args, trials=len(summaries), seconds=round(seconds, 1))
    lib.write_points([trial_row(s) for s in summaries], out_dir / "w2s_trials.csv")
    lib.write_json(_jsonable(result), out_dir / "w2s_results.json")
    png = plot(result, out_dir / "w2s_accuracy.png", f"weak-to-strong, task '{config.task.kind}'")
    print(report(result, summaries, seconds))
    lib.print_verdicts("Burns et al. 2023, weak-to-strong (as measured):",
                       [lib.Verdict(**v) for v in result["verdicts"]])
    print(f"  {out_dir / 'w2s_trials.csv'}\n  {out_dir / 'w2s_results.json'}\n  {png}\n")
    return result


def main(argv: Sequence[str]) -> int:
    try:
        run(argv)
    except UserError as e:
        sys.stderr.write(f"error: {e.line()}\n")
        return 2
    return 0


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    raise SystemExit(main(sys.argv))
