"""Issue 24's fit diagnosis: the project's forward + backward of a loss on the hidden states of a
Llama-3-8B-shaped model, compiled for a TPU topology from this CPU machine, with and without the
activations' logical-axis constraints (`sharding.activation_mesh`). Prints per-chip arguments and
temporaries (or the compiler's out-of-memory figure).

    JAX_PLATFORMS=cpu python -m benchmarks.fit_8b --layers=2 --mesh=1,256,1 --constrain=0
"""
import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from rlhf_jax import models, plan, sharding  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--mesh", default="1,256,1", help="data,fsdp,tensor")
    ap.add_argument("--topology", default="v5e:16x16")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--remat", default="full")
    ap.add_argument("--constrain", type=int, default=1, help="1: activations constrained")
    a = ap.parse_args()
    cfg = models.ModelConfig(arch="llama", vocab_size=128256, d_model=4096, n_layers=a.layers,
                             n_heads=32, n_kv_heads=8, d_ff=14336, param_dtype="bfloat16",
                             dtype="bfloat16", remat=a.remat, max_len=8192)
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, map(int, a.mesh.split(",")))),
                              plan.topology_devices(a.topology))
    abstract = models.abstract_params(cfg)
    shs = sharding.logical_to_shardings(models.param_axes(cfg), mesh, None, abstract)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, shs)
    tokens = jax.ShapeDtypeStruct((a.batch, a.seq), jnp.int32,
                                  sharding=sharding.batch_sharding(mesh))

    def loss(params, tokens):
        mask = jnp.ones_like(tokens)
        with sharding.activation_mesh(mesh if a.constrain else None):
            h = models.forward(cfg, params, tokens, models.positions_from_mask(mask), mask,
                               want_logits=False)["hidden"]
        return jnp.mean(jnp.square(h.astype(jnp.float32)))

    t0 = time.time()
    try:
        c = jax.jit(jax.grad(loss), out_shardings=shs).lower(params, tokens).compile()
    except Exception as e:  # noqa: BLE001
        print(f"{vars(a)}: {str(e).splitlines()[0][:300]} [{time.time() - t0:.0f} s]")
        return
    m = c.memory_analysis()
    print(f"{vars(a)}: arguments {m.argument_size_in_bytes / 2**30:.2f} GiB, temporaries "
          f"{m.temp_size_in_bytes / 2**30:.2f} GiB per chip [{time.time() - t0:.0f} s]")


if __name__ == "__main__":
    main()
