"""Each speed lever of issue 13 against the defaults, paired in one run.

    python -m benchmarks.bench_levers [--levers baseline,unrolled,...] [--workloads sft,rm]
                                      [--sizes a,b] [--devices 2] [--steps 5] [--rounds 2]

A lever is a change of the model config (`bench_stages --model`), of the mesh (`--mesh`), of
XLA's flags (`--xla_flags`), of the allocator (`--preload`) or of the environment (`--env`);
every lever runs the same `bench_stages` workloads (the stage code, issue 13's shapes) in fresh
processes. The baseline is glibc's malloc and the ModelConfig defaults (`--baseline=tcmalloc`:
the shipped default instead). The levers run in rounds, in order, baseline first in each, so a
load change on the shared machine hits neighbours alike; the table gives each lever's median
s/step over the rounds and its speed-up over the baseline of the same rounds (> 1: the lever
wins). Writes benchmarks/results/levers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from benchmarks import bench_stages

_LIB = "/usr/lib/x86_64-linux-gnu/"
_TCMALLOC = bench_stages.TCMALLOC
# name -> what it changes: `model` (ModelConfig overrides), `xla_flags`, `preload` (LD_PRELOAD:
# an allocator; apt: libjemalloc2, libtcmalloc-minimal4; skipped when not installed) and `env`
# (other variables of the measured processes). The baseline is what `bench_stages` measures.
LEVERS = {
    "baseline": {"preload": ""},  # glibc's malloc (bench_stages' default is tcmalloc if there)
    "unrolled": {"model": "scan_layers=false"},  # a Python loop over layers, not lax.scan
    "remat_full": {"model": "remat=full"},  # recompute activations in the backward pass
    "bf16": {"model": "dtype=bfloat16"},  # bf16 compute, f32 master weights and logits
    "onednn": {"xla_flags": "--xla_cpu_use_onednn=true"},
    "onednn_cc": {"xla_flags": "--xla_cpu_experimental_onednn_custom_call=true"},
    "no_xnnpack": {"xla_flags": "--xla_cpu_use_xnnpack=false"},
    "vector512": {"xla_flags": "--xla_cpu_prefer_vector_width=512"},
    "concurrency_sched": {"xla_flags": "--xla_cpu_enable_concurrency_optimized_scheduler=true"},
    "fast_math": {"xla_flags": "--xla_cpu_enable_fast_math=true"},
    # Issue 13's page faults: allocators that keep freed pages, and glibc told to keep them
    # (env: read at process start; the same settings through mallopt at import time measured
    # 1.12x / 1.31x at size a but 0.60x / 0.65x at size b, so neither shipped).
    "jemalloc": {"preload": _LIB + "libjemalloc.so.2"},
    "tcmalloc": {"preload": _TCMALLOC},
    "glibc_env": {"env": "MALLOC_MMAP_MAX_=0,MALLOC_TRIM_THRESHOLD_=68719476736,"
                         "MALLOC_ARENA_MAX=1"},
    "tcmalloc+unrolled": {"preload": _TCMALLOC, "model": "scan_layers=false"},
    "tcmalloc+remat_full": {"preload": _TCMALLOC, "model": "remat=full"},
    # bf16 compute over f32 master weights, every projection's matmuls bf16 x bf16 -> f32 in the
    # forward and the backward (models/transformer.py `_low_precision_project`).
    "tcmalloc+bf16": {"preload": _TCMALLOC, "model": "dtype=bfloat16"},
    # Parameters, gradients and AdamW state split over the two devices (ZeRO-3 style: gradients
    # reduce-scattered, parameters all-gathered) instead of replicated and all-reduced.
    "tcmalloc+fsdp": {"preload": _TCMALLOC, "mesh": "data=1,fsdp=-1"},
    # YNNPACK (XLA:CPU's matmul library) fusing more than single dots (XLA_FLAGS).
    "tcmalloc+ynn_dot": {"preload": _TCMALLOC,
                         "xla_flags": "--xla_cpu_experimental_ynn_fusion_type=dot"},
    "tcmalloc+ynn_dot_eltwise_reduce": {
        "preload": _TCMALLOC,
        "xla_flags": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce"},
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levers", default=",".join(LEVERS))
    ap.add_argument("--workloads", default="sft,rm")
    ap.add_argument("--sizes", default="a,b")
    ap.add_argument("--devices", default="2")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--baseline", default="baseline", help="the lever the others are compared "
                    "with (tcmalloc: the shipped default)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "levers.json"))
    args = ap.parse_args(argv)
    levers = [x for x in args.levers.split(",") if x]
    unknown = [x for x in levers if x not in LEVERS]
    if unknown:
        ap.error(f"unknown lever(s) {unknown}; known: {', '.join(LEVERS)}")
    for x in [x for x in levers if LEVERS[x].get("preload")]:
        if not os.path.exists(LEVERS[x]["preload"]):
            print(f"skipping {x}: {LEVERS[x]['preload']} is not installed")
            levers.remove(x)
    if args.baseline not in LEVERS:
        ap.error(f"unknown baseline {args.baseline!r}")
    if args.baseline not in levers:
        levers.insert(0, args.baseline)
    runs: dict[str, list[dict]] = {name: [] for name in levers}
    for r in range(args.rounds):
        for name in levers:
            lever = LEVERS[name]
            print(f"[round {r + 1}/{args.rounds}] {name}", flush=True)
            out = bench_stages.main([f"--sizes={args.sizes}", f"--workloads={args.workloads}",
                                     f"--devices={args.devices}", f"--steps={args.steps}",
                                     f"--model={lever.get('model', '')}",
                                     f"--mesh={lever.get('mesh', '')}",
                                     f"--xla_flags={lever.get('xla_flags', '')}",
                                     f"--preload={lever.get('preload', '')}",  # glibc
                                     f"--env={lever.get('env', '')}", "--out=-"])
            runs[name].append(out["results"])
    keys = list(next(iter(runs[args.baseline][0].values())))
    rows = []
    print(f"\n{'lever':<20}" + "".join(f"{k:>16}" for k in keys))
    def best_per_round(lever, k):
        """Per round, the result of the best device count for workload k."""
        return [min((res[n][k] for n in res), key=lambda r: r["median_s"]) for res in runs[lever]]

    for name in levers:
        row = {"lever": name, **LEVERS[name]}
        cells = []
        for k in keys:
            # The median over rounds; the speed-up pairs each round with its own baseline.
            best = best_per_round(name, k)
            secs = [b["median_s"] for b in best]
            base = [b["median_s"] for b in best_per_round(args.baseline, k)]
            speedup = statistics.median(b / s for b, s in zip(base, secs))
            row[k] = {"median_s": statistics.median(secs), "all_s": secs,
                      "speedup_vs_baseline": speedup,
                      "minor_faults_per_step": statistics.median(
                          b["minor_faults_per_step"] for b in best),
                      "system_s_per_step": statistics.median(b["system_s_per_step"]
                                                             for b in best)}
            cells.append(f"{statistics.median(secs):8.3f}s {speedup:5.2f}x")
        rows.append(row)
        print(f"{name:<20}" + "".join(f"{c:>16}" for c in cells))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"rows": rows, "args": vars(args)}, f, indent=2)
    print(f"-> {args.out}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
