"""Where a step's time goes on XLA:CPU, read from a `jax.profiler` trace of real steps.

XLA:CPU's thunk runtime records one trace event per executed op (a fusion, a library dot, a
collective) on the thread that ran it. With one JAX device per core every op runs on one thread,
so the events of a step add up to (cores x wall time) minus the time the cores sat idle or in
the host: the shares below are exact. (With fewer devices than cores a library dot also runs on
pool threads that record no event, so read the shares at the device-per-core count.)

    categorise(trace_dir, steps, wall_s, threads) -> {"dots": {...}, "layout": ..., ...}

Categories, by the op name XLA gives each thunk:
* dots: library matmuls (YNNPACK / XNNPACK / oneDNN fusions) and XLA's own `dot` / `convolution`;
* layout: copies and transposes that put an operand in the layout a matmul wants (`copy*`,
  `transpose*`, `concatenate*`, `slice*` fusions);
* scan_stacking: reading a layer's slice of a stacked [layers, ...] buffer and writing it back
  (`dynamic-slice*` / `dynamic-update-slice*` fusions of a scan over layers);
* collectives: all-reduce / all-gather / reduce-scatter / permutes and the waits for the other
  device (`Rendezvous`, `Wait: ...`);
* elementwise: every other fusion (norms, GELU, softmax, the optimizer's update, the loss);
* untraced: cores x wall minus all of the above (host dispatch, cores idle between ops).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re

# Events that wrap other events (executables, Python frames, the runtime's bookkeeping): not ops.
_WRAPPERS = ("ThunkExecutor", "$", "SlinkyThreadPool", "PjitFunction", "CommonPjRt",
             "ParseArguments", "Wait for LaunchOnDevice", "end: ", "[")
_COLLECTIVE = re.compile(r"^(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all"
                         r"|Rendezvous|Wait: )")
CATEGORIES = ("dots", "layout", "scan_stacking", "collectives", "elementwise")


def category(name: str) -> str | None:
    """The category of one trace event's name, or None for a wrapper / control-flow event."""
    if name.startswith(_WRAPPERS) or re.match(r"^(while|conditional|call)(\.\d+)?$", name):
        return None
    if _COLLECTIVE.match(name):
        return "collectives"
    if re.match(r"^(ynn_fusion|xnn_fusion|onednn|__onednn|dot|convolution|custom-call)", name):
        return "dots"
    base = re.sub(r"(\.\d+)+$", "", name)
    if "dynamic-update-slice" in base or "dynamic-slice" in base:
        return "scan_stacking"
    if re.match(r"^(copy|transpose|concatenate|slice|bitcast_copy|bitcast_transpose)", base):
        return "layout"
    return "elementwise"


def _events(trace_dir: str) -> list[dict]:
    found = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
    if not found:
        raise FileNotFoundError(f"no perfetto trace under {trace_dir} (jax.profiler.trace with "
                                "create_perfetto_trace=True writes one)")
    with gzip.open(max(found, key=os.path.getmtime)) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def categorise(trace_dir: str, steps: int, wall_s: float, threads: int) -> dict:
    """Per-step seconds of each category (summed over threads), its share of threads x wall,
    and the five slowest ops."""
    per_cat: collections.Counter = collections.Counter()
    per_op: collections.Counter = collections.Counter()
    ops = [(e, category(e["name"])) for e in _events(trace_dir)
           if e.get("ph") == "X" and "dur" in e]
    busy_until: dict = {}  # per thread: the end of the op running there (nested events: once)
    for e, cat in sorted(ops, key=lambda o: (o[0]["pid"], o[0]["tid"], o[0]["ts"])):
        thread = (e["pid"], e["tid"])
        if cat is None or e["ts"] < busy_until.get(thread, float("-inf")):
            continue  # not an op, or inside another op (a rendezvous within its all-reduce)
        busy_until[thread] = e["ts"] + e["dur"]
        per_cat[cat] += e["dur"] * 1e-6 / steps
        per_op[e["name"]] += e["dur"] * 1e-6 / steps
    capacity = threads * wall_s
    out = {c: {"s": per_cat[c], "share": per_cat[c] / capacity} for c in CATEGORIES}
    traced = sum(per_cat.values())
    out["untraced"] = {"s": max(0.0, capacity - traced), "share": max(0.0, 1 - traced / capacity)}
    out["top_ops"] = [(n, s) for n, s in per_op.most_common(5)]
    return out


def profile(run_step, steps: int, first: int, trace_dir: str, threads: int) -> dict:
    """Trace `steps` calls of run_step(i) (i from `first`) and categorise their ops."""
    import time

    import jax

    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        t = time.perf_counter()
        for i in range(first, first + steps):
            jax.block_until_ready(run_step(i))
        wall = (time.perf_counter() - t) / steps
    out = categorise(trace_dir, steps, wall, threads)
    out["wall_s"] = wall
    return out
