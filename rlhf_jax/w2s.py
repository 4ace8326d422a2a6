"""Weak-to-strong generalization (Burns et al. 2023, "Weak-to-Strong Generalization: Eliciting
Strong Capabilities With Weak Supervision"; reference code openai/weak-to-strong).

    python -m rlhf_jax.w2s --config=configs/w2s_sim.py:tiny
    python -m rlhf_jax.w2s --config=configs/w2s_sim.py --config.weak=zoo:sim-0.1m \
        --config.strong=zoo:sim-1.6m --config.loss.kind=aux --config.seed=1

Can a weak supervisor elicit what a strong model knows? One trial of the protocol:

1. The task's training split is halved (A, B) by a permutation fixed by the seed.
2. The weak supervisor (the weak base model + a zero-initialised head) fine-tunes on the ground
   truth of A and writes soft labels P(label = 1) for B.
3. The strong student fine-tunes on those soft labels of B, with the `naive` soft-label
   cross-entropy or the `aux` auxiliary confidence loss (below).
4. The ceiling: the strong model fine-tuned on the ground truth of B.
5. All three are evaluated on the held-out test split, and
   `PGR = (acc_w2s - acc_weak) / (acc_ceiling - acc_weak)` (performance gap recovered).
   Optional bootstrapping (`config.medium`): weak -> medium -> strong, the medium student
   trained on the weak labels of B writes the labels the strong student trains on.

Each model is one `Trainer` run in its own work dir (resumable; metrics.jsonl, summary.json).
The weak supervisor and the ceiling depend only on (task, model, seed, training config), so they
live under `config.shared_dir` in dirs named by a hash of that and are reused by every trial
that needs them (a file lock keeps parallel trials from training one twice). A trial writes
`summary.json` in `config.workdir` with the three test accuracies and PGR.

The head: a scalar logit z read at the text's last real token (its EOS) by
`rewards.score_sequences`, P(label = 1) = sigmoid(z); kernel and bias start at zero, so every
prediction is exactly 0.5 at initialisation, as the reference code's zero-initialised linear
head gives. (The reference has two logits and no bias; softmax of (a, b) is sigmoid(b - a), so
the two heads express the same functions up to the bias.)

Losses, per example, with w = the weak label P(label = 1) and p = sigmoid(z):

* soft-label cross-entropy `CE(t, p) = -[t log p + (1 - t) log(1 - p)]` (`naive`: t = w).
* `aux` (the reference's `logconf_loss_fn`): `t = (1 - c) w + c h`, detached, where h hardens
  the student's own prediction over the whole batch: class 0 where the student's class-0
  probability `1 - p` is at or above the threshold `quantile(1 - p, mean(w))` (linear
  interpolation, as `torch.quantile`), else class 1 — so about a `mean(w)` share of the batch is
  hardened to 1 whatever the student's calibration. Because the threshold is a statistic of the
  batch, `aux` needs `train.accum_steps = 1` (with microbatches it would be one per microbatch).
* The coefficient c (`loss.schedule`): `reference` is the reference code's
  `c = alpha * (step_frac if step_frac <= warmup_frac else 1)`, which jumps from
  `alpha * warmup_frac` (0.05 at alpha 0.5) to alpha at 10% of training (DESIGN.md pitfall 19);
  `ramp` is `c = alpha * min(1, step_frac / warmup_frac)`, the smooth linear warm-up the paper
  describes (openai/weak-to-strong PR #33 changes the code to it). `step_frac = (s - 1) / steps`
  for the batch of training step s, as the reference's `step / nsteps` with s from 0.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlhf_jax import config_utils, handoff, models, runcache
from rlhf_jax import trainer as trainer_lib
from rlhf_jax.data import classification
from rlhf_jax.data.iterators import ArrayIterator
from rlhf_jax.errors import UserError
from rlhf_jax.optim import make_optimizer
from rlhf_jax.rewards import score_batches, score_sequences

log = logging.getLogger(__name__)

LOSSES = ("naive", "aux")
AUX_SCHEDULES = ("reference", "ramp")

# ----------------------------------------------------------------------------------------------
# Losses. logits z [B]; weak / target: P(label = 1) [B].


def soft_ce(logits: jax.Array, target: jax.Array) -> jax.Array:
    """Per-example soft-label cross-entropy of sigmoid(logits) against P(1) = target."""
    z = logits.astype(jnp.float32)
    return -(target * jax.nn.log_sigmoid(z) + (1.0 - target) * jax.nn.log_sigmoid(-z))


def hardening_threshold(p0: jax.Array, weak: jax.Array) -> jax.Array:
    """quantile(student's class-0 probabilities, mean of the weak P(1)) over the batch."""
    return jnp.quantile(p0, jnp.mean(weak))


def aux_target(logits: jax.Array, weak: jax.Array, coef: jax.Array | float) -> jax.Array:
    """`(1 - c) weak + c hardened(student)`, with no gradient (see the module docstring)."""
    p0 = jax.nn.sigmoid(-logits.astype(jnp.float32))
    hard1 = (p0 < hardening_threshold(p0, weak)).astype(jnp.float32)
    return jax.lax.stop_gradient((1.0 - coef) * weak + coef * hard1)


def aux_coef(step_frac, alpha: float, warmup_frac: float, schedule: str = "reference"):
    """The aux-loss coefficient c at `step_frac` (numpy or jax arrays, or floats)."""
    xp = jnp if isinstance(step_frac, jax.Array) else np
    if schedule == "reference":  # openai/weak-to-strong logconf_loss_fn: a jump at warmup_frac
        return alpha * xp.where(step_frac > warmup_frac, 1.0, step_frac)
    if schedule == "ramp":  # the paper's smooth warm-up
        if warmup_frac <= 0:
            return alpha * xp.ones_like(xp.asarray(step_frac, dtype=xp.float32))
        return alpha * xp.minimum(1.0, xp.asarray(step_frac) / warmup_frac)
    raise ValueError(f"aux schedule {schedule!r} is not one of {AUX_SCHEDULES}")


def w2s_loss(logits: jax.Array, weak: jax.Array, step_frac: jax.Array, *, kind: str = "naive",
             alpha: float = 0.5, warmup_frac: float = 0.1, schedule: str = "reference"
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss_sum, metric_sums) of one batch for `Trainer.make_train_step`; count = rows.

    `weak`: the labels trained on, P(label = 1) (ground truth gives 0 / 1); `step_frac` [B]:
    the training progress of this batch (all rows equal). Metric sums: `accuracy` (agreement
    of the hard prediction with the hard label), `target` (mean P(1) trained on) and, for `aux`,
    `coef` and `hardened` (share of the batch hardened to label 1).
    """
    weak = weak.astype(jnp.float32)
    n = jnp.float32(weak.shape[0])
    sums: dict[str, jax.Array] = {"count": n}
    if kind == "naive":
        target = weak
    elif kind == "aux":
        c = aux_coef(step_frac[0], alpha, warmup_frac, schedule)
        target = aux_target(logits, weak, c)
        p0 = jax.nn.sigmoid(-logits.astype(jnp.float32))
        sums["coef"] = c * n
        sums["hardened"] = jnp.sum(p0 < hardening_threshold(p0, weak)).astype(jnp.float32)
    else:
        raise ValueError(f"loss kind {kind!r} is not one of {LOSSES}")
    loss_sum = jnp.sum(soft_ce(logits, target))
    sums["accuracy"] = jnp.sum((logits > 0) == (weak > 0.5)).astype(jnp.float32)
    sums["target"] = jnp.sum(target)
    return loss_sum, sums


# ----------------------------------------------------------------------------------------------
# The classifier: a base model's trunk + a zero-initialised scalar head on the last real token.


def classifier_params(cfg: models.ModelConfig, trunk_params: Mapping) -> dict:
    """The trunk (LM / score heads dropped) with a zero `score_head`: P(1) = 0.5 at init."""
    dtype = jnp.dtype(cfg.param_dtype)
    head = {"kernel": np.zeros((cfg.d_model,), dtype), "bias": np.zeros((), dtype)}
    return {**models.trunk(dict(trunk_params)), "score_head": head}


def classifier_logits(cfg: models.ModelConfig, params: Mapping, tokens: jax.Array,
                      mask: jax.Array) -> jax.Array:
    """z [B] at each row's last real token (`rewards.reward_index`); P(label = 1) = sigmoid(z)."""
    return score_sequences(cfg, params, tokens, mask)


def predict_probs(cfg: models.ModelConfig, params: Mapping, tokens: np.ndarray,
                  mask: np.ndarray, batch_size: int = 256, place=None) -> np.ndarray:
    """P(label = 1) of every row (fixed-shape jitted chunks; `place`, a Trainer: params on its
    mesh, each chunk split over it, the scores gathered on every process)."""
    z = score_batches(cfg, params, tokens, mask, batch_size=batch_size, place=place)
    return 1.0 / (1.0 + np.exp(-z.astype(np.float64)))


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose prediction (P(1) > 0.5) is the label; P(1) = 0.5 counts one half."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
    hit = np.where(probs == 0.5, 0.5, ((probs > 0.5) == (labels > 0.5)).astype(np.float64))
    return float(hit.mean())


# ----------------------------------------------------------------------------------------------
# PGR of one trial (its statistics over seeds: experiments/w2s_stats.py).


def pgr(acc_weak: float, acc_w2s: float, acc_ceiling: float) -> float:
    """Performance gap recovered: (acc_w2s - acc_weak) / (acc_ceiling - acc_weak)."""
    gap = acc_ceiling - acc_weak
    return float("nan") if gap == 0 else (acc_w2s - acc_weak) / gap


# ----------------------------------------------------------------------------------------------
# Training one classifier (one Trainer run).


class StepFraction:
    """Wraps a batch iterator and adds `step_frac` [B] = (s - 1) / total to the batch of step s.

    Its state (for exact resume) is the inner iterator's plus the number of batches given out.
    """

    def __init__(self, inner, total_steps: int):
        self.inner, self.total, self.given = inner, int(total_steps), 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self.inner))
        rows = next(iter(batch.values())).shape[0]
        batch["step_frac"] = np.full((rows,), self.given / self.total, np.float32)
        self.given += 1
        return batch

    def get_state(self) -> dict:
        return {"inner": self.inner.get_state(), "given": self.given}

    def set_state(self, state: Mapping) -> None:
        self.inner.set_state(state["inner"])
        self.given = int(state["given"])


def resolve_model(spec: str, *, seed: int, world_seed: int = 0, where: str = "config.weak"):
    """A model spec -> (ModelConfig, host params (trunk), tokenizer dir), through `handoff`:
    `zoo:<preset>`, `hf:<dir>`, a finished stage's work dir, or `scratch:<preset>` (fresh
    random weights with the world's tokenizer: a baseline with no pretraining, and tiny tests).
    The params are host arrays that `Trainer.create_state` places on the mesh."""
    if not spec:
        raise UserError(where, "is empty", "give zoo:<preset>, hf:<dir>, scratch:<preset> or a "
                        "finished stage's work dir")
    source = {"kind": "sim", "seed": int(world_seed)}  # its tokenizer, when the model has none
    loaded = handoff.resolve_init(spec, field=where, seed=seed, source=source)
    _, tok_dir = handoff.tokenizer_for("", loaded.meta, source, field=where)
    return loaded.cfg, loaded.params, tok_dir


def train_classifier(config, *, workdir: Path, label_rows: np.ndarray | None, **run) -> dict:
    """Fine-tune one classifier in `workdir` (one Trainer run) or reuse a finished one.

    `run`: `role`, `model`, `train_rows` (indices into the task's training split), `targets`
    (their P(1) labels), `loss` (the loss config: kind, alpha, warmup_frac, schedule), `data`
    (the task's `classification.TaskData`). Writes `probs_test.npy` and, when
    `label_rows` is given, `probs_labels.npy` (its predictions on those rows: the soft labels
    it hands the next model). Returns the run's summary (incl. test_accuracy, seconds).
    """
    files = ["summary.json", "probs_test.npy"] + (["probs_labels.npy"] if label_rows is not None
                                                   else [])
    out: dict[str, Any] = {}

    def train():
        out.update(_train_classifier(config, workdir=workdir, label_rows=label_rows, **run))

    # The processes of a multi-process run train together: no lock. Finished = its final
    # checkpoint and these files (`runcache.finished`).
    _, reused = runcache.ensure(workdir, train, files=files, mark=False,
                                locked=jax.process_count() == 1)
    if reused:
        log.info("w2s %s: reusing %s", run["role"], workdir)
        return {**json.loads((workdir / "summary.json").read_text()), "reused": True}
    return {**out, "reused": False}


def _train_classifier(config, *, workdir: Path, role: str, model: str, train_rows: np.ndarray,
                      targets: np.ndarray, loss: Mapping, label_rows: np.ndarray | None,
                      data) -> dict:
    t0, cpu0 = time.perf_counter(), time.process_time()
    cfg, init, tok_dir = resolve_model(
        model, seed=int(config.seed), world_seed=int(config.task.world_seed),
        where=f"config.{role}")
    cfg = cfg.replace(dropout=0.0)  # the reference trains with dropout off
    enc = data.encoded(tok_dir)
    n, bs = len(train_rows), int(config.train.batch_size)
    steps = max(1, int(float(config.train.epochs) * n) // bs)
    lr = float(config.optim.lr)
    if int(config.lr_ref_width) > 0:  # Adam's step per weight is fixed: wider, smaller lr
        lr *= (int(config.lr_ref_width) / cfg.d_model) ** float(config.lr_width_power)
    rc = _run_config(config, workdir=workdir, role=role, model=model, steps=steps, loss=loss,
                     lr=lr)
    tr = trainer_lib.Trainer(rc, f"w2s_{role}")
    tr.metadata.update(model_config=cfg.to_dict(), tokenizer_dir=tok_dir, init_from=model,
                       role=role)
    lk = dict(loss)
    # naive reads no aux setting: one key for it, so ground-truth runs and naive students
    # of the same size share a compiled step.
    loss_key = ((lk["kind"], float(lk["alpha"]), float(lk["warmup_frac"]), lk["schedule"])
                if lk["kind"] == "aux" else ("naive", 0.0, 0.0, "reference"))
    optimizer, step = _optimizer_and_step(
        cfg, json.dumps(rc.optim.to_dict(), sort_keys=True), steps,
        int(rc.train.accum_steps), loss_key)
    state, _ = tr.create_state(classifier_params(cfg, init), models.param_axes(cfg, ("score",)),
                               optimizer)
    arrays = {"tokens": enc["train"]["tokens"][train_rows],
              "mask": enc["train"]["mask"][train_rows],
              "target": np.asarray(targets, np.float32)}
    train_iter = StepFraction(ArrayIterator(arrays, bs, seed=int(config.seed)), steps)
    test, test_y = enc["test"], data.labels("test")
    ebs = int(config.eval_batch_size)
    last: dict[str, np.ndarray] = {}

    def eval_fn(st):  # on the placed params, split over the mesh
        p = predict_probs(cfg, st.params, test["tokens"], test["mask"], ebs, place=tr)
        last["probs_test"] = p
        ce = -np.mean(test_y * np.log(np.clip(p, 1e-12, 1)) +
                      (1 - test_y) * np.log(np.clip(1 - p, 1e-12, 1)))
        return {"test_accuracy": accuracy(p, test_y), "test_loss": float(ce)}

    t_train = time.perf_counter()
    state = tr.fit(state, step, train_iter, eval_fn=eval_fn)
    train_seconds = time.perf_counter() - t_train
    params = state.params
    extra: dict[str, Any] = {"role": role, "model": model, "workdir": str(workdir),
                             "loss": lk, "steps": steps, "lr": lr,
                             "train_rows": n, "params": models.param_count(params),
                             "test_accuracy": tr.summary["eval"]["test_accuracy"],
                             "test_loss": tr.summary["eval"]["test_loss"],
                             "encode": enc["stats"]}
    if tr.is_main:
        np.save(workdir / "probs_test.npy", last["probs_test"])
    if label_rows is not None:
        p = predict_probs(cfg, params, enc["train"]["tokens"][label_rows],
                          enc["train"]["mask"][label_rows], ebs, place=tr)
        extra["label_accuracy"] = accuracy(p, data.labels("train")[label_rows])
        extra["label_mean"] = float(p.mean())
        if tr.is_main:
            np.save(workdir / "probs_labels.npy", p)
    extra["train_seconds"] = round(train_seconds, 2)
    extra["seconds"] = round(time.perf_counter() - t0, 2)
    # CPU time of this process (all threads): comparable across machine loads, unlike wall.
    extra["cpu_seconds"] = round(time.process_time() - cpu0, 2)
    tr.write_summary(extra)
    out = dict(tr.summary)
    tr.close()
    return out


@functools.lru_cache(maxsize=32)
def _optimizer_and_step(cfg: models.ModelConfig, optim_json: str, steps: int, accum_steps: int,
                        loss: tuple):
    """The optimizer and train step of one kind of run, built once per process: the same
    function objects let JAX reuse the compiled step in every later run of the same shapes and
    settings (a trial's ceiling and naive student; the seeds of a sweep run in one process)."""
    kind, alpha, warmup_frac, schedule = loss
    optimizer = make_optimizer(ml_collections.ConfigDict(json.loads(optim_json)), steps)

    def loss_fn(params, frozen, batch, key):
        del frozen, key  # nothing frozen; dropout is off
        z = classifier_logits(cfg, params, batch["tokens"], batch["mask"])
        return w2s_loss(z, batch["target"], batch["step_frac"], kind=kind, alpha=alpha,
                        warmup_frac=warmup_frac, schedule=schedule)

    return optimizer, trainer_lib.make_train_step(loss_fn, optimizer, accum_steps)


_KEY_SKIP = ("workdir", "mesh", "distributed", "sharding_rules")


def _run_config(config, *, workdir: Path, role: str, model: str, steps: int, loss: Mapping,
                lr: float):
    """The config of one model run: the shared training fields + what this run is."""
    c = config_utils.base_config()
    c.workdir = str(workdir)
    c.seed = int(config.seed)
    c.init_from = model
    c.mesh = config.mesh.copy_and_resolve_references()
    c.sharding_rules = config.sharding_rules
    c.distributed = config.distributed.copy_and_resolve_references()
    c.optim = config.optim.copy_and_resolve_references()
    for key, value in config.train.items():
        c.train[key] = value
    c.train.steps = steps
    c.optim.lr = lr
    c.optim.warmup_steps = min(int(c.optim.warmup_steps), steps)
    c.role = role
    c.task = config.task.copy_and_resolve_references()
    c.loss = ml_collections.ConfigDict(dict(loss))
    c.lock()
    return c


def run_key(*parts: Any) -> str:
    """Short hash of what decides a run's result (dicts, strings, numbers)."""
    def clean(x):
        if hasattr(x, "to_dict"):
            x = x.to_dict()
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if k not in _KEY_SKIP}
        return x

    return runcache.digest([clean(p) for p in parts], digits=10)


# ----------------------------------------------------------------------------------------------
# The protocol.


def validate(config) -> None:
    """Check the w2s fields before anything trains; errors name the field."""
    lc = config.loss
    if lc.kind not in LOSSES:
        raise UserError("config.loss.kind", f"{lc.kind!r} is not a loss", f"choose one of {LOSSES}")
    if lc.schedule not in AUX_SCHEDULES:
        raise UserError("config.loss.schedule", f"{lc.schedule!r} is not a schedule",
                        f"choose one of {AUX_SCHEDULES}")
    if not 0 <= float(lc.alpha) <= 1:
        raise UserError("config.loss.alpha", f"{lc.alpha} is outside [0, 1]", "use e.g. 0.5")
    if not 0 <= float(lc.warmup_frac) <= 1:
        raise UserError("config.loss.warmup_frac", f"{lc.warmup_frac} is outside [0, 1]",
                        "use e.g. 0.1 (the reference code's)")
    if lc.kind == "aux" and int(config.train.accum_steps) != 1:
        raise UserError("config.train.accum_steps", "must be 1 for loss.kind='aux'",
                        "the hardening threshold is a quantile over the whole batch")
    kind = config.task.kind
    if kind not in classification.WORLD_TASKS + ("jsonl",):
        raise UserError("config.task.kind", f"{kind!r} is not a task",
                        f"choose one of {classification.WORLD_TASKS + ('jsonl',)}")
    if int(config.lr_ref_width) < 0:
        raise UserError("config.lr_ref_width", f"{config.lr_ref_width} must be >= 0",
                        "0 trains every size at optim.lr")
    if float(config.train.epochs) <= 0:
        raise UserError("config.train.epochs", f"{config.train.epochs} must be > 0",
                        "the reference trains 2 epochs")
    for field in ("weak", "strong"):
        if not config[field]:
            raise UserError(f"config.{field}", "is empty", "give e.g. zoo:sim-0.1m")


def run(config) -> dict:
    """One trial: weak supervisor, (medium,) strong student, ceiling -> summary.json + PGR."""
    t_start = time.perf_counter()
    validate(config)
    root = Path(config.workdir)
    trial_key = run_key(config)
    if (root / "summary.json").exists():
        done = json.loads((root / "summary.json").read_text())
        if done.get("trial_key") == trial_key:
            log.info("w2s: trial %s is finished; reusing its summary", root)
            return {**done, "trial_reused": True}
    data = classification.TaskData(config)
    runs, probs = _train_trial(config, data, root, trial_key)
    summary = _trial_summary(config, data, runs, probs, trial_key)
    summary["seconds"] = round(time.perf_counter() - t_start, 2)
    summary["trial_reused"] = False
    if jax.process_index() == 0:
        root.mkdir(parents=True, exist_ok=True)
        (root / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        (root / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    return summary


def _train_trial(config, data, root: Path, trial_key: str) -> tuple[dict, dict]:
    """Train (or reuse) the weak supervisor, the medium and strong students and the ceiling;
    returns their run records and the weak and strong test probabilities."""
    seed = int(config.seed)
    shared = Path(config.shared_dir) / run_key(data.fingerprint()) / f"seed{seed}"
    gt = {"kind": "naive", "alpha": 0.0, "warmup_frac": 0.0, "schedule": "reference"}
    student_loss = config.loss.to_dict()
    y_train = data.labels("train").astype(np.float32)
    a, b = data.half_a, data.half_b

    def gt_dir(role, model):
        key = run_key(config.optim, config.train, model, role, config.lr_ref_width,
                      config.lr_width_power)
        return shared / f"{role}-{_safe(model)}-{key}"

    # The students' dirs carry the trial's key: a changed config never resumes an old student.
    student_dir, medium_dir = root / f"student-{trial_key}", root / f"medium-{trial_key}"
    runs: dict[str, dict] = {}
    runs["weak"] = train_classifier(config, workdir=gt_dir("weak", config.weak), role="weak",
                                    model=config.weak, train_rows=a, targets=y_train[a], loss=gt,
                                    label_rows=b, data=data)
    labels = np.load(gt_dir("weak", config.weak) / "probs_labels.npy")
    if config.medium:
        runs["medium"] = train_classifier(
            config, workdir=medium_dir, role="medium", model=config.medium, train_rows=b,
            targets=labels, loss=student_loss, label_rows=b, data=data)
        labels = np.load(medium_dir / "probs_labels.npy")
    runs["strong"] = train_classifier(config, workdir=student_dir, role="strong",
                                      model=config.strong, train_rows=b, targets=labels,
                                      loss=student_loss, label_rows=None, data=data)
    runs["ceiling"] = train_classifier(config, workdir=gt_dir("ceiling", config.strong),
                                       role="ceiling", model=config.strong, train_rows=b,
                                       targets=y_train[b], loss=gt, label_rows=None, data=data)
    probs = {"weak": np.load(gt_dir("weak", config.weak) / "probs_test.npy"),
             "strong": np.load(student_dir / "probs_test.npy")}
    return runs, probs


def _trial_summary(config, data, runs: dict, probs: dict, trial_key: str) -> dict[str, Any]:
    """The trial's summary.json (accuracies, PGR, agreement, per-run records)."""
    acc = {k: float(v["test_accuracy"]) for k, v in runs.items()}
    test_y = data.labels("test")
    summary: dict[str, Any] = {
        "trial_key": trial_key, "task": config.task.kind, "weak": config.weak,
        "strong": config.strong, "medium": config.medium, "loss": config.loss.kind,
        "seed": int(config.seed),
        "acc_weak": acc["weak"], "acc_w2s": acc["strong"], "acc_ceiling": acc["ceiling"],
        # null when the ceiling equals the weak accuracy (PGR undefined; JSON has no NaN).
        "pgr": _finite_or_none(pgr(acc["weak"], acc["strong"], acc["ceiling"])),
        # How much the student imitates its supervisor's mistakes vs its own knowledge.
        "student_supervisor_agreement": float(np.mean((probs["weak"] > 0.5) ==
                                                      (probs["strong"] > 0.5))),
        "weak_label_accuracy": float(runs["weak"]["label_accuracy"]),
        "test_rows": int(len(test_y)), "half_rows": int(len(data.half_b)),
        "data": data.stats,
        "runs": {k: {"workdir": str(v.get("workdir", "")), "test_accuracy": v["test_accuracy"],
                     "seconds": v["seconds"], "train_seconds": v["train_seconds"],
                     "cpu_seconds": v.get("cpu_seconds"),
                     "reused": v["reused"], "steps": v["steps"], "params": v["params"]}
                 for k, v in runs.items()},
    }
    if config.medium:
        summary["acc_medium"] = acc["medium"]
    return summary


def _finite_or_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def _safe(spec: str) -> str:
    """A model spec as a short file-name piece (zoo:sim-0.1m -> zoo_sim-0.1m)."""
    return "".join(ch if ch.isalnum() or ch in "-._" else "_" for ch in spec)[-40:]


if __name__ == "__main__":
    config_utils.run_stage(run, ("task", "weak", "strong", "medium", "loss", "seed", "acc_weak",
                                 "acc_w2s", "acc_ceiling", "pgr", "student_supervisor_agreement",
                                 "seconds"))
