"""Run trials on this machine: a pool of workers, each pinned to its own cores or accelerators.

Each worker runs one trial at a time as a subprocess (`Trial.command()`), with stdout and stderr
appended to `<trial workdir>/sweep.log`. A worker's CPU cores are set with `sched_setaffinity` on
the worker thread right before it starts the child, which inherits the mask (Linux gives a new
process the affinity of the thread that forked it). XLA's CPU client sizes its thread pools from
the cores the process may run on (the JAX maintainers' advice for limiting its threads; we
measured 13 threads on 1 core against 17 on 2), and `OMP_NUM_THREADS` / `OPENBLAS_NUM_THREADS` /
`MKL_NUM_THREADS` cap numpy's BLAS. GPUs are split with `CUDA_VISIBLE_DEVICES`; TPU chips on one
VM with `TPU_VISIBLE_CHIPS` and the process-bounds variables of Cloud TPU's recipe for several
processes per VM.

A trial is finished when its program exits 0 *and* (re)wrote `<workdir>/summary.json` in that
attempt (a SIGTERM-preempted stage also exits 0, after saving a checkpoint, without a summary).
The runner then writes `<workdir>/sweep_trial.json`; a later call skips the trial. Anything else
is rerun next time in the same work dir, where the stage resumes from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import glob
import importlib.util
import io
import json
import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from rlhf_jax import runcache
from rlhf_jax.errors import UserError
from rlhf_jax.sweep.define import Trial

MARKER = runcache.MARKER
LOG = "sweep.log"
SUMMARY = "summary.json"

# Statuses in the results table.
DONE = runcache.DONE
SKIPPED, FAILED, INCOMPLETE, BUSY, UNFINISHED = (
    "skipped", "failed", "incomplete", "busy", "unfinished")
OK_STATUSES = (DONE, SKIPPED)


# --------------------------------------------------------------------------------- worker slots


@dataclasses.dataclass(frozen=True)
class Slot:
    """What one worker owns: CPU cores, environment variables, and how it launches a trial."""

    name: str
    cpus: tuple[int, ...] | None = None  # None: leave the affinity as it is
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # Builds the argv for a trial (default: `trial.command()`); the TPU-pod backend wraps it in
    # `gcloud ... ssh --worker=all`.
    launch: Callable[[Trial], list[str]] | None = None
    # True when the trial runs on other machines (a TPU pod) that write its summary to a shared
    # filesystem: finished = exit 0 and a summary.json (freshness cannot be judged across clocks).
    remote: bool = False

    def command(self, trial: Trial) -> list[str]:
        return self.launch(trial) if self.launch else trial.command()


def _split(items: Sequence, parts: int) -> list[tuple]:
    """`items` in `parts` contiguous chunks whose sizes differ by at most one."""
    q, r = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        n = q + (i < r)
        out.append(tuple(items[start:start + n]))
        start += n
    return out


def _thread_env(n: int) -> dict[str, str]:
    return {k: str(n) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def cpu_slots(workers: int, cpus: Sequence[int] | None = None) -> list[Slot]:
    """`workers` slots over this process's cores (`os.sched_getaffinity`), disjoint."""
    cpus = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
    if workers > len(cpus):
        raise UserError("--workers", f"{workers} workers but this process may use only "
                        f"{len(cpus)} CPU cores ({cpus})",
                        f"use --workers<={len(cpus)}, or --no-pin to share cores")
    return [Slot(f"cpu{c[0]}" + (f"-{c[-1]}" if len(c) > 1 else ""), c, _thread_env(len(c)))
            for c in _split(cpus, workers)]


def detect_accelerators() -> tuple[str, list[str]]:
    """`("gpu", ids)`, `("tpu", chip ids)` or `("cpu", [])`, without starting JAX (which would
    claim the devices in this process)."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms and set(platforms.replace(" ", "").split(",")) <= {"cpu"}:
        return "cpu", []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() not in ("", "-1"):
        return "gpu", [v.strip() for v in visible.split(",") if v.strip()]
    if visible is None and shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
            n = sum(line.startswith("GPU ") for line in out.stdout.splitlines())
            if n:
                return "gpu", [str(i) for i in range(n)]
        except (OSError, subprocess.SubprocessError):
            pass
    # TPU chips: /dev/accel* (v2-v4) or /dev/vfio/<n> (v5e, v5p, v6e; VFIO also serves other
    # devices, so only with the TPU runtime installed).
    chips = sorted(glob.glob("/dev/accel*"))
    if not chips and importlib.util.find_spec("libtpu") is not None:
        chips = sorted(p for p in glob.glob("/dev/vfio/*") if os.path.basename(p).isdigit())
    if chips:
        return "tpu", [str(i) for i in range(len(chips))]
    return "cpu", []


# Chips per process → TPU_CHIPS_PER_PROCESS_BOUNDS (Cloud TPU's layout for 1, 2, 4 chips).
_TPU_BOUNDS = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1"}


def accelerator_slots(kind: str, ids: Sequence[str], per_trial: int,
                      workers: int | None) -> list[Slot]:
    """One slot per `per_trial` accelerators: GPUs by `CUDA_VISIBLE_DEVICES`, TPU chips by the
    TPU runtime's per-process variables (each slot its own chips and port)."""
    if per_trial < 1:
        raise UserError("--per-trial", f"{per_trial} must be >= 1", "e.g. --per-trial=1")
    most = len(ids) // per_trial
    workers = most if workers is None else workers
    if workers < 1 or workers > most:
        raise UserError("--workers", f"{workers} workers × {per_trial} {kind}(s) per trial do not "
                        f"fit the {len(ids)} {kind}(s) here ({', '.join(ids)})",
                        f"use --workers<={max(most, 1)} or a smaller --per-trial")
    if kind == "tpu" and per_trial not in _TPU_BOUNDS:
        raise UserError("--per-trial", f"{per_trial} TPU chips per process is not supported "
                        f"here (supported: {sorted(_TPU_BOUNDS)})",
                        "use 1, 2 or 4, or run one trial on the whole VM (--workers=1 with "
                        "--devices=cpu leaves the chips to the program)")
    cpus = sorted(os.sched_getaffinity(0))
    cpu_parts = _split(cpus, workers) if len(cpus) >= workers else [None] * workers
    slots = []
    for w in range(workers):
        mine = list(ids[w * per_trial:(w + 1) * per_trial])
        if kind == "gpu":
            env = {"CUDA_VISIBLE_DEVICES": ",".join(mine)}
        else:
            port = str(8476 + w)
            env = {"TPU_VISIBLE_CHIPS": ",".join(mine), "TPU_VISIBLE_DEVICES": ",".join(mine),
                   "TPU_CHIPS_PER_PROCESS_BOUNDS": _TPU_BOUNDS[per_trial],
                   "TPU_PROCESS_BOUNDS": "1,1,1", "TPU_PROCESS_PORT": port,
                   "TPU_MESH_CONTROLLER_ADDRESS": f"localhost:{port}",
                   "TPU_MESH_CONTROLLER_PORT": port}
        part = cpu_parts[w]
        if part:
            env.update(_thread_env(len(part)))
        slots.append(Slot(f"{kind}{','.join(mine)}", part, env))
    return slots


def local_slots(workers: int | None, devices: str = "auto", per_trial: int | None = None,
                pin: bool = True) -> list[Slot]:
    """Slots for `--devices=auto|cpu|gpu|tpu` (auto: GPUs, else TPU chips, else CPU cores)."""
    if devices not in ("auto", "cpu", "gpu", "tpu"):
        raise UserError("--devices", f"{devices!r} is not one of auto, cpu, gpu, tpu",
                        "e.g. --devices=cpu")
    kind, ids = ("cpu", []) if devices == "cpu" else detect_accelerators()
    if devices in ("gpu", "tpu") and kind != devices:
        raise UserError("--devices", f"no {devices.upper()} found on this machine",
                        "use --devices=auto or cpu")
    if kind == "cpu":
        workers = 1 if workers is None else workers
        if workers < 1:
            raise UserError("--workers", f"{workers} must be >= 1", "e.g. --workers=2")
        if per_trial is not None:
            raise UserError("--per-trial", "counts GPUs or TPU chips; on CPU the cores are "
                            "split evenly over the workers", "drop --per-trial, set --workers")
        if not pin:
            return [Slot(f"w{i}") for i in range(workers)]
        return cpu_slots(workers)
    return accelerator_slots(kind, ids, 1 if per_trial is None else per_trial, workers)


# ------------------------------------------------------------------------------ one trial


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def finished(trial: Trial) -> dict | None:
    """The trial's record if a previous call finished it (same key), else None
    (`runcache.finished`: its marker, or a finished stage's final checkpoint and summary)."""
    return runcache.finished(trial.workdir, trial.key, files=(SUMMARY,))


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def _appears(path: Path, timeout_s: float = 60.0) -> bool:
    """Wait for a file written on another host to show through a shared filesystem's caches."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(2.0)
    return True


def _flatten(tree: Any, prefix: str, out: dict) -> dict:
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif tree is None or isinstance(tree, (bool, int, float, str)):
        out[prefix] = tree
    return out


def result_row(trial: Trial, status: str, seconds: float | None = None,
               returncode: int | None = None, log: str | None = None) -> dict:
    """One row of the results table; `summary.*` are the scalars of the trial's summary.json."""
    row = {"trial": trial.name, "key": trial.key, "status": status,
           "seconds": None if seconds is None else round(seconds, 1), "returncode": returncode,
           "workdir": trial.workdir, "log": log or str(Path(trial.workdir) / LOG),
           "overrides": dict(trial.overrides)}
    row.update({f"config.{k}": v for k, v in trial.overrides.items()})
    if status in OK_STATUSES:
        summary = read_json(Path(trial.workdir) / SUMMARY)
        if summary is not None:
            row.update(_flatten(summary, "summary", {}))
    return row


class _Running:
    """Children in flight, so an interrupt can stop them gracefully (SIGTERM: save, exit 0)."""

    def __init__(self):
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self.stopping = False

    def add(self, proc):
        with self._lock:
            self._procs.add(proc)

    def discard(self, proc):
        with self._lock:
            self._procs.discard(proc)

    def terminate(self, grace_s: float = 60.0):
        self.stopping = True
        with self._lock:
            procs = list(self._procs)
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)


def run_trial(trial: Trial, slot: Slot | None = None, *, running: _Running | None = None,
              log_name: str = LOG, mark: bool = True) -> dict:
    """Run one trial to its end (or skip it if finished); returns its results row.

    `mark=False` (the non-zero ranks of a multi-task SLURM job) neither locks nor writes the
    marker; rank 0 does.
    """
    slot = slot or Slot("local")
    workdir = Path(trial.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / log_name
    marker = finished(trial)
    if marker is not None:
        return result_row(trial, SKIPPED, marker.get("seconds"), marker.get("returncode"), str(log))
    # The trial's lock (False when another runner holds it).
    with runcache.lock(workdir, wait=False, enabled=mark) as locked:
        if not locked:
            return result_row(trial, BUSY, log=str(log))
        command = slot.command(trial)
        env = dict(os.environ)
        # The log is a file: a stage's progress bar redraws once a minute, not every step.
        env.setdefault("TQDM_MININTERVAL", "60")
        env.update(slot.env)
        summary_before = _mtime(workdir / SUMMARY)
        if slot.cpus is not None:
            # This thread's mask only; the child inherits it.
            os.sched_setaffinity(0, slot.cpus)
        t0 = time.monotonic()
        with open(log, "a") as f:
            f.write(f"\n=== {datetime.datetime.now().isoformat(timespec='seconds')} "
                    f"[{slot.name}] {shlex.join(command)}\n")
            if slot.env:
                f.write(f"=== env: {' '.join(f'{k}={v}' for k, v in sorted(slot.env.items()))}\n")
            f.flush()
            # Own session: a terminal's Ctrl-C reaches only the runner, which sends SIGTERM.
            proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
            if running is not None:
                running.add(proc)
            try:
                rc = proc.wait()
            finally:
                if running is not None:
                    running.discard(proc)
            seconds = time.monotonic() - t0
            if slot.remote:  # written on another machine: wait for it to show up here
                fresh = rc == 0 and _appears(workdir / SUMMARY)
            else:
                fresh = _mtime(workdir / SUMMARY) not in (None, summary_before)
            status = FAILED if rc != 0 else (DONE if fresh else INCOMPLETE)
            note = {DONE: "finished", INCOMPLETE: "exited 0 without writing summary.json "
                    "(preempted?); rerun to resume"}.get(status, _exit_text(rc))
            f.write(f"=== {status}: {note} after {seconds:.1f} s\n")
        if status == DONE and mark:
            runcache.mark_done(workdir, trial.key, name=trial.name, overrides=trial.overrides,
                               command=command, returncode=rc, seconds=round(seconds, 1))
    return result_row(trial, status, seconds, rc, str(log))


def _exit_text(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit status {rc}"


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=repr))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ the table


FIXED_COLUMNS = ("trial", "key", "status", "seconds", "returncode", "overrides", "workdir", "log")


def _cell(v: Any) -> Any:
    return json.dumps(v, default=repr) if isinstance(v, (dict, list, tuple)) else v


def write_table(rows: Sequence[Mapping], sweep_dir: str | Path) -> tuple[Path, Path]:
    """`results.csv` and `results.jsonl` in `sweep_dir` (rows in sweep order)."""
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    config_cols, summary_cols = [], set()
    for row in rows:
        for k in row:
            if k.startswith("config.") and k not in config_cols:
                config_cols.append(k)
            elif k.startswith("summary."):
                summary_cols.add(k)
    columns = list(FIXED_COLUMNS) + config_cols + sorted(summary_cols)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in columns})
    csv_path, jsonl_path = sweep_dir / "results.csv", sweep_dir / "results.jsonl"
    for path, text in ((csv_path, buf.getvalue()),
                       (jsonl_path, "".join(json.dumps(r, default=repr) + "\n" for r in rows))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return csv_path, jsonl_path


def collect(trials: Iterable[Trial]) -> list[dict]:
    """Rows for the trials as they stand on disk: finished (`done`) or `unfinished`."""
    rows = []
    for t in trials:
        marker = finished(t)
        rows.append(result_row(t, DONE, marker.get("seconds"), marker.get("returncode"))
                    if marker else result_row(t, UNFINISHED))
    return rows


# ------------------------------------------------------------------------------ the pool


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    # Off a terminal (logs, CI) tqdm prints a line per redraw: redraw at most every 5 minutes.
    return tqdm(total=total, initial=initial, unit="trial", desc="sweep", disable=not enabled,
                mininterval=0.5 if tty else 300, maxinterval=10 if tty else 600, dynamic_ncols=tty)


def _say(bar, text: str) -> None:
    bar.write(text, file=sys.stderr) if not bar.disable else print(text, file=sys.stderr)


def describe(row: Mapping) -> str:
    s = row["status"]
    if s in (DONE, SKIPPED):
        return f"[sweep] {s:<10} {row['trial']} ({row['seconds']} s)"
    if s == FAILED:
        return (f"[sweep] FAILED     {row['trial']}: {_exit_text(row['returncode'])}; "
                f"log: {row['log']}")
    if s == INCOMPLETE:
        return (f"[sweep] incomplete {row['trial']}: exited 0 without a new summary.json "
                f"(preempted?); rerun to resume; log: {row['log']}")
    if s == BUSY:
        return f"[sweep] busy       {row['trial']}: another runner holds {row['workdir']}"
    return f"[sweep] {s:<10} {row['trial']}"


def run_pool(trials: Sequence[Trial], slots: Sequence[Slot], sweep_dir: str | Path, *,
             progress: bool = True) -> list[dict]:
    """Run `trials` over `slots` (one trial per slot at a time); skip finished ones.

    Returns one row per trial (sweep order) and keeps `results.csv` / `results.jsonl` current
    after each trial. Ctrl-C sends SIGTERM to the running trials (stages save a checkpoint and
    exit) and re-raises KeyboardInterrupt.
    """
    rows: dict[int, dict] = {}
    todo = []
    for t in trials:
        marker = finished(t)
        if marker is not None:
            rows[t.index] = result_row(t, SKIPPED, marker.get("seconds"), marker.get("returncode"))
        else:
            todo.append(t)
    order = {t.index: i for i, t in enumerate(trials)}

    def table():
        return [rows[i] for i in sorted(rows, key=order.get)]

    bar = _progress(len(trials), len(trials) - len(todo), progress)
    if len(todo) < len(trials):
        _say(bar, f"[sweep] {len(trials) - len(todo)} of {len(trials)} trials finished earlier: "
                  "skipped")
    free: queue.Queue[Slot] = queue.Queue()
    for s in slots[:max(1, len(todo))]:
        free.put(s)
    running = _Running()

    def work(trial: Trial) -> dict:
        if running.stopping:
            return result_row(trial, UNFINISHED)
        slot = free.get()
        try:
            return run_trial(trial, slot, running=running)
        finally:
            free.put(slot)

    pool = ThreadPoolExecutor(max_workers=free.qsize(), thread_name_prefix="sweep")
    futures = {pool.submit(work, t): t for t in todo}
    try:
        for fut in as_completed(futures):
            row = fut.result()
            rows[futures[fut].index] = row
            bar.update(1)
            _say(bar, describe(row))
            write_table(table(), sweep_dir)
    except KeyboardInterrupt:
        _say(bar, "[sweep] interrupted: sending SIGTERM to running trials (they checkpoint and "
                  "exit); rerun the same command to continue")
        running.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        for fut, t in futures.items():
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                rows[t.index] = fut.result()
        for t in todo:
            rows.setdefault(t.index, result_row(t, UNFINISHED))
        write_table(table(), sweep_dir)
        raise
    finally:
        pool.shutdown(wait=True)
        bar.close()
    for t in todo:  # only trials cancelled by an interrupt lack a row
        rows.setdefault(t.index, result_row(t, UNFINISHED))
    write_table(table(), sweep_dir)
    return table()
