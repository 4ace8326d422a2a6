"""The compile-only planner (issue 24): TPU compiles from this CPU machine, known answers, and the
planner against programs actually run on 8 CPU devices."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from rlhf_jax import models, plan  # noqa: E402

TINY = plan.TINY
SMALL = dict(batch=8, seq=64, prompt_len=32, response_len=32, samples=2)


@pytest.mark.parametrize("topology, mesh", [("v5e:2x2", (1, 4, 1)), ("v5p:2x2x2", (2, 2, 2))])
def test_tiny_sft_step_and_ppo_update_compile_for_tpu(topology, mesh):
    devices = plan.topology_devices(topology)
    assert devices[0].platform == "tpu" and len(devices) == np.prod(mesh)
    for stage, name in (("sft", "train_step"), ("ppo", "update")):
        opts = plan.Options(stage=stage, mesh=mesh, **SMALL)
        _, programs = plan.build_programs(TINY, opts, devices)
        (p,) = [p for p in programs if p.name == name]
        c = plan.compile_program(p)
        assert c.ok, c.error
        # (tiny programs may need no HBM temporaries at all: libtpu reports 0 for them)
        assert c.argument > 0 and c.temp >= 0 and c.total < plan.CHIPS[topology[:3]].hbm_bytes
        assert p.model_flops > 0 and c.cost_flops > 0
        # fsdp shards the weights: the step gathers them.
        assert "all-gather" in c.collectives, c.collectives


def test_fsdp_n_holds_one_nth_of_the_parameters():
    devices = plan.topology_devices("v5e:2x2")
    sizes = {}
    for mesh in ((4, 1, 1), (1, 4, 1)):
        b, _ = plan.build_programs(TINY, plan.Options(stage="sft", mesh=mesh, **SMALL), devices)
        sizes[mesh] = plan.per_chip_bytes(b.trees["policy"])
    full = models.param_count(TINY.replace(param_dtype="bfloat16")) * 2
    assert sizes[(4, 1, 1)] == full  # replicated
    assert sizes[(1, 4, 1)] == full // 4


def test_8b_ppo_does_not_fit_v5e16_replicated_and_the_smallest_slice_is_found():
    cfg = plan.model_config("llama-3.1-8b")
    opts = plan.Options(stage="ppo", batch=64, prompt_len=512, response_len=512)
    chip = plan.CHIPS["v5e"]
    replicated = plan.make_plan(cfg, dataclasses.replace(opts, mesh=(16, 1, 1)),
                                plan.topology_devices("v5e:4x4"), chip, compile=False)
    assert not replicated.fits
    # Four 8B trees in bf16 (policy, reference, RM, value) are ~60 GiB on every chip.
    assert sum(replicated.resident[n] for n in ("policy", "ref", "rm", "value")) > 55 * plan.GiB
    assert "does not fit" in plan.shortfall([replicated])
    topo, best = plan.smallest_slice(cfg, opts, "v5e", compile_top=0)
    assert topo is not None and best.fits
    # Resident state alone (4 x 16 GB of weights + 2 x 64 GB of f32 Adam moments) needs > 13
    # chips' HBM, so no slice under 16 chips can hold it.
    n = len(plan.topology_devices(topo))
    assert n >= 16
    assert sum(best.resident.values()) < chip.hbm_bytes


def _concrete(tree):
    """Zeros with the shardings of a tree of placed ShapeDtypeStructs."""
    def one(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.device_put(jax.random.key(0), x.sharding)
        return jax.jit(lambda: jnp.zeros(x.shape, x.dtype), out_shardings=x.sharding)()
    return jax.tree.map(one, tree)


def _device0_bytes(tree) -> int:
    dev = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)
               for s in x.addressable_shards if s.device == dev)


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_planner_memory_matches_programs_run_on_8_cpu_devices(stage):
    """Per device: the planner's peak (resident trees not passed + the compiled program's
    arguments, outputs and temporaries) against the program run: the bytes device 0 holds for
    its arguments and results after the run, plus the executed program's temporaries, plus the
    resident trees it was not given."""
    devices = jax.devices()[:8]
    opts = plan.Options(stage=stage, mesh=(2, 2, 2), **SMALL)
    pl = plan.make_plan(TINY, opts, devices, plan.CHIPS["v5e"], compile=True)
    b, programs = plan.build_programs(TINY, opts, devices)
    res_total = sum(pl.resident.values())
    real_peak = 0
    for p in programs:
        args = _concrete(p.args)
        before = _device0_bytes(args)
        fn = jax.jit(p.fn, out_shardings=p.out_shardings, donate_argnums=p.donate)
        compiled = fn.lower(*args).compile()
        out = compiled(*args)
        jax.block_until_ready(out)
        live = _device0_bytes(out) + (0 if p.donate else before)
        if p.donate:  # donated arguments were consumed; the rest are still held
            live += sum(_device0_bytes(a) for i, a in enumerate(args) if i not in p.donate)
        others = res_total - sum(pl.resident[n] for n in p.resident)
        real_peak = max(real_peak, live + compiled.memory_analysis().temp_size_in_bytes + others)
    assert not pl.estimated
    assert abs(pl.peak - real_peak) <= 0.10 * real_peak, (pl.peak, real_peak)


def test_flop_count_matches_xla_for_an_unscanned_model():
    """The planner's model FLOPs against XLA's count of the same step with the layers unrolled
    (the cost analysis counts a scanned body once) and no rematerialisation."""
    # Matmul-dominated sizes: XLA also counts the elementwise work (norms, softmax, Adam), which
    # the model's FLOPs leave out; here it is ~0.5% of the total.
    cfg = models.ModelConfig(arch="llama", vocab_size=1024, d_model=512, n_layers=2, n_heads=8,
                             d_ff=2048, max_len=256)
    devices = jax.devices()[:1]
    opts = plan.Options(stage="sft", mesh=(1, 1, 1), batch=8, seq=128, remat="none",
                        param_dtype="float32", dtype="float32", scan_layers=False)
    _, (p,) = plan.build_programs(cfg, opts, devices)
    c = plan.compile_program(p)
    assert abs(c.cost_flops - p.hw_flops) <= 0.01 * p.hw_flops, (c.cost_flops, p.hw_flops)
