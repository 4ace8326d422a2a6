"""Memory of the LM-head loss at a Qwen2-size vocabulary: full f32 logits vs `rlhf_jax.lm_head`.

    python -m benchmarks.bench_lm_head_memory [--vocab 151936 --seq 4096 --d-model 896]

Every number is read from a compiled program (`jit(...).lower(...).compile().memory_analysis()`)
of forward + backward of a token log-prob loss (sum of log p(target) plus 0.01 x entropy, as
PPO's loss with an entropy bonus uses both), so nothing big is executed: at 152k x 4k one f32
logits copy is 2.3 GiB. `temp` is XLA's scratch for the program (activations, logits, their
gradients); `total` adds the arguments and outputs (hidden, weight, their gradients), an upper
bound of the peak. Rows:

- head only: `hidden` [B, T, D] and the head weight as inputs (the loss the trunk feeds);
- alternative: the same chunked loss as `jax.checkpoint` over a `lax.scan` of chunks (no custom
  VJP), the other way the issue proposed, kept here as the measured comparison;
- trunk: a one-layer Qwen2-style trunk in front (`models.forward` with the logits vs
  `want_logits=False` + `lm_head.shifted_logprobs`), so the head's share is seen in context.

A values check then runs both on a small case at the same vocabulary (log-probs, entropy and
both gradients vs the full computation). Prints a table; writes
benchmarks/results/lm_head_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import lm_head, models

MiB = 2 ** 20


def _checkpoint_scan(h, w, t, temperature, chunk, vocab_major):
    """The alternative: remat each chunk's forward inside a scan; JAX derives the backward."""
    T = h.shape[1]
    w = w.astype(h.dtype)

    @jax.checkpoint
    def body(_, xs):
        h_c, t_c = xs
        z = lm_head._logits(h_c, w, temperature, vocab_major)
        logp, _, ent = lm_head._chunk_stats(z, t_c, True)
        return None, (logp, ent)

    _, (logp, ent) = jax.lax.scan(body, None, (lm_head._split(h, chunk), lm_head._split(t, chunk)))
    return lm_head._merge(logp, T), lm_head._merge(ent, T)


def _head_loss(kind, chunk, vocab_major, temperature):
    def loss(h, w, t):
        if kind == "full":
            logp, ent = lm_head.full_logits_logprobs(h, w, t, vocab_major=vocab_major,
                                                     temperature=temperature)
        elif kind == "chunked":
            logp, ent = lm_head.target_logprobs(h, w, t, vocab_major=vocab_major,
                                                temperature=temperature, with_entropy=True,
                                                chunk_size=chunk)
        else:
            logp, ent = _checkpoint_scan(h, w, t, temperature, chunk, vocab_major)
        return jnp.sum(logp) + 0.01 * jnp.sum(ent)
    return jax.value_and_grad(loss, argnums=(0, 1))


def _memory(fn, *args) -> dict:
    m = jax.jit(fn).lower(*args).compile().memory_analysis()
    io = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    return {"temp_mib": m.temp_size_in_bytes / MiB, "args_out_mib": io / MiB,
            "total_mib": (m.temp_size_in_bytes + io) / MiB}


def head_rows(B, T, D, V, chunks, temperature) -> list[dict]:
    rows = []
    for dtype in ("float32", "bfloat16"):
        for tied in (True, False):
            if dtype == "bfloat16" and not tied:
                continue
            h = jax.ShapeDtypeStruct((B, T, D), jnp.dtype(dtype))
            w = jax.ShapeDtypeStruct((V, D) if tied else (D, V), jnp.float32)
            t = jax.ShapeDtypeStruct((B, T), jnp.int32)
            kinds = [("full", None)] + [("chunked", c) for c in chunks]
            if dtype == "float32" and tied:
                kinds += [("checkpoint-scan", c) for c in chunks]
            for kind, chunk in kinds:
                c = chunk or lm_head.auto_chunk_size(B, T, V)
                fn = _head_loss(kind, c, tied, temperature)
                rows.append({"what": "head", "dtype": dtype, "tied": tied, "kind": kind,
                             "chunk": None if kind == "full" else c, **_memory(fn, h, w, t)})
                print(_fmt(rows[-1]), flush=True)
    return rows


def trunk_rows(B, T, D, V, temperature) -> list[dict]:
    """One Qwen2-0.5B-shaped layer (14 heads, 2 kv heads, d_ff 4864, q/k/v bias, tied head)."""
    cfg = models.ModelConfig(vocab_size=V, d_model=D, n_layers=1, n_heads=14, n_kv_heads=2,
                             d_ff=4864, qkv_bias=True, max_len=T, tie_embeddings=True,
                             rope_theta=1e6, norm_eps=1e-6)
    params = models.abstract_params(cfg)
    tok = jax.ShapeDtypeStruct((B, T), jnp.int32)
    rows = []
    for kind in ("full", "chunked"):
        def loss(p, tokens, kind=kind):
            mask = jnp.ones_like(tokens)
            pos = models.positions_from_mask(mask)
            out = models.forward(cfg, p, tokens, pos, mask, want_logits=kind == "full")
            if kind == "full":
                z = out["logits"][:, :-1] / temperature
                logp_all = jax.nn.log_softmax(z, axis=-1)
                logp = jnp.take_along_axis(logp_all, tokens[:, 1:, None], -1)[..., 0]
                ent = -jnp.sum(jnp.exp(logp_all) * logp_all, -1)
            else:
                logp, ent = lm_head.shifted_logprobs(p, out["hidden"], tokens,
                                                     temperature=temperature, with_entropy=True)
            return jnp.sum(logp) + 0.01 * jnp.sum(ent)
        rows.append({"what": "1-layer trunk + head", "dtype": "float32", "tied": True,
                     "kind": kind, "chunk": None if kind == "full" else
                     lm_head.auto_chunk_size(B, T - 1, V),
                     **_memory(jax.value_and_grad(loss), params, tok)})
        print(_fmt(rows[-1]), flush=True)
    return rows


def values_check(V, temperature) -> dict:
    """Executed: full vs chunked at the real vocabulary on a short sequence."""
    B, T, D = 2, 96, 128
    k = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(k[0], (B, T, D))
    w = 0.05 * jax.random.normal(k[1], (V, D))
    t = jax.random.randint(k[2], (B, T), 0, V)
    out = {}
    for kind in ("full", "chunked"):
        def f(h, w, t, kind=kind):
            if kind == "full":
                return lm_head.full_logits_logprobs(h, w, t, vocab_major=True,
                                                    temperature=temperature)
            return lm_head.target_logprobs(h, w, t, vocab_major=True, temperature=temperature,
                                           with_entropy=True, chunk_size=20)
        vals = jax.jit(f)(h, w, t)
        loss = lambda h, w, t, f=f: jnp.sum(f(h, w, t)[0]) + 0.01 * jnp.sum(f(h, w, t)[1])
        grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(h, w, t)
        out[kind] = [np.asarray(x) for x in (*vals, *grads)]
    names = ("logp", "entropy", "grad_hidden", "grad_weight")
    diffs = {n: float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-30))
             for n, a, b in zip(names, out["full"], out["chunked"])}
    return {"shape": [B, T, D, V], "chunk": 20, "max_abs_diff_over_max_abs": diffs}


def _fmt(r) -> str:
    chunk = "-" if r["chunk"] is None else str(r["chunk"])
    return (f"{r['what']:<22} {r['dtype']:<9} {'tied' if r['tied'] else 'untied':<7} "
            f"{r['kind']:<16} {chunk:>6} {r['temp_mib']:>10.1f} {r['total_mib']:>10.1f}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=151936)  # Qwen2
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=896)  # Qwen2-0.5B
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--chunks", type=int, nargs="*", default=[0, 256, 1024],
                    help="chunk sizes to measure; 0 = lm_head.auto_chunk_size")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--no-trunk", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "lm_head_memory.json"))
    args = ap.parse_args(argv)
    B, T, D, V = args.batch, args.seq, args.d_model, args.vocab
    print(f"forward + backward of sum(log p) + 0.01 sum(entropy); B={B} T={T} D={D} V={V}; "
          f"one f32 logits copy = {B * T * V * 4 / MiB:.0f} MiB")
    print(f"{'what':<22} {'dtype':<9} {'head':<7} {'kind':<16} {'chunk':>6} {'temp MiB':>10} "
          f"{'total MiB':>10}")
    chunks = [c or None for c in args.chunks]
    rows = head_rows(B, T, D, V, chunks, args.temperature)
    if not args.no_trunk:
        rows += trunk_rows(B, T, D, V, args.temperature)
    check = values_check(V, args.temperature)
    print("values check (max |full - chunked| / max |full|):",
          ", ".join(f"{k} {v:.1e}" for k, v in check["max_abs_diff_over_max_abs"].items()))
    result = {"config": vars(args), "rows": rows, "values_check": check,
              "jax": jax.__version__, "backend": jax.default_backend(),
              "machine": platform.machine()}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
