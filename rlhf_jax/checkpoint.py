"""Orbax checkpoints: train state + data-iterator state + JSON metadata, and stage hand-off.

Layout of a stage's work dir:

    workdir/checkpoints/<step>/{state, data, meta}   rolling, async, keep-N (resume)
    workdir/final/<step>/{params, meta}              written once when the stage finishes

Orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames it when every item is
committed, so a crash mid-save leaves the previous step as the latest readable checkpoint.
Restores go through an abstract tree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`, so a
checkpoint written on one mesh / device count loads onto any other.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from rlhf_jax.errors import UserError

log = logging.getLogger(__name__)

STATE, DATA, META, PARAMS = "state", "data", "meta", "params"
CHECKPOINT_DIR, FINAL_DIR = "checkpoints", "final"


def jsonable(obj: Any) -> Any:
    """Metadata → JSON types: dataclasses (model configs), ConfigDicts, numpy, paths, tuples."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if hasattr(obj, "to_dict") and callable(obj.to_dict):  # ml_collections.ConfigDict
        return jsonable(obj.to_dict())
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (str, bool, int, float)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.generic, np.ndarray, jax.Array)):
        return np.asarray(obj).tolist()
    return str(obj)


# Replica-parallel saving splits each replicated shard among its replicas with one eager slice per
# shard: a compile per distinct shape, seconds on the first save of a process, for no gain on small
# shards. Only split shards whose per-replica slice is at least this big.
MIN_REPLICA_PARALLEL_SLICE_BYTES = 1 << 20
_array_handler_configured = False


def _configure_array_handler() -> None:
    global _array_handler_configured
    if _array_handler_configured:
        return
    _array_handler_configured = True
    try:
        from orbax.checkpoint._src.metadata import array_metadata_store
        from orbax.checkpoint import type_handlers

        absl_log = logging.getLogger("absl")
        level = absl_log.level
        absl_log.setLevel(logging.ERROR)  # the override itself logs a warning
        try:
            type_handlers.register_type_handler(jax.Array, type_handlers.ArrayHandler(
                array_metadata_store=array_metadata_store.Store(),
                min_slice_bytes_for_replica_parallel=MIN_REPLICA_PARALLEL_SLICE_BYTES),
                override=True)
        finally:
            absl_log.setLevel(level)
    except (ImportError, AttributeError, TypeError) as e:  # a speed knob only: keep defaults
        log.info("keeping Orbax's default jax.Array handler: %s", e)


def _registry(tree_items: tuple[str, ...], json_items: tuple[str, ...]):
    # Registering handlers up front lets a fresh manager read metadata before any restore call.
    reg = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for item in tree_items:
        reg.add(item, ocp.args.StandardSave, ocp.StandardCheckpointHandler)
        reg.add(item, ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
    for item in json_items:
        reg.add(item, ocp.args.JsonSave, ocp.JsonCheckpointHandler)
        reg.add(item, ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
    return reg


def abstract_tree(tree, shardings=None):
    """Arrays / ShapeDtypeStructs → ShapeDtypeStructs carrying `shardings` (a tree or one)."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=getattr(x, "sharding", None)),
                            tree)
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings),
                            tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def _host_target(tree_metadata):
    """Numpy placeholders: StandardRestore then returns numpy arrays (no device placement)."""
    return jax.tree.map(lambda m: np.empty(m.shape, m.dtype), tree_metadata)


def _remove_unfinished_saves(directory: Path) -> None:
    """Delete `<step>.orbax-checkpoint-tmp*` dirs that a crash left mid-save.

    They are never valid checkpoints (Orbax renames a save into place only once it is complete),
    so removing them loses nothing. Done here, synchronously and tolerant of a concurrent remover,
    instead of Orbax's `cleanup_tmp_directories`, whose background rmtree raced a second manager
    opened on the same directory (FileNotFoundError on restart after SIGKILL).
    """
    if jax.process_index() != 0 or not directory.is_dir():
        return
    for tmp in directory.glob("*.orbax-checkpoint-tmp*"):
        shutil.rmtree(tmp, ignore_errors=True)


_RESTORE_FIX = ("it was saved by a different model or optimizer config: resume with the config "
                "in the work dir's config.json, or start a new --config.workdir")


def _path_names(path) -> tuple[str, ...]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return tuple(out)


def _tree_mismatch(stored, abstract) -> str:
    """'' when `stored` (checkpoint metadata) and `abstract` have the same leaves and shapes,
    else a short description of the first differences (paths joined with '/')."""
    if stored is None:
        return ""
    try:
        have = {_path_names(p): tuple(getattr(x, "shape", ()) or ())
                for p, x in jax.tree_util.tree_flatten_with_path(stored)[0]}
        want = {_path_names(p): tuple(getattr(x, "shape", ()) or ())
                for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    except Exception:  # noqa: BLE001 - unknown metadata layout: leave it to the restore
        return ""
    problems = []
    for path in sorted(set(want) - set(have))[:2]:
        problems.append(f"{'/'.join(path)} is not in the checkpoint")
    for path in sorted(set(have) - set(want))[:2]:
        problems.append(f"the checkpoint has {'/'.join(path)}, this run does not")
    for path in sorted(set(have) & set(want)):
        if have[path] != want[path] and len(problems) < 3:
            problems.append(f"{'/'.join(path)} has shape {have[path]} in the checkpoint, "
                            f"{want[path]} here")
    extra = len(set(want) ^ set(have)) + sum(have[p] != want[p] for p in set(have) & set(want))
    if extra > len(problems):
        problems.append(f"{extra - len(problems)} more")
    return "; ".join(problems)


class Checkpointer:
    """Rolling checkpoints of (train state, iterator state, metadata) in `workdir/checkpoints`."""

    def __init__(self, workdir: str | Path, keep: int = 2, async_save: bool = True):
        _configure_array_handler()
        self.directory = Path(workdir).absolute() / CHECKPOINT_DIR
        _remove_unfinished_saves(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             handler_registry=_registry((STATE,), (DATA, META)))
        self._saved: set[int] = set()  # steps saved by this process (maybe still in flight)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_state: Mapping | None = None,
             metadata: Mapping | None = None) -> bool:
        """Start an asynchronous save (returns once the arrays are copied off the devices)."""
        step = int(step)
        if step in self._saved or step in self.manager.all_steps():
            return False  # e.g. the end-of-run save right after a cadence save of that step
        self._saved.add(step)
        meta = {"step": step, **jsonable(dict(metadata or {}))}
        args = ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state),
            DATA: ocp.args.JsonSave(jsonable(dict(data_state or {}))),
            META: ocp.args.JsonSave(meta),
        })
        return self.manager.save(step, args=args, force=True)

    def restore(self, abstract_state, step: int | None = None):
        """→ (state, data_state, metadata), the state placed per `abstract_state`'s shardings.

        A checkpoint whose tree or shapes differ from `abstract_state` (another model size or
        optimizer) raises a `UserError` naming the checkpoint and the first differences, before
        Orbax reads any array.
        """
        step = self.latest_step() if step is None else step
        where = f"{self.directory}/{step}"
        if step is None:
            raise UserError(str(self.directory), "holds no finished checkpoint")
        mismatch = _tree_mismatch(self._stored_tree(step), abstract_state)
        if mismatch:
            raise UserError(where, f"does not fit this run's train state ({mismatch})",
                            _RESTORE_FIX)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**{
                STATE: ocp.args.StandardRestore(abstract_state),
                DATA: ocp.args.JsonRestore(),
                META: ocp.args.JsonRestore(),
            }))
        except (ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise UserError(where, f"cannot be restored into this run's train state: {first}",
                            _RESTORE_FIX) from e
        return out[STATE], dict(out[DATA] or {}), dict(out[META] or {})

    def _stored_tree(self, step: int):
        """The saved state's tree of array metadata (shapes), or None if it cannot be read."""
        try:
            meta = self.manager.item_metadata(step)[STATE]
        except Exception as e:  # noqa: BLE001 - only a pre-check; the restore reports errors
            log.debug("no item metadata for %s/%s: %s", self.directory, step, e)
            return None
        return getattr(meta, "tree", meta)

    def _restore_json(self, item: str, step: int | None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise UserError(str(self.directory), "holds no finished checkpoint")
        out = self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
        return dict(out[item] or {})

    def restore_metadata(self, step: int | None = None) -> dict:
        return self._restore_json(META, step)

    def restore_data_state(self, step: int | None = None) -> dict:
        return self._restore_json(DATA, step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ------------------------------------------------------------------------------ stage hand-off


def _final_manager(directory: Path, read_only: bool) -> ocp.CheckpointManager:
    # Readers pass create=False rather than read_only=True (which logs warnings on every open).
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=not read_only,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory, options=options,
                                 handler_registry=_registry((PARAMS,), (META,)))


def _final_dir(path: str | Path) -> Path:
    path = Path(path).absolute()
    return path if path.name == FINAL_DIR else path / FINAL_DIR


def save_final(workdir: str | Path, params, metadata: Mapping, step: int, *,
               overwrite: bool = False) -> Path:
    """Write a finished stage's params + metadata to `workdir/final` (synchronously).

    `final/` keeps one step: a later step replaces an earlier one. If `final/<step>` already
    exists, this raises a `UserError` unless `overwrite=True`, which deletes `final/` first, so
    what is read back afterwards is always what was written now (never a stale save).
    """
    _configure_array_handler()
    directory = _final_dir(workdir)
    step = int(step)
    if final_step(directory) is not None and step in ocp.utils.checkpoint_steps(directory):
        if not overwrite:
            raise UserError(str(directory / str(step)), "already exists",
                            "pass overwrite=True (convert: --overwrite) to replace it")
        if jax.process_index() == 0:
            shutil.rmtree(directory)
    mgr = _final_manager(directory, read_only=False)
    try:
        mgr.save(step, force=True, args=ocp.args.Composite(**{
            PARAMS: ocp.args.StandardSave(params),
            META: ocp.args.JsonSave({"step": step, **jsonable(dict(metadata))}),
        }))
        mgr.wait_until_finished()
    finally:
        mgr.close()
    return directory


def final_step(path: str | Path) -> int | None:
    """Step of the finalized `final/` checkpoint in a stage work dir, or None.

    A plain directory listing (no CheckpointManager, hence no cross-process barrier), so processes
    may call it at different moments; a step counts only once Orbax has finalized it.
    """
    directory = _final_dir(path)
    if not directory.is_dir():
        return None
    steps = ocp.utils.checkpoint_steps(directory)
    return max(steps) if steps else None


def stage_is_complete(path: str | Path) -> bool:
    """True when `path` (a stage work dir) holds a finalized `final/` checkpoint."""
    return final_step(path) is not None


def load_stage_metadata(path: str | Path, field: str = "config.init_from") -> dict:
    """The metadata of a finished stage's `final/` checkpoint (no arrays are read)."""
    from rlhf_jax.errors import UserError

    if not stage_is_complete(path):
        ckpt = Path(path).absolute() / CHECKPOINT_DIR
        hint = ("it has rolling checkpoints: the stage was interrupted, rerun it to finish"
                if ckpt.is_dir() else "give the work dir of a finished stage")
        raise UserError(field, f"no finished stage output at {_final_dir(path)}", hint)
    mgr = _final_manager(_final_dir(path), read_only=True)
    try:
        step = mgr.latest_step()
        out = mgr.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
    finally:
        mgr.close()
    return dict(out[META])


def load_stage_params(path: str | Path,
                      shardings_fn: Callable | Any | None = None) -> tuple[dict, dict]:
    """Load a finished stage's final params and metadata from its work dir.

    `shardings_fn(abstract_params) -> tree of shardings` (or a tree of shardings) places the
    params on a mesh; None restores them to host numpy arrays (e.g. for dict surgery first).
    """
    directory = _final_dir(path)
    if not stage_is_complete(path):
        ckpt = Path(path).absolute() / CHECKPOINT_DIR
        if not Path(path).exists():
            raise UserError(str(path), "no such directory",
                            "give the work dir of a finished stage (or zoo:<preset> / hf:<dir>)")
        if ckpt.is_dir():
            raise UserError(str(path), f"the stage was interrupted: no {FINAL_DIR}/ yet, only "
                            f"rolling checkpoints in {ckpt}", "rerun that stage to finish it")
        raise UserError(str(path), f"no finished stage output ({directory} is missing)",
                        "give the work dir of a finished stage (or zoo:<preset> / hf:<dir>)")
    mgr = _final_manager(directory, read_only=True)
    try:
        step = mgr.latest_step()
        tree_meta = mgr.item_metadata(step)[PARAMS]
        tree_meta = getattr(tree_meta, "tree", tree_meta)  # TreeMetadata → plain nested dict
        if shardings_fn is None:
            target = _host_target(tree_meta)
        else:
            shapes = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree_meta)
            shardings = shardings_fn(shapes) if callable(shardings_fn) else shardings_fn
            target = abstract_tree(shapes, shardings)
        out = mgr.restore(step, args=ocp.args.Composite(**{
            PARAMS: ocp.args.StandardRestore(target), META: ocp.args.JsonRestore()}))
    finally:
        mgr.close()
    return out[PARAMS], dict(out[META])
