"""TPU pods: each trial is one multi-host job, the same command on every worker of the pod.

    gcloud compute tpus tpu-vm ssh <tpu> --zone=<zone> --worker=all \\
        --command="cd <remote dir> && python3 -m rlhf_jax.ppo --config=... --config.workdir=..."

Every worker starts the program; `rlhf_jax.sharding.maybe_initialize_distributed` sees the TPU
pod's environment and calls `jax.distributed.initialize()`, so the processes find each other
and the mesh spans the pod. Trials run one after another per pod; with several pods
(`--tpu=a,b`) each is one worker of the pool. The sweep dir must be a filesystem that every TPU
worker mounts at the same path (Orbax writes one checkpoint from all hosts) and that the
launching machine sees too (it keeps the logs and markers and reads the summaries): run the
launcher on worker 0 or on any machine with the same mount.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from rlhf_jax.errors import UserError
from rlhf_jax.sweep import local
from rlhf_jax.sweep.define import Trial


def pod_command(trial: Trial, tpu: str, zone: str, *, project: str | None = None,
                remote_dir: str = "rlhf_jax", python: str = "python3") -> list[str]:
    """The gcloud argv that runs `trial` on every worker of `tpu`."""
    remote = f"cd {shlex.quote(remote_dir)} && {shlex.join(trial.command(python))}"
    argv = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, f"--zone={zone}"]
    if project:
        argv.append(f"--project={project}")
    return argv + ["--worker=all", f"--command={remote}"]


def pod_slots(tpus: Sequence[str], zone: str | None, *, project: str | None = None,
              remote_dir: str = "rlhf_jax", python: str = "python3") -> list[local.Slot]:
    """One slot per pod; a slot launches its trial over gcloud ssh."""
    tpus = [t for t in tpus if t]
    if not tpus:
        raise UserError("--tpu", "the tpu-pod backend needs the TPU's name",
                        "e.g. --tpu=my-v4-32 --zone=us-central2-b")
    if not zone:
        raise UserError("--zone", "the tpu-pod backend needs the TPU's zone",
                        "e.g. --zone=us-central2-b")

    def launcher(tpu):
        return lambda trial: pod_command(trial, tpu, zone, project=project,
                                         remote_dir=remote_dir, python=python)

    return [local.Slot(f"tpu:{t}", launch=launcher(t), remote=True) for t in tpus]


def check_sweep_dir(sweep_dir: str | Path, *, here: bool = True) -> None:
    """The sweep dir must be absolute and (`here`) writable on the launching machine too."""
    if not Path(sweep_dir).is_absolute():
        raise UserError("--workdir", f"{sweep_dir!r} is relative; on a pod it would name a "
                        "different directory on each worker",
                        "give an absolute path on a filesystem every TPU worker mounts "
                        "(e.g. a Filestore or gcsfuse mount)")
    if here:
        try:
            Path(sweep_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError("--workdir", f"cannot create {sweep_dir} on this machine ({e})",
                            "launch from a machine that mounts the pod's shared filesystem at "
                            "the same path (e.g. TPU worker 0)") from e

