"""Device mesh, logical→mesh sharding rules, and host batch → global array.

This is the only module that names mesh axes (`data`, `fsdp`, `tensor`). Everything else speaks in
logical axis names (`batch`, `length`, `embed`, `vocab`, `heads`, `kv_heads`, `head_dim`, `mlp`,
`layers`); one rules table (overridable from the config) turns those into `PartitionSpec`s.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax.errors import UserError

log = logging.getLogger(__name__)

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)

# Logical name -> mesh axis (str), several mesh axes (tuple), or None (replicated).
# Batch goes over data×fsdp (FSDP is data parallelism whose params are also sharded); weights are
# sharded over fsdp on their embed dim and over tensor on heads/mlp/vocab (Megatron-style).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", (DATA, FSDP)),
    ("embed", FSDP),
    ("vocab", TENSOR),
    ("heads", TENSOR),
    ("kv_heads", TENSOR),
    ("mlp", TENSOR),
    ("length", None),
    ("head_dim", None),
    ("layers", None),
)

Rules = tuple[tuple[str, Any], ...]


# ----------------------------------------------------------------------------------------- mesh


def _mesh_field(mesh_cfg, name):
    if isinstance(mesh_cfg, Mapping):
        return mesh_cfg.get(name, 1)
    return getattr(mesh_cfg, name, 1)


def mesh_shape(mesh_cfg, n_devices: int) -> tuple[int, int, int]:
    """Resolve `{data, fsdp, tensor}` (one may be -1 = "the rest") against `n_devices`.

    Raises ValueError naming `config.mesh.<field>` and a shape that would fit.
    """
    keys = set(mesh_cfg.keys()) if hasattr(mesh_cfg, "keys") else set(MESH_AXES)
    unknown = sorted(keys - set(MESH_AXES))
    if unknown:
        raise UserError("config.mesh", f"unknown field(s) {unknown}",
                        f"allowed: {list(MESH_AXES)}")
    sizes = {}
    for name in MESH_AXES:
        value = _mesh_field(mesh_cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise UserError(f"config.mesh.{name}", f"{value!r} must be an int (a size, or -1 = "
                            "rest)")
        if value == 0 or value < -1:
            raise UserError(f"config.mesh.{name}", f"{value} must be positive or -1 (fill the "
                            "rest)")
        sizes[name] = int(value)
    fill = [n for n, v in sizes.items() if v == -1]
    if len(fill) > 1:
        raise UserError("config.mesh", f"only one axis may be -1, got {fill}",
                        "set all but one to a size")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if fill:
        if n_devices % fixed:
            others = " × ".join(f"{n}={v}" for n, v in sizes.items() if v != -1)
            raise UserError(
                f"config.mesh.{fill[0]}", f"-1 cannot fill {n_devices} devices: {others} = "
                f"{fixed} does not divide {n_devices}",
                f"pick sizes whose product divides {n_devices}")
        sizes[fill[0]] = n_devices // fixed
    elif fixed != n_devices:
        # Name the field to change: the largest one is the likeliest culprit.
        field = max(sizes, key=lambda n: sizes[n])
        rest = fixed // sizes[field]
        hint = (f"config.mesh.{field}={n_devices // rest} (or -1)" if n_devices % rest == 0
                else f"config.mesh.data=-1 with fsdp×tensor dividing {n_devices}")
        raise UserError(
            f"config.mesh.{field}", f"data={sizes[DATA]} × fsdp={sizes[FSDP]} × "
            f"tensor={sizes[TENSOR]} = {fixed} does not match the {n_devices} available devices",
            f"try {hint}")
    return sizes[DATA], sizes[FSDP], sizes[TENSOR]


def make_mesh(mesh_cfg=None, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """Build a `(data, fsdp, tensor)` mesh with Auto axis types (compiler-chosen intermediates)."""
    mesh_cfg = {"data": -1} if mesh_cfg is None else mesh_cfg
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


# ---------------------------------------------------------------------------------------- rules


def _check_mesh_axes(value, where: str):
    """Normalise a rule's right-hand side to None | str | tuple[str, ...]."""
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    value = tuple(value)
    for axis in value:
        if axis not in MESH_AXES:
            raise UserError(where, f"unknown mesh axis {axis!r}",
                            f"mesh axes are {list(MESH_AXES)}")
    if not value:
        return None
    return value[0] if len(value) == 1 else value


def rules_from_config(config=None) -> Rules:
    """DEFAULT_RULES with `config.sharding_rules` ([[logical, mesh-axes], ...]) applied on top.

    An override replaces the default for that logical name, or adds a new logical name.
    """
    rules = dict(DEFAULT_RULES)
    overrides = None
    if config is not None:
        overrides = (config.get("sharding_rules") if isinstance(config, Mapping) or
                     hasattr(config, "get") else getattr(config, "sharding_rules", None))
    for i, pair in enumerate(overrides or ()):
        where = f"config.sharding_rules[{i}]"
        if isinstance(pair, str) or len(pair) != 2 or not isinstance(pair[0], str):
            raise UserError(where, f"{pair!r} must be a [logical_name, mesh_axes] pair",
                            "e.g. ['embed', 'fsdp'] or ['batch', ['data', 'fsdp']] or "
                            "['mlp', None]")
        rules[pair[0]] = _check_mesh_axes(pair[1], where)
    return tuple(rules.items())


_warned: set = set()


def _warn_once(msg: str):
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg)


def logical_to_spec(axes: Sequence[str | None], rules: Rules | None = None,
                    shape: Sequence[int] | None = None,
                    mesh: jax.sharding.Mesh | None = None) -> PartitionSpec:
    """Logical axis names of one array → PartitionSpec.

    A mesh axis already used by an earlier dim is not reused (activations such as
    (batch, length, embed) would otherwise put fsdp on two dims). With `shape` and `mesh`, a dim
    that its mesh axes do not divide is replicated instead (logged once).
    """
    table = dict(DEFAULT_RULES if rules is None else rules)
    used: set[str] = set()
    spec = []
    for d, name in enumerate(axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise UserError("config.sharding_rules", f"logical axis {name!r} has no sharding "
                            f"rule (known: {sorted(table)})",
                            f"add one, e.g. (({name!r}, None),)")
        target = table[name]
        mesh_axes = () if target is None else ((target,) if isinstance(target, str) else target)
        mesh_axes = tuple(a for a in mesh_axes if a not in used)
        if mesh is not None:
            # Size-1 axes, and axes this mesh does not have (a `jax.set_mesh` mesh of the
            # caller's own, e.g. data only), are no-ops.
            mesh_axes = tuple(a for a in mesh_axes if mesh.shape.get(a, 1) > 1)
        if mesh_axes and shape is not None and mesh is not None:
            size = math.prod(mesh.shape[a] for a in mesh_axes)
            if shape[d] % size:
                _warn_once(f"dim {d} ({name}) of shape {tuple(shape)} is not divisible by mesh "
                           f"axes {mesh_axes} (size {size}); replicating that dim")
                mesh_axes = ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    while spec and spec[-1] is None:  # canonical form: P('fsdp') == P('fsdp', None)
        spec.pop()
    return PartitionSpec(*spec)


def is_axes_leaf(x) -> bool:
    """Leaves of an axes tree are tuples of names (tuples are pytree nodes to JAX otherwise)."""
    return isinstance(x, tuple) and not isinstance(x, PartitionSpec) and all(
        a is None or isinstance(a, str) for a in x)


def logical_to_shardings(axes_tree, mesh: jax.sharding.Mesh, rules: Rules | None = None,
                         shapes=None):
    """Tree of logical-axes tuples → tree of NamedSharding on `mesh`.

    `shapes` (same structure; arrays or ShapeDtypeStructs) enables the divisibility fallback; give
    it whenever the shapes are known.
    """
    if shapes is None:
        return jax.tree.map(lambda ax: NamedSharding(mesh, logical_to_spec(ax, rules)),
                            axes_tree, is_leaf=is_axes_leaf)

    def one(ax, x):
        if len(ax) != len(x.shape):
            raise ValueError(f"logical axes {ax} do not match the array shape {tuple(x.shape)}")
        return NamedSharding(mesh, logical_to_spec(ax, rules, x.shape, mesh))

    return jax.tree.map(one, axes_tree, shapes, is_leaf=is_axes_leaf)


# The mesh and rules that `constrain` uses when it is not given them: set while a step is traced
# (`activation_sharding`), so model code names logical axes only and a mesh shape changes no code.
_ACTIVATION_MESH: contextvars.ContextVar = contextvars.ContextVar("activation_mesh",
                                                                  default=None)


@contextlib.contextmanager
def activation_mesh(mesh: jax.sharding.Mesh | None, rules: Rules | None = None):
    """Within this block (while a jitted function is traced), `constrain` places activations on
    `mesh` by `rules`. `mesh=None` turns the constraints off."""
    token = _ACTIVATION_MESH.set(None if mesh is None else (mesh, rules))
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def activation_sharding(fn, mesh: jax.sharding.Mesh | None, rules: Rules | None = None):
    """`fn` traced under `activation_mesh(mesh, rules)`: wrap a step before `jax.jit`, so every
    trace of that jitted function (it is a new function object, so its jit cache is its own)
    constrains the model's activations on `mesh`."""
    if mesh is None:
        return fn

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with activation_mesh(mesh, rules):
            return fn(*args, **kwargs)

    return wrapped


def _current_mesh():
    ctx = _ACTIVATION_MESH.get()
    if ctx is not None:
        return ctx
    # A mesh set with `jax.set_mesh` (part of jit's cache key) also works, with the default rules.
    abstract = jax.sharding.get_abstract_mesh()
    if abstract is not None and not abstract.empty and set(abstract.axis_names) <= set(MESH_AXES):
        return abstract, None
    return None


def constrain(x, axes: Sequence[str | None], mesh: jax.sharding.Mesh | None = None,
              rules: Rules | None = None):
    """`with_sharding_constraint` from logical names (for activations inside a jitted step).

    Without `mesh`, the mesh of the enclosing `activation_mesh` (or `jax.set_mesh`) is used; with
    neither, `x` is returned unchanged (one device, or a caller that places nothing). Mesh axes
    of size 1 and dims they do not divide are left unconstrained.
    """
    if mesh is None:
        ctx = _current_mesh()
        if ctx is None:
            return x
        mesh, ctx_rules = ctx
        rules = ctx_rules if rules is None else rules
    if len(axes) != x.ndim:
        raise ValueError(f"logical axes {tuple(axes)} do not match an activation of shape "
                         f"{tuple(x.shape)}")
    if all(mesh.shape[a] == 1 for a in mesh.axis_names):
        return x
    spec = logical_to_spec(axes, rules, x.shape, mesh)
    sharding = (NamedSharding(mesh, spec) if isinstance(mesh, jax.sharding.Mesh) else spec)
    return jax.lax.with_sharding_constraint(x, sharding)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _variable_axes(v) -> tuple:
    meta = v.get_metadata() if hasattr(v, "get_metadata") else {}
    ndim = np.ndim(v.get_value()) if hasattr(v, "get_value") else len(v.shape)
    for key in ("out_sharding", "sharding_names", "sharding"):
        names = meta.get(key)
        if names is not None:
            names = tuple(names)
            if len(names) != ndim:
                raise ValueError(f"{key}={names} does not match a parameter of rank {ndim}")
            return names
    return (None,) * ndim  # no annotation: replicate


def axes_from_state(nnx_state) -> dict:
    """An `nnx.State` of Params → pure nested dict of logical-axes tuples (from `out_sharding`).

    Same structure as `nnx.to_pure_dict(nnx_state)`. Works on abstract states (`nnx.eval_shape`).
    """
    from flax import nnx

    return nnx.to_pure_dict(nnx_state, extract_fn=_variable_axes)


# ---------------------------------------------------------------------------------------- data


def batch_axes(rules: Rules | None = None) -> tuple[str, ...]:
    target = dict(DEFAULT_RULES if rules is None else rules).get("batch")
    return () if target is None else ((target,) if isinstance(target, str) else tuple(target))


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules | None = None) -> NamedSharding:
    """Leading (batch) dim over the mesh axes the rules give `batch` (data×fsdp by default)."""
    axes = batch_axes(rules)
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def host_to_global(host_batch, mesh: jax.sharding.Mesh, rules: Rules | None = None):
    """Host-local numpy batch (this process's rows) → global jax.Arrays sharded on batch.

    Each process passes its own slice of the global batch; the global batch is the concatenation
    over processes, so this works unchanged on one host or many.
    """
    sharding = batch_sharding(mesh, rules)
    n_shards = math.prod(mesh.shape[a] for a in batch_axes(rules))
    per_process = max(1, n_shards // jax.process_count())

    def one(path, x):
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError(f"batch field {jax.tree_util.keystr(path)} is a scalar; every batch "
                             "field needs a leading batch dim")
        if x.shape[0] % per_process:
            raise ValueError(
                f"batch field {jax.tree_util.keystr(path)} has {x.shape[0]} rows on this process, "
                f"not divisible by the {per_process} batch shards it holds (mesh batch axes "
                f"{batch_axes(rules)} = {n_shards} shards over {jax.process_count()} process(es))")
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map_with_path(one, host_batch)


def process_rows(host_batch, rules: Rules | None = None, mesh: jax.sharding.Mesh | None = None):
    """This process's slice of a GLOBAL host batch (every process holds the same arrays), ready
    for `host_to_global`: rows [i * B / P, (i + 1) * B / P) of process i of P."""
    del rules, mesh
    p, i = jax.process_count(), jax.process_index()
    if p == 1:
        return host_batch

    def one(x):
        x = np.asarray(x)
        if x.shape[0] % p:
            raise ValueError(f"a global batch of {x.shape[0]} rows cannot split over {p} processes")
        n = x.shape[0] // p
        return x[i * n:(i + 1) * n]

    return jax.tree.map(one, host_batch)


def split_rows(tree, batch_sharding: NamedSharding | None):
    """Constrain a tree of row-major arrays (e.g. a minibatch gathered by random indices inside a
    jit, which XLA would otherwise keep replicated) to be split over the mesh's batch axes, so
    each device computes its rows and the gradient is all-reduced. A tree whose row count the
    batch shards do not divide stays as it is (correct, not split), with a warning."""
    if batch_sharding is None or tree is None:
        return tree
    axes = batch_sharding.spec[0] if batch_sharding.spec else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    shards = int(np.prod([batch_sharding.mesh.shape[a] for a in axes]))
    rows = jax.tree.leaves(tree)[0].shape[0]
    if rows % shards:
        log.warning("a minibatch of %d rows cannot split over %d batch shards %s: every device "
                    "computes all of it (use a multiple of %d rows)", rows, shards, axes, shards)
        return tree
    return jax.lax.with_sharding_constraint(tree, batch_sharding)


def to_host(tree):
    """Arrays -> numpy on every process. A global array whose shards live on other processes is
    gathered explicitly (`process_allgather`, a collective: every process must call it); never
    `jax.device_get` of a global array, which fails on a multi-host mesh (DESIGN.md)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


# --------------------------------------------------------------------------------- distributed


def _env_int(name: str, default: int = 0) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def cluster_env_detected() -> str | None:
    """Name of a multi-process launcher whose env JAX can read by itself, or None."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if os.environ.get("SLURM_JOB_ID") and max(_env_int("SLURM_STEP_NUM_TASKS"),
                                              _env_int("SLURM_NTASKS")) > 1:
        return "SLURM"
    if _env_int("OMPI_COMM_WORLD_SIZE") > 1:
        return "Open MPI"
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "TPU pod"
    return None


def maybe_initialize_distributed(config=None) -> bool:
    """Start `jax.distributed` when the config or the environment asks for several processes.

    `config.distributed.coordinator_address` (with `num_processes`, `process_id`) initialises
    explicitly; otherwise a TPU pod / SLURM / MPI environment is auto-detected by JAX. Must run
    before anything touches the devices. Returns True when running multi-process.
    """
    if jax.distributed.is_initialized():
        return True
    dist = None
    if config is not None:
        dist = config.get("distributed") if hasattr(config, "get") else getattr(
            config, "distributed", None)
    address = dist.get("coordinator_address") if dist is not None else None
    if address:
        num = dist.get("num_processes")
        pid = dist.get("process_id")
        if num is None or pid is None or num < 1 or not 0 <= pid < num:
            raise UserError(
                "config.distributed", f"coordinator_address={address!r} needs num_processes >= "
                f"1 and 0 <= process_id < num_processes (got num_processes={num}, "
                f"process_id={pid})")
        # CPU processes exchange collectives through gloo (only used by the CPU backend).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(address, num_processes=int(num), process_id=int(pid))
        return True
    launcher = cluster_env_detected()
    if launcher:
        log.info("multi-process environment detected (%s); calling jax.distributed.initialize()",
                 launcher)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize()
        return True
    return False
