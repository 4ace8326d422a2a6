"""Pieces every experiment shares: cached stages, method comparison, plots.

* `stage_key` / `run_stage`: a stage runs in a work dir named by a hash of its config and of its
  inputs' keys, so a finished stage is reused by any experiment that needs it with the same
  config, and an interrupted one resumes from its checkpoint.
* `compare_policies`: several policies against the SFT policy on the same held-out prompts —
  gold ± SEM, proxy (RM) score, KL from SFT, gold win rate vs SFT — through the shared
  `evaluation.PolicyEval`. Best-of-n takes part as a policy (`BestOfN`).
* `plot_gold_vs_kl`: one point per method.

What the figure modules (`experiments.gao_bon`, `gao_rl`, `frontier`, `rm_scaling`,
`alignment_tax`, `annotator_pool`) share:

* `FigureStages`: the shared stages of every figure — the zoo's base model, SFT and proxy RMs —
  in one stage directory, so each is trained once for all figures. SFT runs through `run_stage`;
  RMs and the methods' trials through the sweep machinery (`stage_trials` + `run_trials`: keyed
  by resolved config, skipped when finished, resumed when interrupted, `workers` in parallel, or
  in this process with `workers=0`).
* Fits of Gao et al. (2022): `fit_gao(form, d, r)` for best-of-n, R(d) = d (α − β d), and RL,
  R(d) = d (α − β log d), by least squares, with the peak d* each implies.
* Outputs: `write_points` (CSV of every point), `write_json` (fitted coefficients and verdicts),
  `Verdict` and `print_verdicts` (each claim, whether it held as measured, and the evidence),
  `figure` (a matplotlib figure saved small enough to commit).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from rlhf_jax import bon, evaluation, handoff, rng, runcache
from rlhf_jax.errors import UserError
from rlhf_jax.trainer import Placement

ROOT = Path(__file__).resolve().parents[1]  # the repository (configs/ lives here)


def stage_key(config, *upstream: str) -> str:
    """Hash of a stage config (without its work dir, and without fields at their
    `provenance.KEY_NEUTRAL` values) and of its inputs' keys (`runcache.key`, 10 digits)."""
    return runcache.key(config, *upstream, digits=10)


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
    """Run `module.run(config)` in `workdir` unless a finished output is there (and `reuse`),
    through `runcache.ensure` (one finished-check, one lock)."""
    import jax

    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.workdir = str(workdir)
    config.lock()

    def run():
        print(f"[{name}] running in {workdir}", flush=True)
        t0 = time.perf_counter()
        module.run(config)
        print(f"[{name}] done in {time.perf_counter() - t0:.0f} s", flush=True)

    # Finished = its final checkpoint (no marker). The processes of a multi-process run train
    # together: no lock.
    workdir, reused = runcache.ensure(workdir, run, reuse=reuse, mark=False,
                                      locked=jax.process_count() == 1)
    if reused:
        print(f"[{name}] reusing {workdir}", flush=True)
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


# ============================================================================ figure modules
# Fits (Gao, Schulman & Hilton 2022, "Scaling laws for reward model overoptimization", eqs. 1-2).

FORMS = {
    # R(d) = d (alpha - beta d): best-of-n, d = sqrt(KL_bon).
    "bon": lambda d: np.stack([d, -d * d], axis=-1),
    # R(d) = d (alpha - beta log d): RL, d = sqrt(KL(pi || pi_init)); d log d -> 0 at d = 0.
    "rl": lambda d: np.stack([d, -d * np.log(np.where(d > 0, d, 1.0))], axis=-1),
}


@dataclasses.dataclass(frozen=True)
class GaoFit:
    """A fitted R(d) (`form` "bon" or "rl"): coefficients, fit quality, and the implied peak."""

    form: str
    alpha: float
    beta: float
    r2: float
    points: int

    def __call__(self, d) -> np.ndarray:
        d = np.asarray(d, np.float64)
        return FORMS[self.form](d) @ np.array([self.alpha, self.beta])

    @property
    def peak_d(self) -> float:
        """d at the fitted maximum: alpha / (2 beta) (bon), exp(alpha / beta - 1) (rl); inf
        when beta <= 0 (the fit never turns down)."""
        if self.beta <= 0:
            return float("inf")
        if self.form == "bon":
            return self.alpha / (2.0 * self.beta)
        return float(np.exp(min(self.alpha / self.beta - 1.0, 700.0)))

    def to_dict(self) -> dict:
        return {"form": self.form, "alpha": self.alpha, "beta": self.beta, "r2": self.r2,
                "points": self.points, "peak_d": self.peak_d,
                "peak_value": float(self(self.peak_d)) if np.isfinite(self.peak_d) else None}


def fit_gao(form: str, d, r, se=None) -> GaoFit:
    """Least-squares fit of R(d) through the origin (Gao et al. fit the score minus the initial
    policy's, so R(0) = 0). `se`, if given, weights each point by 1 / se (floored at a tenth of
    the median, so a point with a tiny SE cannot dominate)."""
    if form not in FORMS:
        raise UserError("fit form", f"{form!r} is not one of {sorted(FORMS)}", "")
    d, r = np.asarray(d, np.float64), np.asarray(r, np.float64)
    keep = np.isfinite(d) & np.isfinite(r) & (d >= 0)
    if keep.sum() < 2:
        raise UserError("fit points", f"{int(keep.sum())} finite points with d >= 0",
                        "a two-coefficient fit needs at least 2")
    d, r = d[keep], r[keep]
    X = FORMS[form](d)
    w = np.ones_like(d)
    if se is not None:
        s = np.asarray(se, np.float64)[keep]
        s = np.where(np.isfinite(s) & (s > 0), s, np.nan)
        floor = 0.1 * np.nanmedian(s) if np.any(np.isfinite(s)) else 1.0
        w = 1.0 / np.maximum(np.nan_to_num(s, nan=floor), floor)
    coef, *_ = np.linalg.lstsq(X * w[:, None], r * w, rcond=None)
    pred = X @ coef
    ss_res = float(np.sum(w ** 2 * (r - pred) ** 2))
    ss_tot = float(np.sum(w ** 2 * (r - np.average(r, weights=w ** 2)) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    return GaoFit(form, float(coef[0]), float(coef[1]), r2, int(d.size))


def fit_log_linear(x, y) -> dict:
    """y = a + b log2(x) by least squares: `b` is the change per doubling of x (Stiennon et al.
    2020 report RM accuracy per doubling of comparisons and of model size)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    X = np.stack([np.ones_like(x), np.log2(x)], axis=-1)
    (a, b), *_ = np.linalg.lstsq(X, y, rcond=None)
    return {"intercept": float(a), "per_doubling": float(b)}


# ---------------------------------------------------------------------------- verdicts, files


@dataclasses.dataclass
class Verdict:
    """One claim of a paper as measured here: held (True / False, or None when the run could not
    test it) and the numbers that decided it."""

    claim: str
    held: bool | None
    evidence: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def print_verdicts(title: str, verdicts: list[Verdict]) -> None:
    print(f"\n  {title}")
    for v in verdicts:
        mark = {True: "HOLDS", False: "DOES NOT HOLD", None: "NOT TESTED"}[v.held]
        print(f"  [{mark}] {v.claim}\n      measured: {v.evidence}")
    print(flush=True)


def write_points(rows: list[dict], path: Path) -> Path:
    """Every point as one CSV row (columns: the union of the rows' keys, in first-seen order)."""
    import csv

    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, cols, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in cols})
    return path


def write_json(obj: dict, path: Path) -> Path:
    from rlhf_jax.metrics import to_python

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_python(obj), indent=2) + "\n")
    return path


def figure(ncols: int = 1, width: float = 5.0, height: float = 3.8):
    """(fig, axes) with the Agg backend; save with `save_figure`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, path: Path, dpi: int = 90) -> Path:
    """PNG at a modest resolution (figures are committed under docs/figures/: keep them small)."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- shared stages


def flatten_config(config, prefix: str = "") -> dict:
    """A (nested) ConfigDict as {dotted.field: leaf value}."""
    out = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            out.update(flatten_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_diff(config, reference) -> dict:
    """{field: value} of every leaf of `config` that differs from `reference` (same fields)."""
    a, b = flatten_config(config), flatten_config(reference)
    return {k: v for k, v in a.items() if k != "workdir" and (k not in b or b[k] != v)}


def stage_trials(stage_cfg, config_file: str | Path, rows: list[dict], sweep_dir: Path,
                 arg: str | None = None, entry: str | None = None) -> list:
    """Sweep trials (`rlhf_jax.sweep.Trial`) running `stage_cfg` with each row's overrides.

    `stage_cfg` is a stage config as an experiment holds it (the config file's `get_config(arg)`
    plus the experiment's changes and inputs); each trial's overrides are the row's fields
    followed by every field where `stage_cfg` differs from the file's default, so the trial
    runs exactly `stage_cfg` + row through the file's own entry point (`ENTRY`), keyed by its
    resolved config (a trial shared by two experiments runs once).
    """
    from rlhf_jax import sweep
    from rlhf_jax.sweep.define import load_config_module

    default = load_config_module(config_file).get_config(arg)
    diff = config_diff(stage_cfg.copy_and_resolve_references(), default)
    overrides = [{**row, **{k: v for k, v in diff.items() if k not in row}} for row in rows]
    return sweep.expand(str(config_file), arg, overrides, workdir=sweep_dir, entry=entry)


def run_trials(trials: list, sweep_dir: Path, workers: int) -> list[dict]:
    """Run (or skip, when finished) sweep trials; returns their results rows (sweep order).

    `workers` >= 1: `rlhf_jax.sweep.run_pool` over that many pinned local workers, one process
    per trial. `workers` = 0: each trial's `run(config)` in this process (what the CI-sized
    presets use: no process start-up per trial); it writes the same finished-marker, so the
    two modes skip each other's trials. A trial that does not finish stops the experiment with
    its log.
    """
    from rlhf_jax import sweep

    trials = [_same_config_done(t, sweep_dir) for t in trials]
    if workers > 0:
        rows = sweep.run_pool(trials, sweep.local_slots(workers), sweep_dir)
    else:
        rows = [_run_inline(t) for t in trials]
        sweep.write_table(rows, sweep_dir)
    bad = [r for r in rows if r["status"] not in ("done", "skipped")]
    if bad:
        raise UserError(str(sweep_dir), f"{len(bad)} of {len(rows)} trials did not finish "
                        f"(first: {bad[0]['trial']}, {bad[0]['status']})",
                        f"read {bad[0]['log']}; rerunning resumes unfinished trials")
    return rows


def _same_config_done(trial, sweep_dir: Path):
    """`trial`, or, when it has not finished but a trial of the same key (the same resolved
    config, reached through other overrides: PPO's `kl.beta=0.02` of one figure is another's
    `ptx.coef=0.0` at that beta) finished in `sweep_dir`, that trial's directory instead."""
    from rlhf_jax.sweep import local

    if local.finished(trial) is not None or not sweep_dir.is_dir():
        return trial
    for d in sorted(sweep_dir.iterdir()):
        marker = runcache.read_json(d / runcache.MARKER)
        if marker and marker.get("key") == trial.key and marker.get("status") == runcache.DONE:
            print(f"[trial] same config as {d.name}: {trial.name}", flush=True)
            return dataclasses.replace(trial, workdir=str(d))
    return trial


def _run_inline(trial) -> dict:
    import importlib

    from rlhf_jax import config_utils
    from rlhf_jax.sweep import local

    marker = local.finished(trial)
    if marker is not None:
        print(f"[trial] reusing {trial.workdir}", flush=True)
        return local.result_row(trial, local.SKIPPED, marker.get("seconds"), 0)
    print(f"[trial] running {trial.workdir}", flush=True)
    config = config_utils.parse_config_argv([trial.entry, *trial.args])
    t0 = time.monotonic()
    importlib.import_module(trial.entry).run(config)
    seconds = time.monotonic() - t0
    runcache.mark_done(trial.workdir, trial.key, name=trial.name, overrides=trial.overrides,
                       command=trial.command(), returncode=0, seconds=round(seconds, 1),
                       in_process=True)
    return local.result_row(trial, local.DONE, seconds, 0)


def trial_summary(row: dict) -> dict:
    return json.loads((Path(row["workdir"]) / "summary.json").read_text())


class FigureStages:
    """The stages the figure modules share, under `config.stages_dir`.

    The base model comes from the zoo cache; SFT (per model size) runs through `run_stage`; proxy
    RMs are sweep trials in `<stages_dir>/rm` and a method's trials in `<stages_dir>/<method>`,
    so an RM or a PPO run that two figures need is trained once.
    """

    def __init__(self, config):
        self.config = config
        self.root = Path(config.stages_dir)
        self.workers = int(config.workers)
        self._sft: dict[str, Path] = {}

    def _sized(self, stage_cfg, model: str | None):
        c = stage_cfg.copy_and_resolve_references()
        if model is not None and model != c.model.preset:
            with c.unlocked():
                c.model.preset = model
        return c

    def sft(self, model: str | None = None) -> Path:
        """Work dir of the SFT policy of base-model preset `model` (default: the config's)."""
        from rlhf_jax import sft, zoo

        model = model or self.config.model
        if model not in self._sft:
            base = zoo.ensure_pretrained(self._sized(self.config.pretrain, model))
            cfg = self._sized(self.config.sft, model)
            with cfg.unlocked():
                cfg.init_from, cfg.seed = str(base), int(self.config.seed)
            self._sft[model] = run_stage(f"sft {model}", sft, cfg,
                                         self.root / f"sft-{stage_key(cfg)}",
                                         bool(self.config.reuse))
        return self._sft[model]

    def rm_config(self, model: str | None = None, **fields):
        """The RM stage config on the SFT policy of `model`, with dotted `fields` set."""
        from rlhf_jax import config_utils

        cfg = self.config.rm.copy_and_resolve_references()
        with cfg.unlocked():
            cfg.init_from, cfg.seed = str(self.sft(model)), int(self.config.seed)
        for k, v in fields.items():
            config_utils.set_dotted(cfg, k, v)
        return cfg

    def rms(self, rows: list[dict], model: str | None = None) -> list[Path]:
        """RM work dirs, one per row of dotted overrides of `config.rm` (e.g. label counts)."""
        return [Path(r["workdir"]) for r in self.trials(
            "rm", self.rm_config(model), "configs/rm_sim.py", rows)]

    def trials(self, sweep_name: str, stage_cfg, config_file: str, rows: list[dict],
               arg: str | None = None) -> list[dict]:
        """Run `stage_cfg` + each row as sweep trials in `<stages_dir>/<sweep_name>`
        (`arg`: the config file's preset, as in `--config=<file>:<arg>`)."""
        sweep_dir = self.root / sweep_name
        return run_trials(stage_trials(stage_cfg, ROOT / config_file, rows, sweep_dir, arg),
                          sweep_dir, self.workers)



# ------------------------------------------------------------------------ best-of-n samples


@dataclasses.dataclass
class BonSamples:
    """N samples per prompt of one policy, scored by several proxies and gold judges."""

    prompts: list[str]  # [P]
    responses: list[list[str]]  # [P][N]
    output_ids: list[list[tuple]]  # [P][N] response token ids (identical outputs compare equal)
    proxy: dict[str, np.ndarray]  # RM name -> [P, N] normalised RM scores
    gold: dict[str, np.ndarray]  # judge -> [P, N]

    def curves(self, rm: str, judge: str, ns, n_boot: int = 500, seed: int = 0) -> list[dict]:
        """`bon.bon_curves` of one proxy against one gold judge (with the empirical KL)."""
        return bon.bon_curves(self.proxy[rm], self.gold[judge], ns, output_ids=self.output_ids,
                              n_boot=n_boot, seed=seed)

    def per_prompt(self, rm: str, judge: str, ns) -> np.ndarray:
        """[P, len(ns)] per-prompt unbiased best-of-n gold estimates (for paired bootstraps)."""
        return bon.expected_best_of_n(self.proxy[rm], self.gold[judge], ns)


def bon_samples(policy_dir: Path, rm_dirs: dict[str, Path], prompts: list[str], n: int,
                settings, judges, key, place=None, field: str = "config.bon") -> BonSamples:
    """Sample `n` responses per prompt from the policy in `policy_dir` with `settings` (an eval
    block: max_prompt_len, max_new_tokens, temperature, batch_size) and score every sample with
    each RM (its stored normalisation) and each gold judge. `place` (a `Placement`) puts the
    models on its mesh and splits the batches over it; without it they run on one device."""
    from rlhf_jax import rewards

    shardings = None if place is None else place.model_shardings
    policy = handoff.load_policy(str(policy_dir), shardings=shardings)
    tokenizer, _ = handoff.tokenizer_for("", policy.meta)
    P = len(prompts)
    flat = [p for p in prompts for _ in range(n)]
    s = evaluation.sample_texts(policy.cfg, policy.params, tokenizer, flat, key,
                                max_prompt_len=int(settings.max_prompt_len),
                                max_new_tokens=int(settings.max_new_tokens),
                                temperature=float(settings.temperature),
                                batch_size=int(settings.batch_size), place=place)
    seq_t = np.concatenate([s["prompt_tokens"], s["tokens"]], axis=1)
    seq_m = np.concatenate([s["prompt_mask"], s["mask"]], axis=1)
    proxy = {}
    for name, d in rm_dirs.items():
        rm = handoff.load_reward_model(str(d), shardings=shardings)
        handoff.check_norm_sampling(rm.reward_norm, settings.temperature,
                                    settings.max_new_tokens, field)
        proxy[name] = rewards.score_batches(rm.cfg, rm.params, seq_t, seq_m, rm.reward_norm,
                                            batch_size=int(settings.batch_size),
                                            place=place).reshape(P, n)
    gold = {k: v.reshape(P, n) for k, v in evaluation.gold_scores(
        evaluation.get_judges(tuple(judges)), flat, s["responses"]).items()}
    ids = [tuple(int(t) for t, m in zip(row, mk) if m)
           for row, mk in zip(np.asarray(s["tokens"]), np.asarray(s["mask"]))]
    return BonSamples(list(prompts), [s["responses"][i * n:(i + 1) * n] for i in range(P)],
                      [ids[i * n:(i + 1) * n] for i in range(P)], proxy, gold)


def held_out_prompts(config, n: int) -> list[str]:
    """The first `n` held-out prompts of the figure's `eval.prompts` source."""
    from rlhf_jax.data import sources

    spec = {**config.eval.prompts.to_dict(), "num_eval": n}
    return sources.from_config(spec, "config.eval.prompts").prompts("eval")[:n]


def powers_of_two(n_max: int) -> list[int]:
    """1, 2, 4, ... up to n_max (and n_max itself)."""
    ns = [1 << i for i in range(int(np.log2(n_max)) + 1)]
    return ns if ns[-1] == n_max else ns + [n_max]


def main(run, default_config: Path) -> None:
    """`python -m experiments.<figure>`: the figure's config file unless --config is given."""
    import sys

    from rlhf_jax import config_utils

    if not any(a == "--config" or a.startswith("--config=") for a in sys.argv[1:]):
        sys.argv.insert(1, f"--config={default_config}")
    config_utils.run_with_config(run)


def bon_analysis(samples: BonSamples, rms: dict[str, dict], gold: str, judges, ns,
                 n_boot: int) -> tuple[list[dict], dict[str, dict]]:
    """Points and per-proxy results of best-of-n by each proxy on shared samples.

    `rms`: {name: info} (info is copied into the results: model, labels, accuracy, ...).
    Points: one per (proxy, judge, n) with `bon.bon_curves`' fields. Results per proxy: the
    fits of R_bon(d) = d (alpha - beta d) to the gold and proxy gains over n = 1 (weighted by
    their SEs), the measured peak of the gold, the paired rise (peak - n=1) and drop
    (peak - n=N) with bootstrap SEs, and whether the proxy curve is monotone.
    """
    points, results = [], {}
    for name, info in rms.items():
        for judge in judges:
            for r in samples.curves(name, judge, ns, n_boot):
                points.append({"rm": name, **{k: v for k, v in info.items()
                                              if isinstance(v, (int, float, str))},
                               "judge": judge, **r})
        curve = [p for p in points if p["rm"] == name and p["judge"] == gold]
        d = np.array([p["sqrt_kl_bon"] for p in curve])
        g = np.array([p["gold"] for p in curve])
        pr = np.array([p["proxy"] for p in curve])
        gold_fit = fit_gao("bon", d, g - g[0], [p["gold_se"] for p in curve])
        proxy_fit = fit_gao("bon", d, pr - pr[0], [p["proxy_se"] for p in curve])
        per_prompt = samples.per_prompt(name, gold, ns)
        pd = bon.peak_drop(per_prompt, n_boot)
        rise = bon.paired_diff(per_prompt, pd["peak_index"], 0, n_boot)
        results[name] = {
            **info, "gold_fit": gold_fit.to_dict(), "proxy_fit": proxy_fit.to_dict(),
            "gold_n1": float(g[0]), "n_max": int(ns[-1]), "peak_n": int(ns[pd["peak_index"]]),
            "peak_d": float(d[pd["peak_index"]]), "gold_peak": pd["peak"],
            "gold_last": pd["last"], "drop": pd["drop"], "drop_se": pd["drop_se"],
            "rise": rise["diff"], "rise_se": rise["se"],
            "proxy_monotone": bool(np.all(np.diff(pr) >= -1e-9)), "proxy_last": float(pr[-1])}
    return points, results


def bon_falls(r: dict, z: float = 2.0) -> bool:
    """A best-of-n gold curve rose above n = 1, peaked before the last n and fell by more than
    z paired SEs (a `bon_analysis` result)."""
    return (r["rise"] > z * r["rise_se"] and r["peak_n"] < r["n_max"]
            and r["drop"] > z * r["drop_se"])


def fit_of(d: dict) -> GaoFit:
    return GaoFit(**{k: d[k] for k in ("form", "alpha", "beta", "r2", "points")})


def plot_bon(results: dict, points: list[dict], gold: str, out: Path, title: str,
             label=lambda name, r: name) -> Path:
    """Gold (± SE, with the fitted d (alpha - beta d)) and proxy against sqrt(KL_bon), one
    colour per proxy."""
    import matplotlib

    fig, (ax_g, ax_p) = figure(2, 4.6, 3.6)
    cmap = matplotlib.colormaps["viridis"]
    for i, name in enumerate(results):
        r, color = results[name], cmap(i / max(len(results) - 1, 1) * 0.85)
        cur = [p for p in points if p["rm"] == name and p["judge"] == gold]
        d = np.array([p["sqrt_kl_bon"] for p in cur])
        ax_g.errorbar(d, [p["gold"] for p in cur], yerr=[p["gold_se"] for p in cur], fmt="o",
                      ms=3, capsize=2, color=color, label=label(name, r))
        dd = np.linspace(0, d.max(), 60)
        ax_g.plot(dd, r["gold_n1"] + fit_of(r["gold_fit"])(dd), color=color, lw=1, ls="--")
        ax_p.plot(d, [p["proxy"] for p in cur], "o-", ms=3, color=color, label=label(name, r))
    ax_g.set_title(f"gold ({gold}); dashed: fitted d(α − βd)", fontsize=9)
    ax_p.set_title("proxy (normalised RM score)", fontsize=9)
    for ax in (ax_g, ax_p):
        ax.set_xlabel("d = sqrt(KL_bon)  [sqrt nats]")
        ax.grid(alpha=0.3)
    ax_g.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, out)


def print_bon_table(results: dict) -> None:
    print("\n  proxy RM             acc     α       β      R²   fit peak d  measured peak    "
          "gold n=1 → peak → n=N (drop ± SE)")
    for name, r in results.items():
        f = r["gold_fit"]
        pk = "never" if not np.isfinite(f["peak_d"]) else f"{f['peak_d']:.2f}"
        print(f"  {name:<20} {r['accuracy']:.3f}  {f['alpha']:+.3f}  {f['beta']:+.3f}  "
              f"{f['r2']:.2f}  {pk:>8}    n={r['peak_n']:<4} d={r['peak_d']:.2f}   "
              f"{r['gold_n1']:+.3f} → {r['gold_peak']:+.3f} → {r['gold_last']:+.3f} "
              f"({r['drop']:.3f} ± {r['drop_se']:.3f})")
