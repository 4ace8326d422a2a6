"""A config file and a trial program for the sweep tests that need no JAX (starts in ~1 s).

`python tests/_sweep_echo.py --config=tests/_sweep_echo.py --config.name=x ...` parses its flags
with absl + `ml_collections.config_flags` (the parser under `config_utils.run_with_config`, without
importing JAX) and writes `<workdir>/summary.json`: the config it received, its CPU affinity and
BLAS thread variables. `--config.fail=true` makes it exit with status 3 instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import ml_collections


def get_config(arg: str | None = None):
    if arg:
        raise ValueError(f"_sweep_echo.py takes no preset (got {arg!r})")
    c = ml_collections.ConfigDict()
    c.workdir = "/tmp/sweep_echo"
    c.seed = 0
    c.name = "echo"
    c.flag = False
    c.count = 1
    c.lr = 1e-3
    c.tags = ("a", "b")
    c.shape = (2, 3)
    c.nested = ml_collections.ConfigDict(dict(depth=1, label="x"))
    c.fail = False
    c.lock()
    return c


def main(config) -> None:
    if config.fail:
        print("echo: failing as asked (config.fail=true)", file=sys.stderr)
        sys.exit(3)
    out = Path(config.workdir)
    out.mkdir(parents=True, exist_ok=True)
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                          "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")}
    summary = {"config": config.to_dict(), "affinity": sorted(os.sched_getaffinity(0)),
               "env": env, "score": float(config.count) * config.lr}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    from absl import app
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file("config", None, "config file", lock_config=True)
    app.run(lambda argv: main(_CONFIG.value))
