"""Test set-up: 8 CPU devices so mesh tests run anywhere (must happen before JAX loads), and one
persistent XLA compilation cache for the whole session, shared with the subprocesses tests start
(the stage and pipeline tests compile the same tiny programs in many processes)."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # A fresh cache per session: every run (CI's included) starts cold, so timings here are
    # what CI sees and no stale program outlives a code change.
    _cache = tempfile.mkdtemp(prefix="rlhf_jax_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
