"""Cached runs: a config (and its inputs' keys) -> a work dir named by their hash, one
finished-check, one lock.

Every "train it once, reuse it after" in the project goes through here: the zoo's base models
(`rlhf_jax.zoo`), the pipeline's and figures' stages (`experiments.lib.run_stage`), sweep trials
(`rlhf_jax.sweep`) and the models of a weak-to-strong trial (`rlhf_jax.w2s`).

* `key(config, *upstream, ignore=...)`: sha256 over the config as `provenance.key_dict` gives it
  (no work dir, no field at its `provenance.KEY_NEUTRAL` value) minus the `ignore`d fields, and
  over the upstream keys. `PARAMS_ONLY` lists what cannot change trained parameters (the eval
  block and every logging / eval / checkpoint cadence: the evaluations draw their own keys,
  `rng.Purpose.EVAL` / `POLICY_EVAL`); a run whose product is its parameters (a base model)
  leaves them out, so renaming an eval field no longer invalidates the cache.
* `finished(workdir, key=None, files=())`: the run's marker (`MARKER`, status done, written by
  `mark_done`; one of another key is an error) or, for a stage work dir written without a marker,
  its finalized `final/` checkpoint; with `files`, those must exist as well.
* `lock(workdir)`: an exclusive lock on `<workdir>/.run.lock` (`wait=False`: yields False when
  another process holds it). Not for the processes of one multi-process run, which train
  together and must not wait on each other (`enabled=False`).
* `ensure(workdir, run, ...)`: under the lock, reuse a finished run or call `run()` and mark it.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rlhf_jax import checkpoint, provenance
from rlhf_jax.errors import UserError

# The marker of a finished run. (Its name is from when only sweep trials wrote one; kept so
# that finished trials stay finished.)
MARKER = "sweep_trial.json"
LOCK = ".run.lock"
DONE = "done"

# Fields that cannot change the parameters a run trains (dotted prefixes of the config).
PARAMS_ONLY: tuple[str, ...] = (
    "eval", "train.log_every", "train.eval_every", "train.eval_batches", "train.ckpt_every",
    "train.keep_checkpoints")


def _drop(d: dict, path: str) -> None:
    head, _, rest = path.partition(".")
    if head not in d:
        return
    if not rest:
        del d[head]
    elif isinstance(d[head], dict):
        _drop(d[head], rest)


def key_dict(config, ignore: Iterable[str] = ()) -> dict:
    """The config as keys hash it: `provenance.key_dict` minus the `ignore`d dotted fields."""
    d = provenance.key_dict(config)
    for path in ignore:
        _drop(d, path)
    return d


def digest(obj: Any, digits: int = 12) -> str:
    """`digits` hex digits of sha256 over `obj` as sorted-key JSON (non-JSON leaves as str)."""
    blob = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:digits]


def key(config, *upstream: str, ignore: Iterable[str] = (), digits: int = 12) -> str:
    """Hash of a run's config (see `key_dict`) and of its inputs' keys."""
    return digest([key_dict(config, ignore), list(upstream)], digits)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, obj: Any) -> None:
    """Write atomically (a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=repr))
    os.replace(tmp, path)


def finished(workdir: str | Path, key: str | None = None, files: Sequence[str] = ()
             ) -> dict | None:
    """The record of a finished run in `workdir`, else None (see the module docstring)."""
    workdir = Path(workdir)
    if not all((workdir / f).exists() for f in files):
        return None
    marker = read_json(workdir / MARKER)
    if marker is not None:
        if key is not None and marker.get("key") != key:
            raise UserError(str(workdir / MARKER),
                            f"belongs to a run with key {marker.get('key')!r}, not {key!r}",
                            "move that directory away or pick another work dir")
        return marker if marker.get("status") == DONE else None
    if checkpoint.stage_is_complete(workdir):
        return {"status": DONE, "key": key, "workdir": str(workdir)}
    return None


def mark_done(workdir: str | Path, key: str | None = None, **info) -> dict:
    """Record that the run in `workdir` finished (`info`: anything worth keeping with it)."""
    record = {**info, "key": key, "status": DONE,
              "finished": datetime.datetime.now().isoformat(timespec="seconds")}
    Path(workdir).mkdir(parents=True, exist_ok=True)
    write_json(Path(workdir) / MARKER, record)
    return record


@contextlib.contextmanager
def lock(workdir: str | Path, *, wait: bool = True, enabled: bool = True):
    """Hold an exclusive lock on `<workdir>/.run.lock`; yields whether it is held (always True
    with `wait`; `enabled=False` yields True without locking)."""
    if not enabled:
        yield True
        return
    import fcntl

    Path(workdir).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(workdir) / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def ensure(workdir: str | Path, run: Callable[[], Any], *, key: str | None = None,
           reuse: bool = True, files: Sequence[str] = (), locked: bool = True,
           mark: bool = True, legacy: Iterable[str | Path] = (),
           info: Mapping | None = None) -> tuple[Path, bool]:
    """`(work dir, reused)`: a finished run in `workdir` (or in one of the `legacy` dirs: where
    an older key put the same run), else `run()` there, then marked done (`mark`: on the process
    that writes files). `locked=False`: no lock (the processes of a multi-process run)."""
    workdir = Path(workdir)
    if reuse:
        for old in [workdir, *map(Path, legacy)]:
            if old.is_dir() and finished(old, None if old != workdir else key, files):
                return old, True
    with lock(workdir, enabled=locked):
        if reuse and finished(workdir, key, files):  # another process finished it meanwhile
            return workdir, True
        run()
        if mark:
            mark_done(workdir, key, **dict(info or {}))
    return workdir, False


__all__ = ["DONE", "LOCK", "MARKER", "PARAMS_ONLY", "digest", "ensure", "finished", "key",
           "key_dict", "lock", "mark_done", "read_json", "write_json"]
