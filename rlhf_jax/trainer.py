"""The training loop every stage shares.

A stage supplies a loss (`loss_fn(params, frozen, microbatch, rng) -> (loss_sum, metric_sums)`,
sums over tokens/examples with `metric_sums["count"]` the weight) or a whole step function
(`step(state, frozen, batch, rng) -> (state, metrics)`). `frozen` is a tree of arrays the step
reads but never trains (a reference policy, a reward model; None when there is none): it is a
jit argument with its own shardings, placed once on the mesh and never re-sent from the host.
`Trainer` owns the rest: mesh, sharded state creation, resume, jit, the loop with eval /
checkpoint cadence, SIGTERM, non-finite stop, progress, metrics and the hand-off of the final
params to the next stage.
"""

from __future__ import annotations

import itertools
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax import checkpoint, config_utils, models, provenance, rng, sharding
from rlhf_jax.models import lora
from rlhf_jax.errors import UserError
from rlhf_jax.metrics import MetricWriter, progress_bar, read_metrics, to_python
from rlhf_jax.optim import current_lr

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
    """What a checkpoint holds. `extra`: small stage state that must survive a restart (e.g.
    PPO's adaptive KL coefficient); replicated, saved and restored with the rest."""

    step: jax.Array
    params: Any
    opt_state: Any
    extra: Any = flax.struct.field(default_factory=dict)


# ----------------------------------------------------------------------------------- train step


def split_microbatches(batch, accum_steps: int):
    """[B, ...] → [accum_steps, B/accum_steps, ...]; microbatch i holds rows i, i+k, i+2k, ...

    Strided rather than contiguous so each device's contiguous block of the data-sharded batch
    contributes to every microbatch (no device idles, no resharding).
    """
    def one(x):
        if x.shape[0] % accum_steps:
            raise ValueError(f"batch dim {x.shape[0]} is not divisible by accum_steps="
                             f"{accum_steps}")
        x = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(one, batch)


def _f32(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation,
                    accum_steps: int = 1) -> Callable:
    """`step(state, frozen, batch, rng) -> (state, metrics)` with gradient accumulation.

    `loss_fn(params, frozen, microbatch, rng)`. Gradients and metric sums are summed over the
    `accum_steps` microbatches and divided by the TOTAL count once, so the update equals the
    one-big-batch update even when microbatches hold different numbers of tokens (averaging
    per-microbatch means would not). Microbatch i gets `rng.step_key(rng, MICROBATCH, i)`.
    Metrics: every metric sum / count, plus `loss`, `count`, `grad_norm`, `lr`.
    """
    def trained_loss(trained, rest, frozen, mb, key):
        return loss_fn(lora.join(trained, rest), frozen, mb, key)

    grad_fn = jax.value_and_grad(trained_loss, has_aux=True)

    def micro(params, frozen, mb, key):
        # With a LoRA adapter only the adapter (and score heads) is differentiated; the base is
        # an argument the gradient never flows to. Without one, `rest` is empty.
        trained, rest = lora.split(params)
        (loss_sum, sums), grads = grad_fn(trained, rest, frozen, mb, key)
        if "count" not in sums:
            raise KeyError("loss_fn must return metric_sums with a 'count' entry (the weight, "
                           "e.g. the number of target tokens) — got keys "
                           f"{sorted(sums)}")
        sums = dict(sums)
        sums["loss"] = loss_sum
        return _f32(grads), _f32(sums)

    def step(state, frozen, batch, key):
        micro_key = lambda i: rng.step_key(key, rng.StepUse.MICROBATCH, i)  # noqa: E731
        if accum_steps == 1:
            grads, sums = micro(state.params, frozen, batch, micro_key(0))
        else:
            mbs = split_microbatches(batch, accum_steps)

            def body(carry, xs):
                i, mb = xs
                out = micro(state.params, frozen, mb, micro_key(i))
                return jax.tree.map(jnp.add, carry, out), None

            shapes = jax.eval_shape(micro, state.params, frozen,
                                    jax.tree.map(lambda x: x[0], mbs), key)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), mbs))
        count = sums["count"]
        grads = jax.tree.map(lambda g: g / count, grads)
        trained, rest = lora.split(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, trained)
        params = lora.join(optax.apply_updates(trained, updates), rest)
        metrics = {k: v / count for k, v in sums.items() if k != "count"}
        metrics["count"] = count
        metrics["grad_norm"] = optax.tree.norm(grads)
        lr = current_lr(opt_state)
        if lr is not None:
            metrics["lr"] = lr
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step


def make_eval_step(loss_fn: Callable) -> Callable:
    """`eval_step(params, frozen, batch, rng) -> metric sums` (incl. `loss` and `count`)."""
    def eval_step(params, frozen, batch, key):
        loss_sum, sums = loss_fn(params, frozen, batch, key)
        sums = dict(sums)
        sums["loss"] = loss_sum
        return _f32(sums)

    return eval_step


# --------------------------------------------------------------------------------- the trainer


def opt_state_shardings(abstract_opt_state, abstract_params, param_shardings,
                        mesh: jax.sharding.Mesh):
    """Shard optimizer-state leaves like the parameter they mirror (Adam's mu/nu), else replicate.

    A leaf mirrors a parameter when its tree path ends with that parameter's path and the shapes
    agree; this holds for optax states (and wrappers such as `masked`) without knowing them.
    """
    by_path = {}
    flat_p = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    flat_s = jax.tree.leaves(param_shardings)
    for (path, leaf), sh in zip(flat_p, flat_s, strict=True):
        by_path[tuple(str(k) for k in path)] = (tuple(leaf.shape), sh)
    rep = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf):
        keys = tuple(str(k) for k in path)
        for i in range(len(keys)):
            hit = by_path.get(keys[i:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return rep

    return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


class _Preemption:
    """SIGTERM → finish the current step, checkpoint, exit 0 (schedulers send it before a kill)."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._installed = False

    def __enter__(self):
        # Multi-process: JAX's preemption service owns SIGTERM and syncs the save step.
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def _handle(self, signum, frame):
        self.requested = True
        log.warning("SIGTERM received: will checkpoint after the current step and exit")

    def reached(self, step: int) -> bool:
        if self.requested:
            return True
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # preemption service not running
                return False
        return False

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
        return False


class Placement:
    """Where arrays of a run live: the mesh, the logical-axis rules, and the moves onto them.

    Creating it initialises `jax.distributed` if configured and builds the `(data, fsdp,
    tensor)` mesh of `config.mesh`. Code that samples or scores without training (evaluations,
    a stage's data preparation before its Trainer exists, experiments) uses one directly; a
    `Trainer` is one.
    """

    def __init__(self, config, like: "Placement | None" = None):
        """`like`: an existing Placement of the same run whose mesh and rules this one shares
        (a stage that placed its data before its config was final builds one mesh, not two)."""
        self.config = config
        if like is None:
            sharding.maybe_initialize_distributed(config)
            self.mesh = sharding.make_mesh(config.mesh)
        else:
            if like.config.mesh.to_dict() != config.mesh.to_dict():
                raise ValueError("Placement(like=...): the configs' meshes differ")
            self.mesh = like.mesh
        self.rules = sharding.rules_from_config(config)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
        self.is_main = jax.process_index() == 0

    def key(self, purpose: rng.Purpose, *index: int) -> jax.Array:
        """The run's key for `purpose` (see `rlhf_jax.rng`): `rng.key(config.seed, ...)`."""
        return rng.key(self.config.seed, purpose, *index)

    def param_shardings(self, param_axes, abstract_params):
        return sharding.logical_to_shardings(param_axes, self.mesh, self.rules, abstract_params)

    def model_shardings(self, cfg: models.ModelConfig) -> Callable:
        """`abstract params -> shardings` for any params tree of model `cfg` (whichever heads
        it holds): what loaders take to restore a checkpoint straight onto this mesh."""
        return lambda abstract: self.param_shardings(models.axes_like(cfg, abstract), abstract)

    def place(self, tree, axes) -> Any:
        """Put a params tree (host numpy or device arrays) on this mesh by its logical `axes`.

        For frozen trees (reference policy, reward model): place them once and pass them to the
        jitted steps as arguments, never as closed-over constants.
        """
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)
        return jax.device_put(tree, self.param_shardings(axes, shapes))

    def shardings_of(self, tree) -> Any:
        """The shardings a placed tree carries (for the in_shardings of a jit)."""
        return jax.tree.map(lambda x: x.sharding, tree)

    @property
    def batch_shards(self) -> int:
        """How many shards a global batch splits into (its row count must be a multiple)."""
        return int(np.prod([self.mesh.shape[a] for a in sharding.batch_axes(self.rules)]))

    def to_global(self, host_batch):
        """This process's rows of a batch -> global arrays sharded over the batch axes."""
        return sharding.host_to_global(host_batch, self.mesh, self.rules)

    def shard_rows(self, batch):
        """A whole batch that every process holds -> global arrays, each process contributing
        its own slice of the rows (evaluation chunks, precomputed passes)."""
        return self.to_global(sharding.process_rows(batch))


class Trainer(Placement):
    """Mesh, checkpoints, metrics and the loop for one stage (`stage_name`) of a run.

    Creating it initialises `jax.distributed` if configured, validates the shared config fields
    (before anything compiles), builds the mesh and rules, checks and records `workdir/config.json`
    (`rlhf_jax.provenance`: a rerun with a different config is refused), and opens
    the checkpointer and metric writer. `self.metadata` is saved with every checkpoint and the
    final params; stages add what the next stage needs (model config, tokenizer dir, reward
    normalisation, ...).
    """

    def __init__(self, config, stage_name: str, *, async_checkpoints: bool = True,
                 place: Placement | None = None):
        super().__init__(config, like=place)  # `place`: reuse that Placement's mesh
        self.stage = stage_name
        config_utils.validate(config, jax.device_count())
        self.workdir = Path(config.workdir)
        # Records config.json, or refuses a config that differs from the one that trained this
        # work dir's checkpoints (rlhf_jax.provenance); a resume's change is written at 1st save.
        self.provenance = provenance.check_workdir(config, self.workdir, write=self.is_main)
        self.checkpointer = checkpoint.Checkpointer(
            self.workdir, keep=config.train.keep_checkpoints, async_save=async_checkpoints)
        self.resume_step = self.checkpointer.latest_step()
        # Drop metric records the interrupted run wrote after its last checkpoint.
        self.writer = MetricWriter(self.workdir, resume_step=self.resume_step or 0,
                                   enabled=self.is_main)
        self.metadata: dict[str, Any] = {"stage": stage_name, "config": config,
                                         "config_hash": self.provenance.config_hash}
        self.summary: dict[str, Any] = {}
        self.state_shardings = None
        self.restored_data_state: dict | None = None
        self.final_step: int | None = None  # set by `fit`
        # LoRA (`config.lora.rank` > 0): the state holds only the adapters (and score heads);
        # `lora_base` is the frozen rest, placed once, a jit argument of every step.
        self.lora = lora.spec_from_config(config)
        self.lora_base: Any = None

    # -- state ---------------------------------------------------------------------------------


    def create_state(self, init: Callable[[], Any] | Any, param_axes,
                     optimizer: optax.GradientTransformation, extra: Mapping | None = None):
        """Sharded TrainState → `(state, data_state)`.

        `init` is a no-argument function returning the params (run under jit, so each device
        creates only its own shards) or an already-built params tree (e.g. from
        `checkpoint.load_stage_params`). If `workdir/checkpoints` has a checkpoint, it is restored
        instead (onto this mesh, whatever mesh wrote it) and `data_state` is the iterator state
        saved with it (`fit` applies it); otherwise `data_state` is None. `extra` (a dict of
        arrays) becomes `state.extra`, replicated; on resume its saved values win.
        """
        extra = jax.tree.map(jnp.asarray, dict(extra or {}))
        abstract_extra = jax.eval_shape(lambda: extra)
        extra_sh = jax.tree.map(lambda _: self.replicated, abstract_extra)
        if self.lora is not None:
            return self._create_lora_state(init, param_axes, optimizer, extra, extra_sh,
                                           abstract_extra)
        abstract_params = jax.eval_shape(init) if callable(init) else jax.eval_shape(
            lambda: init)
        param_sh = self.param_shardings(param_axes, abstract_params)
        abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
        opt_sh = opt_state_shardings(abstract_opt, abstract_params, param_sh, self.mesh)
        state_sh = TrainState(step=self.replicated, params=param_sh, opt_state=opt_sh,
                              extra=extra_sh)
        self.state_shardings = state_sh
        if self.resume_step is not None:
            abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32),
                                  params=abstract_params, opt_state=abstract_opt,
                                  extra=abstract_extra)
            state, data_state, meta = self.checkpointer.restore(
                checkpoint.abstract_tree(abstract, state_sh), self.resume_step)
            log.info("resumed %s from %s at step %d", self.stage, self.checkpointer.directory,
                     self.resume_step)
            self.restored_data_state = data_state
            return state, data_state
        if callable(init):
            def make():
                params = init()
                return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                  opt_state=optimizer.init(params), extra=extra)

            state = jax.jit(make, out_shardings=state_sh)()
        else:
            # A copy: the train step donates the state, and `init` may be arrays the caller still
            # uses (the SFT policy whose trunk starts an RM, the frozen reference of PPO).
            params = jax.device_put(init, param_sh, may_alias=False)
            opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(params)
            state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), self.replicated),
                               params=params, opt_state=opt_state,
                               extra=jax.device_put(extra, extra_sh))
        return state, None

    def _create_lora_state(self, init, param_axes, optimizer, extra, extra_sh, abstract_extra):
        """`create_state` of a LoRA stage: the base (`init`) frozen and never copied, a fresh
        adapter on `config.lora.targets`; the state (optimizer, checkpoints) holds only the
        trained part. Returns the state with the full params (base + adapter) as methods see
        them; `fit` and the jitted steps split it again."""
        if not self.config.get("init_from"):
            raise UserError("config.lora.rank", "LoRA needs a base model, but config.init_from "
                            "is empty", "set config.init_from, or config.lora.rank=0")
        abstract_base = jax.eval_shape(init) if callable(init) else jax.eval_shape(lambda: init)
        base_sh = self.param_shardings(param_axes, abstract_base)
        if callable(init):
            base = jax.jit(init, out_shardings=base_sh)()
        else:  # already on the mesh (handoff): device_put is then a no-op, never a copy
            base = jax.device_put(init, base_sh)
        key = jax.random.fold_in(self.key(rng.Purpose.INIT), 0x10A)
        full = lora.attach(base, self.lora, key)
        axes = lora.adapter_axes(param_axes, full)
        trained_axes, frozen_axes = lora.partition(axes, True), lora.partition(axes, False)
        abstract_trained = jax.eval_shape(lambda: lora.partition(full, True))
        trained_sh = self.param_shardings(trained_axes, abstract_trained)
        frozen_part = lora.partition(full, False)
        self.lora_base = jax.device_put(frozen_part, self.param_shardings(
            frozen_axes, jax.eval_shape(lambda: frozen_part)))
        abstract_opt = jax.eval_shape(optimizer.init, abstract_trained)
        opt_sh = opt_state_shardings(abstract_opt, abstract_trained, trained_sh, self.mesh)
        self.state_shardings = TrainState(step=self.replicated, params=trained_sh,
                                          opt_state=opt_sh, extra=extra_sh)
        init_from = str(self.config.init_from)
        if not init_from.startswith("hf:") and ":" not in init_from and Path(init_from).exists():
            init_from = str(Path(init_from).absolute())
        self.metadata["lora"] = {**self.lora.to_dict(), "base": init_from}
        if self.resume_step is not None:
            abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32),
                                  params=abstract_trained, opt_state=abstract_opt,
                                  extra=abstract_extra)
            state, data_state, _ = self.checkpointer.restore(
                checkpoint.abstract_tree(abstract, self.state_shardings), self.resume_step)
            log.info("resumed %s (LoRA adapter) from %s at step %d", self.stage,
                     self.checkpointer.directory, self.resume_step)
            self.restored_data_state = data_state
            return self._full(state), data_state
        # Copies: the trained part is donated by the train step, and a score head may be shared
        # with a frozen tree (PPO's value head starts as the RM's).
        trained = jax.device_put(lora.partition(full, True), trained_sh, may_alias=False)
        opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(trained)
        state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), self.replicated),
                           params=trained, opt_state=opt_state,
                           extra=jax.device_put(extra, extra_sh))
        log.info("%s: LoRA rank %d on %s: %s trained parameters, the %s-parameter base frozen",
                 self.stage, self.lora.rank, ",".join(self.lora.targets),
                 f"{models.param_count(trained):,}", f"{models.param_count(base):,}")
        return self._full(state), None

    def _full(self, state):
        """A LoRA state with the frozen base joined in (the full params a method sees)."""
        if self.lora_base is None or state is None:
            return state
        return state.replace(params=lora.join(state.params, self.lora_base))

    def _trained(self, state):
        """A state with only its trained part (what the jitted step, optimizer and checkpoints
        hold); the identity without LoRA."""
        if self.lora_base is None:
            return state
        return state.replace(params=lora.partition(state.params, True))

    def _lora_step(self, step_fn: Callable) -> Callable:
        """`step(state, (frozen, base), batch, rng)` around a method's `step_fn`: the step sees the
        full params; what it returns is cut back to the trained part."""
        def step(state, frozen_and_base, batch, key):
            frozen, base = frozen_and_base
            new, metrics = step_fn(state.replace(params=lora.join(state.params, base)), frozen,
                                   batch, key)
            return new.replace(params=lora.partition(new.params, True)), metrics

        return step

    # -- jit -----------------------------------------------------------------------------------

    def jit_step(self, step_fn: Callable, frozen=None, state_shardings=None,
                 batch_shardings=None):
        """jit `step(state, frozen, batch, rng)` with explicit shardings; the old state is
        donated. `frozen`: the placed frozen tree the step will get (its shardings are read)."""
        state_sh = self.state_shardings if state_shardings is None else state_shardings
        if state_sh is None:
            raise ValueError("jit_step needs state shardings: call create_state first or pass "
                             "state_shardings")
        batch_sh = self.batch_sharding if batch_shardings is None else batch_shardings
        if self.lora_base is not None:  # called as step(state, (frozen, base), batch, rng)
            step_fn, frozen = self._lora_step(step_fn), (frozen, self.lora_base)
        step_fn = sharding.activation_sharding(step_fn, self.mesh, self.rules)
        return jax.jit(step_fn, in_shardings=(state_sh, self.shardings_of(frozen), batch_sh,
                                              self.replicated),
                       out_shardings=(state_sh, self.replicated), donate_argnums=0)

    def jit_update(self, update_fn: Callable) -> Callable:
        """jit `update_fn(params, opt_state, *args) -> (params, opt_state, metrics)` (an on-policy
        update that takes its own gradients) with the state's shardings, params and optimizer
        state donated.

        Under LoRA the jitted program takes the trained part (donated) and the frozen base (not
        donated: the reference shares its arrays) as separate arguments, the base behind
        `stop_gradient` so no weight gradient of it is computed, and returns only the trained
        part; the returned function keeps `update_fn`'s signature and full-params result.
        """
        out_sh = (self.state_shardings.params, self.state_shardings.opt_state, self.replicated)
        if self.lora_base is None:
            return jax.jit(update_fn, donate_argnums=(0, 1), out_shardings=out_sh)

        def inner(trained, rest, opt_state, *args):
            params = lora.join(trained, jax.lax.stop_gradient(rest))
            params, opt_state, metrics = update_fn(params, opt_state, *args)
            return lora.partition(params, True), opt_state, metrics

        jitted = jax.jit(inner, donate_argnums=(0, 2), out_shardings=out_sh)

        def call(params, opt_state, *args):
            trained, rest = lora.split(params)
            new, opt_state, metrics = jitted(trained, rest, opt_state, *args)
            return lora.join(new, rest), opt_state, metrics

        return call

    def jit_eval(self, eval_step: Callable, frozen=None, param_shardings=None):
        """jit `eval_step(params, frozen, batch, rng) -> metric sums` (see `make_eval_step`)."""
        param_sh = self.state_shardings.params if param_shardings is None else param_shardings
        if param_shardings is None and self.lora_base is not None:  # eval sees the full params
            param_sh = lora.join(param_sh, self.shardings_of(self.lora_base))
        eval_step = sharding.activation_sharding(eval_step, self.mesh, self.rules)
        return jax.jit(eval_step, in_shardings=(param_sh, self.shardings_of(frozen),
                                                self.batch_sharding, self.replicated),
                       out_shardings=self.replicated)


    def evaluate(self, eval_step: Callable, params, batches: Iterable,
                 num_batches: int | None = None, frozen=None) -> dict[str, float]:
        """Token-weighted means over `num_batches` (default config.train.eval_batches) batches.

        `eval_step` returns metric sums with `count` (see `make_eval_step`, then `jit_eval`); the
        sums are added over batches and divided by the total count once. Batch i uses the key
        `key(EVAL, i)`: every evaluation sees the same noise.
        """
        n = self.config.train.eval_batches if num_batches is None else num_batches
        totals = None
        for i, batch in enumerate(itertools.islice(batches, n)):
            sums = eval_step(params, frozen, self.to_global(batch), self.key(rng.Purpose.EVAL, i))
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        if totals is None:
            raise ValueError("evaluate: the eval iterator yielded no batches")
        totals = jax.device_get(totals)
        count = float(totals.pop("count"))
        return {k: float(v) / count for k, v in totals.items()}

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self, step: int, state, train_iter=None) -> None:
        data_state = train_iter.get_state() if hasattr(train_iter, "get_state") else {}
        self.provenance.commit()
        self.checkpointer.save(step, state, data_state, self.metadata)

    def write_summary(self, extra: Mapping | None = None) -> None:
        """Merge `extra` into the run summary and rewrite `workdir/summary.json`."""
        self.summary.update(dict(extra or {}))
        self.writer.write_summary(self.summary)

    # -- the loop ------------------------------------------------------------------------------

    def _check_finite(self, pending, keys):
        host = jax.device_get([m for _, m in pending])
        for (step, _), metrics in zip(pending, host):
            for name, value in metrics.items():
                if keys is not None and name not in keys:
                    continue
                arr = np.asarray(value)
                if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                    last = self.checkpointer.latest_step()
                    raise FloatingPointError(
                        f"{self.stage}: non-finite {name}={arr.tolist()} at step {step}; stopped "
                        f"without saving this state (last good checkpoint: "
                        f"{'none' if last is None else f'step {last}'} in "
                        f"{self.checkpointer.directory})")
        return [(step, m) for (step, _), m in zip(pending, host)]

    def fit(self, state, step_fn: Callable, train_iter: Iterator, num_steps: int | None = None,
            eval_fn: Callable[[Any], Mapping] | None = None,
            on_eval: Callable[[int, Mapping], None] | None = None, jit: bool = True,
            final_params: Callable[[Any], Any] | None = None,
            finite_metrics: tuple[str, ...] | None = ("loss", "grad_norm"),
            restore_iterator: bool = True, frozen=None, write_final: bool = True):
        """Run `step_fn(state, frozen, batch, rng)` from `state.step` to `num_steps` (default
        config.train.steps).

        Step s (1-based, = state.step after it) uses the key `key(TRAIN, s)` and the next batch
        of `train_iter` (host-local numpy, made global over the mesh); `frozen` (placed with
        `place`) is passed to every step. `jit=False` runs a Python step as is (e.g. PPO's
        composite of jitted pieces). Metrics of every `log_every`-th
        step go to metrics.jsonl / TensorBoard; `eval_fn(state) -> dict` runs every `eval_every`
        steps and at the end (logged as `eval/<name>`, then `on_eval(step, metrics)`);
        checkpoints every `ckpt_every` steps and at the end, with the iterator state and
        `self.metadata`. A non-finite metric in `finite_metrics` (None = all) raises
        FloatingPointError and saves nothing. SIGTERM checkpoints and exits with status 0. At the
        end `final_params(state)` (default `state.params`) is written to `workdir/final` and
        `summary.json` is written; with `write_final=False` the stage writes the hand-off itself
        (`final_metadata` / `save_final`), e.g. after computing what goes into its metadata.
        Returns the final state.
        """
        cfg = self.config.train
        num_steps = cfg.steps if num_steps is None else int(num_steps)
        step_impl = self.jit_step(step_fn, frozen) if jit else step_fn
        if self.lora_base is not None:
            # The loop carries the trained part only; the method's code sees the full params.
            state = self._trained(state)
            if not jit:
                step_impl = self._lora_step(step_fn)
            frozen = (frozen, self.lora_base)
            user_eval, user_final = eval_fn, final_params
            eval_fn = None if user_eval is None else (lambda st: user_eval(self._full(st)))
            final_params = lambda st: (self._full(st).params if user_final is None  # noqa: E731
                                       else user_final(self._full(st)))
        if restore_iterator and self.restored_data_state and hasattr(train_iter, "set_state"):
            train_iter.set_state(self.restored_data_state)
        start = int(jax.device_get(state.step))
        pending: list = []
        last_metrics: dict = {}
        eval_metrics: dict = {}
        eval_step_done = None
        t_last, steps_since = time.perf_counter(), 0

        def due(every, step):
            return every > 0 and step % every == 0

        def run_eval(step, write=True):
            nonlocal eval_metrics, eval_step_done
            eval_metrics = {}
            for k, v in dict(eval_fn(state)).items():
                if np.ndim(v) == 0 and np.asarray(v).dtype.kind in "biuf":  # scalars only
                    eval_metrics[k] = float(v)
            if write:
                self.writer.write(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
            eval_step_done = step
            if on_eval is not None:
                on_eval(step, eval_metrics)

        # Live on a terminal; in a log file at most one redraw every ~30 s.
        bar = progress_bar(num_steps, initial=start, desc=self.stage, disable=not self.is_main)
        try:
            # No jax.set_mesh here: shardings are explicit NamedShardings, and an ambient mesh
            # would make Flax turn logical `out_sharding` names into mesh axes inside eval_shape.
            with _Preemption() as preempt:
                for step in range(start + 1, num_steps + 1):
                    try:
                        batch = next(train_iter)
                    except StopIteration:
                        raise RuntimeError(f"{self.stage}: the training iterator ran out before "
                                           f"step {step} of {num_steps}") from None
                    key = self.key(rng.Purpose.TRAIN, step)
                    state, metrics = step_impl(state, frozen, self.to_global(batch), key)
                    pending.append((step, metrics))
                    steps_since += 1
                    bar.update(1)
                    stop = preempt.reached(step)
                    log_now = due(cfg.log_every, step) or step == num_steps
                    ckpt_now = due(cfg.ckpt_every, step) or step == num_steps or stop
                    eval_now = eval_fn is not None and (due(cfg.eval_every, step)
                                                        or step == num_steps)
                    if log_now or ckpt_now or eval_now:
                        checked = self._check_finite(pending, finite_metrics)
                        pending = []
                        last_metrics = dict(to_python(checked[-1][1]))
                        if log_now:
                            now = time.perf_counter()
                            last_metrics["steps_per_sec"] = steps_since / max(now - t_last, 1e-9)
                            t_last, steps_since = now, 0
                            self.writer.write(step, last_metrics)
                            if "loss" in last_metrics:
                                bar.set_postfix(loss=f"{last_metrics['loss']:.4g}",
                                                refresh=False)
                    if eval_now:
                        run_eval(step)
                    if ckpt_now:
                        self.save(step, state, train_iter)
                    if stop:
                        self.checkpointer.wait()
                        self.writer.flush()
                        log.warning("%s: preempted; checkpoint at step %d saved, exiting",
                                    self.stage, step)
                        bar.close()
                        self.close()
                        raise SystemExit(0)
                final_step = int(jax.device_get(state.step))
                self.final_step = final_step
                if eval_fn is not None and eval_step_done != final_step:
                    # A finished run resumed: evaluate again for the summary (every process
                    # takes part in the collective eval); its record is already in the log.
                    run_eval(final_step, write=start < num_steps)
                self.save(final_step, state, train_iter)
                self.checkpointer.wait()
                # (Re)write the hand-off unless it already holds this step (a resumed finished
                # run); a run extended to more steps replaces it.
                if write_final and checkpoint.final_step(self.workdir) != final_step:
                    params = state.params if final_params is None else final_params(state)
                    self.save_final(params)
        except Exception:
            self.checkpointer.wait()  # let the last good checkpoint finish writing
            raise
        finally:
            bar.close()
        if not last_metrics and self.is_main:  # resumed a finished run: keep its last numbers
            train_records = [r for r in read_metrics(self.workdir)
                             if not any(k.startswith("eval/") for k in r)]
            last_metrics = {k: v for k, v in (train_records or [{}])[-1].items() if k != "step"}
        self.summary.update({"stage": self.stage, "step": final_step,
                             "final": {k: v for k, v in last_metrics.items()},
                             "eval": eval_metrics})
        self.writer.write_summary(self.summary)
        self.writer.flush()
        return self._full(state)

    def final_metadata(self) -> dict | None:
        """The hand-off's metadata when `workdir/final` holds this run's last step, else None
        (not written yet, or an earlier, shorter run's)."""
        if self.final_step is None or checkpoint.final_step(self.workdir) != self.final_step:
            return None
        return checkpoint.load_stage_metadata(self.workdir, field="config.workdir")

    def save_final(self, params) -> None:
        """Write `params` and `self.metadata` to `workdir/final` at this run's last step.

        A LoRA stage writes only the trained part (adapter, score head); its metadata's
        `lora.base` names the base that `handoff` joins it to."""
        if self.lora_base is not None and lora.has_adapter(params):
            params = lora.partition(params, True)
        checkpoint.save_final(self.workdir, params, self.metadata, self.final_step)

    def close(self) -> None:
        self.checkpointer.close()
        self.writer.close()
