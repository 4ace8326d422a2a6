"""Seconds per optimizer step of every stage, through the stage code, against TRL's numbers.

    python -m benchmarks.bench_stages [--sizes a,b] [--workloads sft,rm,dpo,rloo,ppo]
                                      [--devices 1,2] [--steps 5] [--profile_steps 2]

The shapes are issue 13's (reproduced exactly): GPT-2 architecture, vocab 512, n_positions 128,
tied embeddings, dropout 0, f32, random init; size a: d=128, 4 layers, 4 heads (0.875M params);
size b: d=512, 8 layers, 8 heads (25.5M). AdamW at a constant lr with global-norm clipping 1.0
(`optim.make_optimizer`). Workloads, each through the code a stage runs:

* `sft`: `trainer.make_train_step` over `ops.lm_loss_sums`, tokens [32, 64] (16-token prompt,
  48-token completion), loss on the 48 completion tokens;
* `rm`: the RM stage's loss (`rewards.score_sequences` + `rm.rm_loss`), 32 pairs of 64 tokens;
* `dpo`: `dpo.pair_logprobs` + `dpo.dpo_loss`, 16 pairs of 16 + 48 tokens, the reference a frozen
  jit argument run forward every step;
* `rloo`: `pg.rollout` + `pg.update` (critic-free), 16 prompts x 4 samples, 32 new tokens at
  T = 0.7, old-policy and reference passes, the reward, one policy fwd/bwd on [64, 48];
* `ppo`: `ppo.rollout` + `ppo.update`: 64 prompts x 16 tokens, 32 new tokens at T = 0.7,
  reference / value / RM passes, k1 KL in the reward (beta 0.05), GAE (gamma 1, lambda 0.95),
  then 4 epochs x 4 minibatches of 16, each a policy + value fwd/bwd and an AdamW step; the value
  network is separate (as in TRL).

Each device count runs in its own process (`JAX_NUM_CPU_DEVICES`; the batch split over a `data`
mesh), one after the other in this run. Per workload: the median wall time per optimizer step
(PPO and RLOO: per iteration, with the rollout / update split) after warm-up, checked to be free
of recompiles; model GFLOP/s (what the algorithm needs: 2 FLOPs per weight per token forward,
3x that for forward + backward, attention at the full causal length, the LM head only where
logits are used); in the same process the best dense f32 matmul GFLOP/s at the model's own matmul
shapes, and the ratio; and TRL's figures from issue 13 (torch 2.13 CPU, fp32, 2 threads,
measured on this project's 2-core machine) as labelled constants, with our speed-up over each.
`--profile_steps N` traces N more steps per workload with `jax.profiler` and prints where the
time goes at the largest device count (`benchmarks/step_profile.py`: matmuls, layout copies,
scan stacking, collectives, elementwise, untraced), with the step time the matmuls alone would
take at the rate they ran, against the time issue 13's goal allows.
The machine is shared: absolute numbers swing with its load; compare within one run.
Writes benchmarks/results/stages.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SIZES = {"a": dict(d_model=128, n_layers=4, n_heads=4), "b": dict(d_model=512, n_layers=8,
                                                                    n_heads=8)}
WORKLOADS = ("sft", "rm", "dpo", "ppo", "rloo")
# TRL 1.x on torch 2.13 CPU, fp32, 2 threads, glibc malloc with MALLOC_MMAP_MAX_=0 and
# MALLOC_TRIM_THRESHOLD_=68719476736 (its faster setting); median s per optimizer step (PPO,
# RLOO: per iteration). Issue 13, measured on this project's 2-core CPU machine.
TRL_SECONDS = {("sft", "a"): 0.169, ("sft", "b"): 2.64, ("rm", "a"): 0.218, ("rm", "b"): 5.11,
               ("dpo", "a"): 0.231, ("dpo", "b"): 3.64, ("rloo", "a"): 0.635,
               ("rloo", "b"): 9.22, ("ppo", "a"): 2.99, ("ppo", "b"): 42.1}
VOCAB, MAX_LEN, PROMPT, RESPONSE = 512, 128, 16, 48
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"  # scripts/allocator.sh
GEN = 32  # new tokens of the RL workloads
PAD, EOS = 0, 1


# ------------------------------------------------------------------------------- model FLOPs


def _flops(cfg, rows: int, length: int, logit_positions: int, *, backward: bool) -> float:
    """Model FLOPs of one pass over `rows` sequences of `length` tokens whose LM head (or score
    head, when `logit_positions` is 0) runs at `logit_positions` positions per row."""
    d, L = cfg.d_model, cfg.n_layers
    per_token = L * (4 * d * d + 2 * d * cfg.ff_dim) * 2  # q,k,v,o + MLP, 2 FLOPs per MAC
    attn = L * 2 * 2 * length * d  # QK^T and AV at the full causal length
    head = 2 * d * cfg.vocab_size * logit_positions + (0 if logit_positions else 2 * d)
    fwd = rows * (length * (per_token + attn) + head)
    return fwd * (3 if backward else 1)


def _decode_flops(cfg, rows: int, prompt: int, new: int) -> float:
    """Prefill plus `new` cached decode steps (attention over the tokens so far)."""
    d, L = cfg.d_model, cfg.n_layers
    per_token = L * (4 * d * d + 2 * d * cfg.ff_dim) * 2 + 2 * d * cfg.vocab_size
    total = _flops(cfg, rows, prompt, 1, backward=False)
    for t in range(new):
        total += rows * (per_token + L * 2 * 2 * (prompt + t) * d)
    return total


# -------------------------------------------------------------------------------- workloads


def model_overrides(text: str) -> dict:
    """`scan_layers=true,dtype=bfloat16` -> ModelConfig fields (the levers of bench_levers)."""
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        low = value.lower()
        out[key] = (low == "true") if low in ("true", "false") else value
    return out


def _setup(size: str):
    import jax
    import ml_collections

    from rlhf_jax import config_utils, models, optim
    from rlhf_jax import trainer as tr

    # The model as a stage builds it (ModelConfig's defaults: scan_layers, remat, dtype),
    # changed only by --model (a lever under measurement).
    fields = {**SIZES[size], **model_overrides(os.environ.get("BENCH_MODEL", ""))}
    cfg = models.ModelConfig(arch="gpt2", vocab_size=VOCAB, max_len=MAX_LEN, tie_embeddings=True,
                             dropout=0.0, **fields)
    config = config_utils.base_config()
    # config.mesh changed only by --mesh (a lever under measurement), else data = every device.
    mesh = model_overrides(os.environ.get("BENCH_MESH", ""))
    config.mesh.update({k: int(v) for k, v in mesh.items()})
    place = tr.Placement(config)
    optim_cfg = ml_collections.ConfigDict(dict(lr=1e-5, schedule="constant", warmup_steps=0,
                                               b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
                                               grad_clip=1.0))
    optimizer = optim.make_optimizer(optim_cfg, 1000)
    lm = jax.jit(models.init_params, static_argnums=(0, 2))(cfg, jax.random.key(0), ("lm",))
    axes = models.param_axes(cfg, ("lm",))
    return cfg, place, optimizer, place.place(lm, axes), axes


def _supervised(size: str, kind: str):
    """(step callable, flops per step, jitted fn) of the SFT / RM / DPO workloads."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rlhf_jax import dpo, models, ops, rewards, rm
    from rlhf_jax import trainer as tr

    cfg, place, optimizer, lm, axes = _setup(size)
    rng = np.random.default_rng(0)
    T = PROMPT + RESPONSE
    frozen = None
    if kind == "sft":
        batch = {"tokens": rng.integers(2, VOCAB, (32, T)).astype(np.int32),
                 "mask": np.ones((32, T), np.int32)}
        batch["loss_mask"] = (np.arange(T) >= PROMPT).astype(np.int32)[None].repeat(32, 0)
        params = lm

        def loss_fn(p, f, b, k):
            return ops.lm_loss_sums(cfg, p, b)

        flops = _flops(cfg, 32, T, T - 1, backward=True)
    elif kind == "rm":
        batch = {"tokens": rng.integers(2, VOCAB, (32, 2, T)).astype(np.int32),
                 "mask": np.ones((32, 2, T), np.int32),
                 "rank": np.tile(np.array([[0, 1]], np.int32), (32, 1))}
        head = jax.jit(lambda k: models.init_params(cfg, k, ("score",))["score_head"])(
            jax.random.key(1))
        params = place.place({**models.trunk(lm), "score_head": head},
                             models.param_axes(cfg, ("score",)))
        axes = models.param_axes(cfg, ("score",))

        def loss_fn(p, f, b, k):
            scores = rewards.score_sequences(cfg, p, b["tokens"], b["mask"])
            return rm.rm_loss(scores, b["rank"], kind="pairwise")

        flops = _flops(cfg, 64, T, 0, backward=True)
    else:  # dpo
        batch = {"tokens": rng.integers(2, VOCAB, (16, 2, T)).astype(np.int32),
                 "mask": np.ones((16, 2, T), np.int32),
                 "weight": np.ones(16, np.float32)}
        batch["response_mask"] = np.broadcast_to((np.arange(T) >= PROMPT).astype(np.int32),
                                                 (16, 2, T)).copy()
        params = lm
        frozen = place.place(jax.tree.map(lambda x: x * 1.0, lm), axes)

        def loss_fn(p, ref, b, k):
            logp, count = dpo.pair_logprobs(cfg, p, b)
            r = jax.lax.stop_gradient(dpo.pair_logprobs(cfg, ref, b)[0])
            return dpo.dpo_loss(logp, r, count, beta=0.1, weight=b["weight"])

        flops = (_flops(cfg, 32, T, T - 1, backward=True)
                 + _flops(cfg, 32, T, T - 1, backward=False))
    state = tr.TrainState(step=jnp.zeros((), jnp.int32), params=_copy(params),
                          opt_state=jax.jit(optimizer.init)(params))
    step = jax.jit(tr.make_train_step(loss_fn, optimizer), donate_argnums=(0,))
    g = place.to_global(batch)
    holder = {"state": state}

    def run_step(i):
        holder["state"], m = step(holder["state"], frozen, g, jax.random.key(i))
        return m["loss"]

    return run_step, flops, [step], {"cfg": cfg}


def _ppo(size: str):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rlhf_jax import models, ppo
    from rlhf_jax.rng import Purpose

    cfg, place, optimizer, lm, axes = _setup(size)
    s = ppo.Settings(policy=cfg, reward=cfg, value=cfg, max_new_tokens=GEN, temperature=0.7,
                     eos_id=EOS, pad_id=PAD, kl_mode="reward", gamma=1.0, lam=0.95, epochs=4,
                     minibatches=4, whiten_advantages=True)
    head = jax.jit(lambda k: models.init_params(cfg, k, ("score",))["score_head"])(
        jax.random.key(1))
    rm_params = place.place({**models.trunk(lm), "score_head": head},
                            models.param_axes(cfg, ("score",)))
    params = {"policy": _copy(lm), "value": _copy(rm_params)}
    opt_state = jax.jit(optimizer.init)(params)
    rng = np.random.default_rng(0)
    prompts = place.to_global({"t": rng.integers(2, VOCAB, (64, PROMPT)).astype(np.int32),
                               "m": np.ones((64, PROMPT), np.int32)})
    rollout = jax.jit(functools.partial(ppo.rollout, s))
    update = jax.jit(functools.partial(ppo.update, s, optimizer,
                                       batch_sharding=place.batch_sharding),
                     donate_argnums=(0, 1))
    beta = jnp.float32(0.05)
    holder = {"p": params, "o": opt_state, "split": [], "cfg": cfg}

    def run_step(i):
        t0 = time.perf_counter()
        data, rows, m = rollout(holder["p"], lm, rm_params, prompts["t"], prompts["m"],
                                jax.random.key(i), beta)
        jax.block_until_ready(data)
        t1 = time.perf_counter()
        holder["p"], holder["o"], upd = update(holder["p"], holder["o"], data, None, beta,
                                               place.key(Purpose.SHUFFLE), jnp.int32(i))
        jax.block_until_ready(upd)
        holder["split"].append((t1 - t0, time.perf_counter() - t1))
        return upd["loss"]

    L = PROMPT + GEN
    flops = (_decode_flops(cfg, 64, PROMPT, GEN)
             + _flops(cfg, 64, L, GEN, backward=False) * 2  # old policy + reference
             + _flops(cfg, 64, L, 0, backward=False) * 2  # value + RM
             + 16 * (_flops(cfg, 16, L, GEN, backward=True) + _flops(cfg, 16, L, 0,
                                                                      backward=True)))
    return run_step, flops, [rollout, update], holder


def _rloo(size: str):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rlhf_jax import models, pg
    from rlhf_jax.rng import Purpose

    cfg, place, optimizer, lm, axes = _setup(size)
    K = 4
    s = pg.Settings(policy=cfg, reward=cfg, opts=pg.PGOptions(estimator="rloo", group_size=K),
                    max_new_tokens=GEN, temperature=0.7, eos_id=EOS, pad_id=PAD, epochs=1,
                    minibatches=1)
    head = jax.jit(lambda k: models.init_params(cfg, k, ("score",))["score_head"])(
        jax.random.key(1))
    rm_params = place.place({**models.trunk(lm), "score_head": head},
                            models.param_axes(cfg, ("score",)))
    params = _copy(lm)
    opt_state = jax.jit(optimizer.init)(params)
    rng = np.random.default_rng(0)
    prompts = place.to_global({"t": rng.integers(2, VOCAB, (16, PROMPT)).astype(np.int32),
                               "m": np.ones((16, PROMPT), np.int32)})
    rollout = jax.jit(functools.partial(pg.rollout, s, batch_sharding=place.batch_sharding))
    update = jax.jit(functools.partial(pg.update, s, optimizer,
                                       batch_sharding=place.batch_sharding),
                     donate_argnums=(0, 1))
    holder = {"p": params, "o": opt_state, "split": [], "cfg": cfg}

    def run_step(i):
        t0 = time.perf_counter()
        data, rows, m = rollout(holder["p"], lm, rm_params, prompts["t"], prompts["m"],
                                jax.random.key(i))
        jax.block_until_ready(data)
        t1 = time.perf_counter()
        holder["p"], holder["o"], upd = update(holder["p"], holder["o"], data,
                                               place.key(Purpose.SHUFFLE), jnp.int32(i))
        jax.block_until_ready(upd)
        holder["split"].append((t1 - t0, time.perf_counter() - t1))
        return upd["loss"]

    B, L = 16 * K, PROMPT + GEN
    flops = (_decode_flops(cfg, B, PROMPT, GEN)
             + _flops(cfg, B, L, GEN, backward=False) * 2  # old policy + reference
             + _flops(cfg, B, L, 0, backward=False)  # RM
             + _flops(cfg, B, L, GEN, backward=True))  # one policy fwd/bwd
    return run_step, flops, [rollout, update], holder


def _copy(tree):
    """A device copy with the same shardings (the steps donate their state)."""
    import jax

    return jax.device_put(tree, jax.tree.map(lambda x: x.sharding, tree), may_alias=False)


def _matmul_peak(cfg, rows: int) -> float:
    """Best f32 GFLOP/s of a jitted [rows, k] @ [k, n] at the model's own matmul shapes."""
    import jax
    import jax.numpy as jnp

    d, f, V = cfg.d_model, cfg.ff_dim, cfg.vocab_size
    best = 0.0
    for k, n in ((d, d), (d, 3 * d), (d, f), (f, d), (d, V)):
        a = jax.random.normal(jax.random.key(0), (rows, k), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
        mm = jax.jit(jnp.matmul)
        jax.block_until_ready(mm(a, b))
        reps = max(1, int(2e9 / (2 * rows * k * n)))  # ~2 GFLOP per timing
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(reps):
                out = mm(a, b)
            jax.block_until_ready(out)
            times.append((time.perf_counter() - t0) / reps)
        best = max(best, 2 * rows * k * n / statistics.median(times) / 1e9)
    return best


def measure(size: str, workload: str, steps: int, warmup: int, profile_steps: int = 0) -> dict:
    import jax

    build = {"ppo": _ppo, "rloo": _rloo}.get(workload,
                                             functools.partial(_supervised, kind=workload))
    run_step, flops, jitted, info = build(size)

    t0 = time.perf_counter()
    for i in range(warmup):
        jax.block_until_ready(run_step(i))
    compile_s = time.perf_counter() - t0
    compiled = [f._cache_size() for f in jitted]
    times = []
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    for i in range(warmup, warmup + steps):
        t = time.perf_counter()
        jax.block_until_ready(run_step(i))
        times.append(time.perf_counter() - t)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    recompiles = sum(f._cache_size() for f in jitted) - sum(compiled)
    median = statistics.median(times)
    peak = _matmul_peak(info["cfg"], rows=2048 if workload == "sft" else 16 * (PROMPT + GEN))
    out = {"median_s": median, "all_s": times, "warmup_s": compile_s, "recompiles": recompiles,
           "model_gflops_per_s": flops / median / 1e9, "gflop_per_step": flops / 1e9,
           "matmul_peak_gflops_per_s": peak,
           # Issue 13's page-fault defect: minor faults and system CPU seconds per step.
           "minor_faults_per_step": (ru1.ru_minflt - ru0.ru_minflt) / steps,
           "system_s_per_step": (ru1.ru_stime - ru0.ru_stime) / steps,
           "user_s_per_step": (ru1.ru_utime - ru0.ru_utime) / steps}
    out["fraction_of_matmul_peak"] = out["model_gflops_per_s"] / peak
    if info.get("split"):
        split = info["split"][warmup:]
        out["rollout_s"] = statistics.median(r for r, _ in split)
        out["update_s"] = statistics.median(u for _, u in split)
    if profile_steps:
        import tempfile

        from benchmarks import step_profile

        threads = os.cpu_count() or 1
        with tempfile.TemporaryDirectory() as trace_dir:
            prof = step_profile.profile(run_step, profile_steps, warmup + steps, trace_dir,
                                        threads)
        dots = prof["dots"]["s"]
        # If only the matmuls remained, at the rate they ran: the floor of this code on this CPU.
        prof["dot_gflops_per_core"] = flops / dots / 1e9 if dots else float("nan")
        prof["dot_floor_s"] = dots / threads
        out["profile"] = prof
    return out


def child(args) -> None:
    res = {}
    for size in args.sizes:
        for w in args.workloads:
            res[f"{w}/{size}"] = measure(size, w, args.steps, args.warmup,
                                         args.profile_steps)
            print(f"  [{os.environ.get('JAX_NUM_CPU_DEVICES')} dev] {w}/{size}: "
                  f"{res[f'{w}/{size}']['median_s']:.3f} s", file=sys.stderr, flush=True)
    print("RESULT " + json.dumps(res))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="a,b")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--devices", default="1,2", help="JAX CPU device counts, one process each")
    ap.add_argument("--steps", type=int, default=5, help="measured steps per workload")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--model", default="", help="ModelConfig overrides, e.g. scan_layers=false")
    ap.add_argument("--mesh", default="", help="config.mesh overrides, e.g. data=1,fsdp=2")
    ap.add_argument("--xla_flags", default="", help="XLA_FLAGS for the measured processes")
    ap.add_argument("--preload", default="auto", help="LD_PRELOAD for the measured processes "
                    "(an allocator); auto: tcmalloc when installed, as scripts/allocator.sh "
                    "gives the README's commands; '' or RLHF_JAX_MALLOC=system: glibc's malloc")
    ap.add_argument("--env", default="", help="K=V,... more environment of the measured "
                    "processes")
    ap.add_argument("--profile_steps", type=int, default=0,
                    help="also trace this many steps per workload and print where the time goes "
                    "(benchmarks/step_profile.py): matmuls, layout copies, scan stacking, "
                    "collectives, elementwise, untraced")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "stages.json"))
    args = ap.parse_args(argv)
    args.sizes = [s for s in args.sizes.split(",") if s]
    args.workloads = [w for w in args.workloads.split(",") if w]
    bad = [w for w in args.workloads if w not in WORKLOADS] + [s for s in args.sizes
                                                                if s not in SIZES]
    if bad:
        ap.error(f"unknown workload(s) / size(s) {bad}")
    if args.child:
        child(args)
        return {}
    results = {}
    for n in [int(x) for x in args.devices.split(",")]:
        env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(n), JAX_PLATFORMS="cpu")
        env.pop("XLA_FLAGS", None)  # the device count comes from JAX_NUM_CPU_DEVICES
        if args.xla_flags:
            env["XLA_FLAGS"] = args.xla_flags
        env["BENCH_MODEL"] = args.model
        env["BENCH_MESH"] = args.mesh
        preload = args.preload
        if preload == "auto":  # what scripts/allocator.sh would give
            use = os.environ.get("RLHF_JAX_MALLOC") != "system" and os.path.exists(TCMALLOC)
            preload = TCMALLOC if use else ""
        if preload:
            env["LD_PRELOAD"] = preload
        env.update(kv.split("=", 1) for kv in args.env.split(",") if kv)
        cmd = [sys.executable, "-m", "benchmarks.bench_stages", "--child",
               f"--sizes={','.join(args.sizes)}", f"--workloads={','.join(args.workloads)}",
               f"--steps={args.steps}", f"--warmup={args.warmup}",
               f"--profile_steps={args.profile_steps}"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if proc.returncode:
            sys.exit(f"benchmark child ({n} devices) failed:\n{proc.stderr[-3000:]}")
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
        results[n] = json.loads(line[len("RESULT "):])
    table = report(results, args)
    if args.out == "-":
        return {"results": results, "table": table}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"results": {str(k): v for k, v in results.items()}, "table": table,
                   "trl_seconds": {f"{w}/{s}": v for (w, s), v in TRL_SECONDS.items()}}, f,
                  indent=2)
    print(f"-> {args.out}")
    return results


def report(results: dict, args) -> list[dict]:
    devs = sorted(results)
    head = (f"{'workload':<10}{'TRL s':>8}" + "".join(f"{f'ours {n}dev s':>14}" for n in devs)
            + f"{'TRL/ours':>10}{'GFLOP/s':>9}{'matmul':>8}{'of peak':>8}")
    print(head)
    rows = []
    for size in args.sizes:
        for w in args.workloads:
            key = f"{w}/{size}"
            ours = {n: results[n][key]["median_s"] for n in devs}
            best_n = min(ours, key=ours.get)
            r = results[best_n][key]
            trl = TRL_SECONDS[(w, size)]
            row = {"workload": key, "trl_s": trl, **{f"ours_{n}dev_s": ours[n] for n in devs},
                   "speedup_vs_trl": trl / ours[best_n], "best_devices": best_n,
                   "model_gflops_per_s": r["model_gflops_per_s"],
                   "matmul_peak_gflops_per_s": r["matmul_peak_gflops_per_s"],
                   "fraction_of_matmul_peak": r["fraction_of_matmul_peak"],
                   "recompiles": sum(results[n][key]["recompiles"] for n in devs)}
            if "rollout_s" in r:
                row.update(rollout_s=r["rollout_s"], update_s=r["update_s"])
            rows.append(row)
            split = (f"  (rollout {r['rollout_s']:.2f} + update {r['update_s']:.2f})"
                     if "rollout_s" in r else "")
            print(f"{key:<10}{trl:>8.3f}" + "".join(f"{ours[n]:>14.3f}" for n in devs)
                  + f"{trl / ours[best_n]:>9.2f}x{r['model_gflops_per_s']:>9.1f}"
                  f"{r['matmul_peak_gflops_per_s']:>8.1f}{r['fraction_of_matmul_peak']:>8.0%}"
                  + split + ("  RECOMPILED" if row["recompiles"] else ""))
    if args.profile_steps:
        rows_p = profile_table(results, args)
        for row in rows:
            row["profile"] = rows_p.get(row["workload"])
    return rows


GOAL = {"a": 1.5, "b": 1.2}  # issue 13: this many times TRL's speed at each size


def profile_table(results: dict, args) -> dict:
    """Where the time goes at the largest device count (one device per core: exact shares), and
    the step time if only the matmuls remained, against the step time issue 13's goal needs."""
    n = max(results)
    cats = ("dots", "layout", "scan_stacking", "collectives", "elementwise", "untraced")
    print(f"\nwhere the time goes ({n} devices; share of cores x wall; floor = the matmuls "
          "alone at their measured rate)")
    print(f"{'workload':<10}{'wall s':>8}" + "".join(f"{c[:11]:>12}" for c in cats)
          + f"{'dot GF/s/core':>14}{'floor s':>9}{'goal s':>8}")
    out = {}
    for size in args.sizes:
        for w in args.workloads:
            key = f"{w}/{size}"
            p = results[n][key].get("profile")
            if not p:
                continue
            goal = TRL_SECONDS[(w, size)] / GOAL[size]
            out[key] = {"devices": n, "wall_s": p["wall_s"], "goal_s": goal,
                        "dot_floor_s": p["dot_floor_s"],
                        "dot_gflops_per_core": p["dot_gflops_per_core"],
                        **{f"{c}_share": p[c]["share"] for c in cats},
                        "top_ops": p["top_ops"]}
            print(f"{key:<10}{p['wall_s']:>8.3f}" + "".join(f"{p[c]['share']:>12.0%}" for c in cats)
                  + f"{p['dot_gflops_per_core']:>14.1f}{p['dot_floor_s']:>9.3f}{goal:>8.3f}")
    return out


if __name__ == "__main__":
    main()
