"""Training-step throughput of our decoder as a fraction of this machine's dense matmul FLOP/s.

    python -m benchmarks.bench_train_mfu [--d-model 512 --layers 4 --seq 128 --batch 16]

One jitted step = forward + backward + Adam update of the Llama-style model (next-token loss).
Model FLOPs per step (PaLM, Chowdhery et al. 2022, appendix B):

    6 * N * tokens  +  12 * n_layers * seq * (n_heads * head_dim) * tokens

N counts the parameters that take part in matmuls (every weight except the embedding lookup
table; with tied embeddings the table counts once, as the LM head). The attention term counts
the full T x T score and value matmuls (no causal discount), forward and backward. Norms,
softmax, RoPE and the optimizer are not counted: they are overhead that MFU should expose.

The reference is a jitted f32 (M x M) @ (M x M) matmul (2 * M^3 FLOPs), timed after warm-up.
Matmul and train-step timings are interleaved round by round, each over a similar length of
time, so load from other processes on a shared machine hits both alike; medians are reported,
both per wall-clock second and per CPU-second of the process. Writes benchmarks/results/train_mfu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import models


def model_flops_per_step(cfg: models.ModelConfig, batch: int, seq: int) -> dict:
    n_all = models.param_count(cfg, ("lm",))
    n_matmul = n_all - (cfg.vocab_size * cfg.d_model if not cfg.tie_embeddings else 0)
    # Tied: the table is used once as the LM head matmul (its lookup is free). Untied: the lookup
    # table is not a matmul, the separate lm_head is (and is already inside n_all).
    norms = cfg.n_layers * 2 * cfg.d_model + cfg.d_model
    n_matmul -= norms  # norm scales are elementwise, not matmul weights
    tokens = batch * seq
    dense = 6 * n_matmul * tokens
    attn = 12 * cfg.n_layers * seq * cfg.n_heads * cfg.dim_per_head * tokens
    return {"n_params": n_all, "n_matmul_params": n_matmul, "tokens": tokens,
            "dense_flops": dense, "attention_flops": attn, "total": dense + attn}


def make_step(cfg: models.ModelConfig, optimizer):
    def loss_fn(params, tokens, mask):
        positions = models.positions_from_mask(mask)
        logits = models.forward(cfg, params, tokens, positions, mask)["logits"]
        logp = jax.nn.log_softmax(logits[:, :-1])
        tgt = jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
        w = mask[:, 1:].astype(jnp.float32)
        return -(tgt * w).sum() / w.sum()

    def step(params, opt_state, tokens, mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, mask)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def _time(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds summed over XLA's threads)."""
    t, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    return time.perf_counter() - t, time.process_time() - c


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--d-ff", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--remat", default="none", choices=models.config.REMAT_POLICIES)
    ap.add_argument("--no-scan", dest="scan", action="store_false")
    ap.add_argument("--matmul", type=int, default=2048, help="M of the (M x M) @ (M x M) reference")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "train_mfu.json"))
    args = ap.parse_args(argv)

    cfg = models.ModelConfig(
        arch="llama", vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers,
        n_heads=args.heads, d_ff=args.d_ff, max_len=args.seq, tie_embeddings=False,
        scan_layers=args.scan, remat=args.remat)
    optimizer = optax.adam(1e-4)
    params = jax.jit(models.init_params, static_argnums=(0,))(cfg, jax.random.key(0))
    opt_state = jax.jit(optimizer.init)(params)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, args.vocab, (args.batch, args.seq)), jnp.int32)
    mask = jnp.ones((args.batch, args.seq), jnp.int32)
    step = make_step(cfg, optimizer)

    M = args.matmul
    a = jax.random.normal(jax.random.key(1), (M, M), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (M, M), jnp.float32)
    matmul = jax.jit(jnp.matmul)

    t0 = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, tokens, mask)  # compile + warm-up
    jax.block_until_ready(loss)
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        jax.block_until_ready(matmul(a, b))

    state = {"p": params, "o": opt_state}

    def one_step():
        state["p"], state["o"], l = step(state["p"], state["o"], tokens, mask)
        return l

    # Time the reference over about as long as one train step (k matmuls back to back), so
    # both sample the machine's load over similar windows.
    k = max(1, round(_time(one_step)[0] / _time(lambda: matmul(a, b))[0]))

    def k_matmuls():
        out = [matmul(a, b) for _ in range(k)]
        return out[-1]

    step_times, mm_times = [], []
    for _ in range(args.rounds):
        mm_times.append(tuple(t / k for t in _time(k_matmuls)))
        step_times.append(_time(one_step))
    flops = model_flops_per_step(cfg, args.batch, args.seq)
    step_s, mm_s = (statistics.median(t[0] for t in ts) for ts in (step_times, mm_times))
    step_cpu, mm_cpu = (statistics.median(t[1] for t in ts) for ts in (step_times, mm_times))
    train_flops_s = flops["total"] / step_s
    matmul_flops_s = 2 * M**3 / mm_s
    result = {
        "ratio": train_flops_s / matmul_flops_s,
        # FLOPs per CPU-second, train vs matmul: the same ratio, but robust to other processes
        # taking cores away (as long as XLA's threads do not spin while they wait).
        "ratio_cpu_time": (flops["total"] / step_cpu) / (2 * M**3 / mm_cpu),
        "train_model_flops_per_s": train_flops_s,
        "matmul_flops_per_s": matmul_flops_s,
        "step_s_median": step_s,
        "step_s_all": [t[0] for t in step_times],
        "step_cpu_s_median": step_cpu,
        "matmul_s_median": mm_s,
        "matmul_cpu_s_median": mm_cpu,
        "tokens_per_s": flops["tokens"] / step_s,
        "compile_s": compile_s,
        "flops": flops,
        "formula": "6*N_matmul*tokens + 12*n_layers*seq*(n_heads*head_dim)*tokens (PaLM app. B)",
        "model": cfg.to_dict(),
        "batch": args.batch, "seq": args.seq, "matmul_M": M, "matmuls_per_round": k,
        "final_loss": float(one_step()),
        "backend": jax.default_backend(), "devices": jax.device_count(),
        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "jax": jax.__version__,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"train step: {step_s * 1e3:.0f} ms median, {train_flops_s / 1e9:.1f} model GFLOP/s "
          f"({flops['total'] / 1e9:.1f} GFLOP/step, N={flops['n_matmul_params'] / 1e6:.1f}M, "
          f"{flops['tokens']} tokens)")
    print(f"f32 matmul {M}x{M}: {matmul_flops_s / 1e9:.1f} GFLOP/s")
    print(f"ratio (train model FLOP/s / matmul FLOP/s): {result['ratio']:.1%} wall-clock, "
          f"{result['ratio_cpu_time']:.1%} per CPU-second  -> {args.out}")
    return result


if __name__ == "__main__":
    main()
