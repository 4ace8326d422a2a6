"""Two jax.distributed processes (4 CPU devices each, gloo) train like one process on 8 devices."""

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


def test_two_processes_match_one_process_on_eight_devices(tmp_path):
    port = _free_port()
    multi = tmp_path / "multi"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    logs = [open(tmp_path / f"process{i}.log", "w+") for i in range(2)]
    procs = [subprocess.Popen(
        [sys.executable, "tests/_toy.py", f"--config=tests/_toy.py:steps={STEPS}",
         f"--config.workdir={multi}", f"--config.distributed.coordinator_address=127.0.0.1:{port}",
         "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
         "--config.mesh.data=4", "--config.mesh.fsdp=2"],
        env=env, stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]
    try:
        # Meanwhile, the same run in this process on 8 local devices.
        single = tmp_path / "single"
        c = copy.deepcopy(_toy.get_config(f"steps={STEPS}"))
        with c.unlocked():
            c.workdir = str(single)
            c.mesh.update(dict(data=4, fsdp=2))
        _toy.run(c)
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, log) in enumerate(zip(procs, logs)):
        log.seek(0)
        assert p.returncode == 0, f"process {i}:\n{log.read()[-3000:]}"
        log.close()

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
