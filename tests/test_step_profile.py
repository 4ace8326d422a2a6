"""benchmarks/step_profile.py: the categories of XLA:CPU's op events and their per-step shares."""

import gzip
import json

import jax
import jax.numpy as jnp
import pytest

from benchmarks import step_profile


@pytest.mark.parametrize("name, cat", [
    ("ynn_fusion.35", "dots"), ("dot.94", "dots"), ("xnn_fusion", "dots"),
    ("copy_bitcast_fusion.4", "layout"), ("transpose_copy_fusion.1", "layout"),
    ("slice_concatenate_fusion.2", "layout"),
    ("bitcast_dynamic-update-slice_fusion.35", "scan_stacking"),
    ("subtract_dynamic-slice_fusion.4", "scan_stacking"),
    ("all-reduce.3", "collectives"), ("Rendezvous", "collectives"),
    ("Wait: pending_threads=1/2", "collectives"),
    ("multiply_add_fusion", "elementwise"), ("wrapped_broadcast", "elementwise"),
    ("while.3", None), ("ThunkExecutor::Execute", None), ("PjitFunction(step)", None),
    ("$api.py:2479 block_until_ready", None),
])
def test_category(name, cat):
    assert step_profile.category(name) == cat


def _write_trace(tmp_path, events):
    path = tmp_path / "plugins" / "profile" / "run" / "host.perfetto_trace.json.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_categorise_counts_each_thread_once(tmp_path):
    ev = lambda name, tid, ts, dur: {"ph": "X", "name": name, "pid": 1, "tid": tid,  # noqa: E731
                                     "ts": ts, "dur": dur}
    _write_trace(tmp_path, [
        ev("ThunkExecutor::Execute", 1, 0, 1000),  # a wrapper: not an op
        ev("ynn_fusion.1", 1, 0, 400),
        ev("all-reduce.1", 1, 400, 200),
        ev("Rendezvous", 1, 450, 100),  # inside the all-reduce: counted once, as the all-reduce
        ev("copy_bitcast_fusion", 2, 0, 300),
        ev("ynn_fusion.2", 2, 300, 600),
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 2, "args": {"name": "x"}},
    ])
    # two steps of 1 ms wall on two threads: capacity 2 ms per step
    out = step_profile.categorise(str(tmp_path), steps=2, wall_s=1e-3, threads=2)
    assert out["dots"]["s"] == pytest.approx(0.5e-3)  # (400 + 600) us over 2 steps
    assert out["dots"]["share"] == pytest.approx(0.25)
    assert out["collectives"]["s"] == pytest.approx(0.1e-3)
    assert out["layout"]["s"] == pytest.approx(0.15e-3)
    assert out["untraced"]["share"] == pytest.approx(1 - (1000 + 200 + 300) / 2 / 2000)
    assert out["top_ops"][0][0] == "ynn_fusion.2"


def test_profile_of_a_real_step_finds_its_matmul(tmp_path):
    a = jnp.ones((256, 256))
    step = jax.jit(lambda i: jnp.tanh(a @ a + i))
    jax.block_until_ready(step(0))
    out = step_profile.profile(step, steps=2, first=1, trace_dir=str(tmp_path), threads=1)
    assert out["wall_s"] > 0
    assert out["dots"]["s"] > 0, out["top_ops"]
    assert sum(out[c]["share"] for c in (*step_profile.CATEGORIES, "untraced")) >= 0.99
