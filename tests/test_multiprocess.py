"""Two jax.distributed processes (4 CPU devices each, gloo) train like one process on 8 devices,
and a SIGTERM to one of them makes both checkpoint the same step and exit 0."""

import copy
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from rlhf_jax import checkpoint, metrics
from tests import _toy

STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, workdir, preset, *extra, env_of=lambda i: {}):
    """Two toy-stage processes on one jax.distributed job; returns (processes, log files)."""
    port = _free_port()
    logs = [open(tmp_path / f"process{i}.log", "w+") for i in range(2)]
    procs = [subprocess.Popen(
        [sys.executable, "tests/_toy.py", f"--config=tests/_toy.py:{preset}",
         f"--config.workdir={workdir}", f"--config.distributed.coordinator_address=127.0.0.1:{port}",
         "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
         "--config.mesh.data=4", "--config.mesh.fsdp=2", *extra],
        env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
                 JAX_PLATFORMS="cpu", **env_of(i)),
        stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]
    return procs, logs


def _wait_ok(procs, logs, timeout=300):
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, log) in enumerate(zip(procs, logs)):
        log.seek(0)
        text = log.read()
        log.close()
        assert p.returncode == 0, f"process {i}:\n{text[-3000:]}"


def test_two_processes_match_one_process_on_eight_devices(tmp_path):
    multi = tmp_path / "multi"
    procs, logs = _launch(tmp_path, multi, f"steps={STEPS}")
    try:
        # Meanwhile, the same run in this process on 8 local devices.
        single = tmp_path / "single"
        c = copy.deepcopy(_toy.get_config(f"steps={STEPS}"))
        with c.unlocked():
            c.workdir = str(single)
            c.mesh.update(dict(data=4, fsdp=2))
        _toy.run(c)
    finally:
        _wait_ok(procs, logs)

    got, want = metrics.read_metrics(multi), metrics.read_metrics(single)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4, 4]
    for g, w in zip(got, want):
        for key in ("loss", "accuracy", "count", "grad_norm", "eval/loss"):
            if key in w:
                np.testing.assert_allclose(g[key], w[key], rtol=1e-5, atol=1e-6,
                                           err_msg=f"{key} at step {w['step']}")
    # The two processes wrote one shared hand-off with the same final params.
    assert checkpoint.stage_is_complete(multi)
    a, _ = checkpoint.load_stage_params(multi)
    b, _ = checkpoint.load_stage_params(single)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_sigterm_to_one_process_checkpoints_both_and_resumes_on_another_topology(tmp_path):
    """A scheduler preempting one host: JAX's preemption service tells every process, they agree
    on a step, both checkpoint it and exit 0; the run then finishes as one 8-device process and
    its history equals an uninterrupted run's."""
    steps = 60  # long enough that the agreed step (a few steps after the signal) comes first
    multi = tmp_path / "multi"
    procs, logs = _launch(tmp_path, multi, f"steps={steps},ckpt_every=1000",
                          "--config.train.eval_every=0",
                          env_of=lambda i: {"TOY_SIGTERM_BEFORE_STEP": "3" if i == 1 else "0"})
    _wait_ok(procs, logs)
    ckpt = checkpoint.Checkpointer(multi)
    saved = ckpt.all_steps()
    ckpt.close()
    assert len(saved) == 1 and 3 <= saved[0] < steps, saved  # one checkpoint, the agreed step
    assert not checkpoint.stage_is_complete(multi)
    assert max(r["step"] for r in metrics.read_metrics(multi)) == saved[0]

    def config(workdir):
        c = copy.deepcopy(_toy.get_config(f"steps={steps},ckpt_every=1000"))
        with c.unlocked():
            c.workdir = str(workdir)
            c.train.eval_every = 0
            c.mesh.update(dict(data=8, fsdp=1))
        return c

    _toy.run(config(multi))  # resume here: 1 process, 8 devices, another mesh
    _toy.run(config(tmp_path / "reference"))
    got, want = metrics.read_metrics(multi), metrics.read_metrics(tmp_path / "reference")
    # Every training step once (none lost, none repeated), then the final eval.
    assert [r["step"] for r in got] == [r["step"] for r in want] == [*range(1, steps + 1), steps]
    for g, w in zip(got, want):
        for key in ("loss", "accuracy", "grad_norm", "eval/loss"):
            if key in w:
                np.testing.assert_allclose(g[key], w[key], rtol=1e-5, atol=1e-6,
                                           err_msg=f"{key} at step {w['step']}")
    assert checkpoint.stage_is_complete(multi)
