"""SLURM: one job array per sweep, through submitit (`pip install 'rlhf_jax[slurm]'`).

Array task i unpickles `run_trial_job(trial_i)` and runs the same subprocess the local runner
would, in the trial's work dir, with the same log, skip rule and marker. A trial that spans
several tasks (`--nodes`, `--tasks-per-node`) runs its program once per task; `jax.distributed`
finds its peers from SLURM's environment (`rlhf_jax.sharding.maybe_initialize_distributed`), and
task 0 writes the marker. submitit's own logs and pickles go to `<sweep dir>/slurm/`.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rlhf_jax.errors import UserError
from rlhf_jax.sweep import local
from rlhf_jax.sweep.define import Trial


def _submitit():
    try:
        import submitit
    except ImportError as e:
        raise UserError("--backend=slurm", "needs the submitit package",
                        "pip install 'rlhf_jax[slurm]' (or pip install submitit)") from e
    return submitit


def parameters(*, job_name: str, workers: int | None, time_min: int, partition: str | None = None,
               account: str | None = None, qos: str | None = None, nodes: int = 1,
               tasks_per_node: int = 1, cpus_per_task: int | None = None,
               gpus_per_node: int | None = None, mem_gb: float | None = None,
               setup: Sequence[str] = (), extra: Mapping[str, Any] | None = None) -> dict:
    """sbatch parameters in submitit's SlurmExecutor names (also what the dry run prints)."""
    p: dict[str, Any] = {"job_name": job_name, "time": int(time_min), "nodes": int(nodes),
                         "ntasks_per_node": int(tasks_per_node)}
    if workers:
        p["array_parallelism"] = int(workers)  # at most this many trials run at once
    for k, v in (("partition", partition), ("account", account), ("qos", qos),
                 ("cpus_per_task", cpus_per_task), ("gpus_per_node", gpus_per_node)):
        if v is not None:
            p[k] = v
    if mem_gb is not None:
        p["mem"] = f"{int(mem_gb)}GB" if float(mem_gb).is_integer() else f"{int(mem_gb * 1024)}MB"
    if setup:
        p["setup"] = list(setup)
    p.update(dict(extra or {}))
    return p


def folder(sweep_dir: str | Path) -> Path:
    return (Path(sweep_dir) / "slurm" / "%j").expanduser().absolute()


def sbatch_script(n_trials: int, sweep_dir: str | Path, params: Mapping[str, Any]) -> str:
    """The sbatch script submitit writes for an array of `n_trials` (what --dry-run prints)."""
    _submitit()
    from submitit.slurm import slurm as submitit_slurm

    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit",
                        shlex.quote(str(folder(sweep_dir)))])
    try:
        return submitit_slurm._make_sbatch_string(command=command, folder=folder(sweep_dir),
                                                 map_count=n_trials, **params)
    except (TypeError, ValueError) as e:
        raise UserError("--slurm-param", str(e).splitlines()[0], "see submitit's SlurmExecutor "
                        "parameters (sbatch option names with '_' for '-')") from e


def run_trial_job(trial: Trial) -> dict | None:
    """Body of one array task (runs on the cluster). Returns the row from task 0."""
    import submitit

    env = submitit.JobEnvironment()
    rank = env.global_rank
    log = local.LOG if rank == 0 else f"sweep.rank{rank}.log"
    row = local.run_trial(trial, local.Slot(f"slurm:{env.job_id}:{rank}"), log_name=log,
                          mark=(rank == 0))
    return row if rank == 0 else None


def submit(trials: Sequence[Trial], sweep_dir: str | Path, params: Mapping[str, Any], *,
           executor=None):
    """Submit the unfinished trials as one job array; returns `(jobs, their trials, skipped rows)`.

    `executor` defaults to a `submitit.SlurmExecutor` with `params`; tests pass a
    `submitit.LocalExecutor`.
    """
    submitit = _submitit()
    skipped, todo = [], []
    for t in trials:
        marker = local.finished(t)
        if marker is not None:
            skipped.append(local.result_row(t, local.SKIPPED, marker.get("seconds"),
                                            marker.get("returncode")))
        else:
            todo.append(t)
    if not todo:
        return [], [], skipped
    if executor is None:
        try:
            executor = submitit.SlurmExecutor(folder=folder(sweep_dir))
        except RuntimeError as e:  # no srun on this machine
            raise UserError("--backend=slurm", str(e),
                            "run on a SLURM login node, or use --dry-run to see the script") from e
        try:
            executor.update_parameters(**params)
        except ValueError as e:
            raise UserError("--slurm-param", str(e).splitlines()[0],
                            "use sbatch option names with '_' for '-'") from e
    for t in todo:
        Path(t.workdir).mkdir(parents=True, exist_ok=True)
    jobs = executor.map_array(run_trial_job, todo)
    return jobs, todo, skipped


def wait(jobs, todo: Sequence[Trial], *, max_poll_s: float = 30.0,
         progress: bool = True) -> list[dict]:
    """Block until every job ends; one row per job (a crashed wrapper counts as failed).

    Polls every 0.5 s at first, backing off to `max_poll_s` (each poll may query sacct).
    """
    rows: dict[int, dict] = {}
    bar = local._progress(len(jobs), 0, progress)
    pending = dict(enumerate(jobs))
    poll_s = 0.5
    try:
        while pending:
            for i, job in list(pending.items()):
                if not job.done():
                    continue
                del pending[i]
                try:
                    row = next(r for r in job.results() if r is not None)  # task 0's
                except Exception as e:  # noqa: BLE001  (the job's wrapper failed on the cluster)
                    row = local.result_row(todo[i], local.FAILED,
                                           log=str(job.paths.stderr))
                    row["error"] = " ".join(str(e).split())[-500:]
                rows[i] = row
                bar.update(1)
                local._say(bar, local.describe(row))
            if pending:
                time.sleep(poll_s)
                poll_s = min(max_poll_s, poll_s * 1.5)
    finally:
        bar.close()
    return [rows[i] for i in range(len(jobs))]
