"""Compile-only planner: will a stage fit a TPU slice, on which mesh, and how fast at best?

    python -m rlhf_jax.plan --stage=ppo --model=llama-3.1-8b --topology=v5e:16x16 --batch=256

For a stage (sft, rm, dpo, ppo, grpo/rloo) it builds every jitted program the stage runs (the
train step; for on-policy stages the sampler's prefill and decode step, the scoring pass of the
policy / reference / reward / value models and the update) from abstract `ShapeDtypeStruct`
arguments placed by the project's own sharding rules (`sharding.logical_to_shardings` of the
models' logical axes, `trainer.opt_state_shardings`, `sharding.batch_sharding`, activations
through `sharding.activation_sharding`), compiles each one ahead of time for the target topology
(`jax.experimental.topologies`, libtpu's compiler, no TPU needed) and reports per chip:

- memory: parameters, optimizer state, frozen trees (exact, from the shardings), KV cache and the
  compiler's temporaries (`compiled.memory_analysis()`), against the chip's HBM;
- FLOPs per step from the model (the cost analysis counts a scanned layer body once, so it is
  only a cross-check for unscanned models), HBM bytes and ICI bytes (analytic), the collectives
  found in the compiled HLO with their sizes;
- a roofline step time max(compute, HBM, ICI) from the chip's published peaks and the MFU it
  implies; for the sampler, decode tokens/s per chip at the roofline.

Without `--mesh`, it searches (data x fsdp x tensor) and the memory options (remat policy,
microbatches): every candidate is screened analytically (parameter / optimizer / frozen bytes are
exact; activations are an estimate) and the best few are compiled to confirm. Each fitting
configuration is printed with the one-line override that selects it.

Everything here runs on CPU: set `JAX_PLATFORMS=cpu`; libtpu (from `jax[tpu]`) provides the
compiler. The planner imports no method module: its programs are built from the model and the
shared parts (ops, lm_head, trainer) with the same shapes and shardings as the stages use.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
from typing import Any, Callable

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other JAX processes may hold libtpu

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax import errors, models, ops, sharding, trainer
from rlhf_jax.models import presets
from rlhf_jax.errors import UserError

GiB = 2 ** 30

# ------------------------------------------------------------------------------------ chips

@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float  # bf16 FLOP/s per chip
    hbm_bytes: float  # per chip
    hbm_bw: float  # bytes/s per chip
    ici_bw: float  # bidirectional inter-chip bytes/s per chip
    source: str


# Published per-chip peaks (Google Cloud TPU documentation, checked 2026-12):
#   v5e: https://cloud.google.com/tpu/docs/v5e  197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s,
#        400 GB/s bidirectional ICI (libtpu itself reports 15.75 GiB usable; we use that).
#   v5p: https://cloud.google.com/tpu/docs/v5p  459 TFLOP/s, 95 GiB HBM2e at 2765 GB/s,
#        1200 GB/s bidirectional ICI.
#   v6e: https://cloud.google.com/tpu/docs/v6e  918 TFLOP/s, 32 GB HBM at 1638 GB/s,
#        800 GB/s bidirectional ICI.
#   v4:  https://cloud.google.com/tpu/docs/v4   275 TFLOP/s, 32 GiB HBM2 at 1200 GB/s; its ICI
#        figure was not re-checked here (we use 300 GB/s; ICI-bound v4 times are rough).
CHIPS = {
    "v5e": Chip("v5e", 197e12, 15.75 * GiB, 819e9, 400e9, "cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", 459e12, 95 * GiB, 2765e9, 1200e9, "cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", 918e12, 32 * GiB, 1638e9, 800e9, "cloud.google.com/tpu/docs/v6e"),
    "v4": Chip("v4", 275e12, 32 * GiB, 1200e9, 300e9, "cloud.google.com/tpu/docs/v4"),
}


def chip_of(topology: str) -> Chip:
    gen = topology.split(":")[0].lower()
    if gen not in CHIPS:
        raise UserError("--topology", f"{topology!r}: unknown TPU generation {gen!r}",
                        f"use one of {sorted(CHIPS)}, e.g. v5e:16x16")
    return CHIPS[gen]


def topology_devices(topology: str, num_slices: int = 1):
    """Abstract TPU devices of `topology` (e.g. "v5e:16x16"), compiled for with libtpu."""
    from jax.experimental import topologies

    chip_of(topology)
    try:
        desc = topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                            num_slices=num_slices)
    except Exception as e:  # noqa: BLE001 - libtpu's message names the problem
        raise UserError("--topology", f"{topology!r} could not be built: {e}".splitlines()[0],
                        "install jax[tpu] and use e.g. v5e:4x4, v5p:2x2x2, v6e:8x8") from None
    return list(desc.devices)


# ---------------------------------------------------------------------------------- models

# Real-size configurations: `rlhf_jax.models.presets` (built from the transformers config classes
# with the published hyperparameters, converted as a checkpoint import), plus a tiny model for
# tests and quick checks.
TINY = models.ModelConfig(arch="llama", vocab_size=512, d_model=128, n_layers=2, n_heads=4,
                          n_kv_heads=2, d_ff=512, max_len=512)
MODEL_NAMES = (*presets.NAMES, "tiny")


def model_config(name: str, **overrides) -> models.ModelConfig:
    if name == "tiny":
        return TINY.replace(**overrides)
    if name.lower() not in presets.NAMES and name.split("/")[-1].lower() not in presets.NAMES:
        raise UserError("--model", f"{name!r} is unknown", f"choose one of {list(MODEL_NAMES)}")
    return presets.model_config(name, **overrides)


# ---------------------------------------------------------------------------------- stages

STAGES = ("sft", "rm", "dpo", "ppo", "grpo", "rloo")


@dataclasses.dataclass(frozen=True)
class Options:
    """What a run chooses; the planner searches mesh, remat and microbatches."""

    stage: str = "sft"
    batch: int = 256  # sequences (SFT), pairs (RM, DPO), prompts (on-policy) per step
    seq: int = 2048  # SFT / RM / DPO sequence length
    prompt_len: int = 1024  # on-policy
    response_len: int = 1024  # on-policy
    samples: int = 4  # GRPO / RLOO completions per prompt
    mesh: tuple[int, int, int] = (1, -1, 1)  # data, fsdp, tensor
    remat: str = "full"
    microbatches: int = 1
    param_dtype: str = "bfloat16"
    dtype: str = "bfloat16"
    opt_dtype: str = "float32"  # Adam moments
    scan_layers: bool = True  # False: unrolled (the cost analysis then counts every layer)


def _opt(opt_dtype: str) -> optax.GradientTransformation:
    mu = None if opt_dtype == "float32" else jnp.dtype(opt_dtype)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(mu_dtype=mu),
                       optax.scale_by_learning_rate(1e-6))


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)


def per_chip_bytes(tree) -> int:
    """Bytes one device holds of a tree of placed ShapeDtypeStructs (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shard) * x.dtype.itemsize
    return total


@dataclasses.dataclass
class Program:
    name: str
    fn: Callable
    args: tuple
    out_shardings: Any = None
    donate: tuple = ()
    model_flops: float = 0.0  # whole step, all chips (the model's useful FLOPs)
    hw_flops: float = 0.0  # including rematerialisation
    hbm_bytes: float = 0.0  # per chip, analytic
    ici_bytes: float = 0.0  # per chip, analytic
    tokens: int = 0  # decode: tokens produced per step (all chips)
    resident: tuple = ()  # names of resident trees it takes


# -- analytic model counts -------------------------------------------------------------------

def matmul_params(cfg: models.ModelConfig, lm: bool = True) -> tuple[int, int]:
    """(parameters that multiply each token's activations in the trunk, in the LM head)."""
    D, H, KV, Dh, F = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head, cfg.ff_dim
    per_layer = D * H * Dh * 2 + 2 * D * KV * Dh + (2 if cfg.is_gpt2 else 3) * D * F
    return per_layer * cfg.n_layers, (D * cfg.vocab_size if lm else D)


def forward_flops(cfg: models.ModelConfig, rows: int, q_len: int, k_len: int,
                  lm_rows: int | None = None) -> float:
    """Matmul FLOPs of one forward: `rows` x `q_len` query tokens against `k_len` keys (the
    attention computes every query x key score: the XLA path skips no masked block) and
    `lm_rows` LM-head rows (default all query tokens)."""
    trunk, head = matmul_params(cfg)
    tokens = rows * q_len
    attn = 4 * cfg.n_heads * cfg.dim_per_head * k_len * cfg.n_layers  # QK^T and PV per token
    lm_tokens = tokens if lm_rows is None else lm_rows
    return 2.0 * trunk * tokens + attn * tokens + 2.0 * head * lm_tokens


# -- program builders ---------------------------------------------------------------------------

class Builder:
    """Abstract, placed arguments on one mesh, and the stage's programs over them."""

    def __init__(self, cfg: models.ModelConfig, opts: Options, devices):
        self.cfg = cfg.replace(param_dtype=opts.param_dtype, dtype=opts.dtype, remat=opts.remat,
                               scan_layers=opts.scan_layers)
        self.opts = opts
        try:
            self.mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, opts.mesh)), devices)
        except NotImplementedError:  # a mesh axis that splits a physical torus axis
            from jax.experimental import mesh_utils

            shape = sharding.mesh_shape(dict(zip(sharding.MESH_AXES, opts.mesh)), len(devices))
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
            self.mesh = jax.sharding.Mesh(grid, sharding.MESH_AXES, axis_types=(
                jax.sharding.AxisType.Auto,) * 3)
        self.rules = sharding.DEFAULT_RULES
        self.batch_sh = sharding.batch_sharding(self.mesh, self.rules)
        self.rep = NamedSharding(self.mesh, P())
        self.optimizer = _opt(opts.opt_dtype)
        self.trees: dict[str, Any] = {}  # resident name -> placed abstract tree

    # trees
    def params(self, name: str, heads=("lm",)):
        abstract = models.abstract_params(self.cfg, tuple(heads))
        sh = sharding.logical_to_shardings(models.param_axes(self.cfg, tuple(heads)), self.mesh,
                                           self.rules, abstract)
        self.trees[name] = _abstract(abstract, sh)
        return self.trees[name]

    def opt_state(self, name: str, params):
        abstract = jax.eval_shape(self.optimizer.init, params)
        sh = trainer.opt_state_shardings(abstract, params,
                                         jax.tree.map(lambda x: x.sharding, params), self.mesh)
        self.trees[name] = _abstract(abstract, sh)
        return self.trees[name]

    def rows(self, shape, dtype=jnp.int32):
        spec = sharding.logical_to_spec(("batch",) + (None,) * (len(shape) - 1), self.rules,
                                        shape, self.mesh)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(self.mesh, spec))

    def scalar(self, dtype=jnp.float32):
        return jax.ShapeDtypeStruct((), dtype, sharding=self.rep)

    def key(self):
        return jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=self.rep)

    def wrap(self, fn):
        return sharding.activation_sharding(fn, self.mesh, self.rules)

    # per-chip analytic traffic
    @property
    def n(self) -> int:
        return self.mesh.devices.size

    def _ax(self, a):
        return self.mesh.shape[a]

    def train_traffic(self, tree_bytes_full: int, rows: int, seq: int) -> tuple[float, float]:
        """(HBM bytes, ICI bytes) per chip of one train step over a model of `tree_bytes_full`
        parameter bytes with `rows` x `seq` tokens (global): weights read per pass, optimizer
        read/write, saved activations; FSDP gathers / scatters, data all-reduce, tensor
        all-reduces of the residual stream."""
        cfg, d, f, t = self.cfg, self._ax("data"), self._ax("fsdp"), self._ax("tensor")
        passes = 3 + (cfg.remat != "none")
        itemsize = jnp.dtype(cfg.param_dtype).itemsize
        opt_item = jnp.dtype(self.opts.opt_dtype).itemsize
        shard = tree_bytes_full / (f * t)
        n_params = tree_bytes_full / itemsize
        local_tokens = rows * seq / (d * f)
        act = local_tokens * cfg.d_model * jnp.dtype(cfg.dtype).itemsize
        hbm = (passes * tree_bytes_full / t + shard * 4
               + 2 * n_params / (f * t) * opt_item * 2
               + act * cfg.n_layers * (2 + 12 * passes))
        ici = (passes * tree_bytes_full / t * (f - 1) / f  # all-gathers of the weights
               + tree_bytes_full / t * (f - 1) / f  # reduce-scatter of the gradients
               + 2 * shard * (d - 1) / d  # all-reduce of gradients over data
               + (2 * (t - 1) / t * act * 2 * cfg.n_layers * passes if t > 1 else 0))
        return hbm, ici

    def forward_traffic(self, tree_bytes_full: int, rows: int, seq: int,
                        kv_bytes_chip: float = 0.0) -> tuple[float, float]:
        cfg, d, f, t = self.cfg, self._ax("data"), self._ax("fsdp"), self._ax("tensor")
        local_tokens = rows * seq / (d * f)
        act = local_tokens * cfg.d_model * jnp.dtype(cfg.dtype).itemsize
        hbm = tree_bytes_full / t + kv_bytes_chip + act * cfg.n_layers * 12
        ici = (tree_bytes_full / t * (f - 1) / f
               + (2 * (t - 1) / t * act * 2 * cfg.n_layers if t > 1 else 0))
        return hbm, ici

    def tree_bytes_full(self, name: str) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.trees[name]))

    # programs
    def train_program(self, name, loss_fn, param_names, frozen_names, batch) -> Program:
        """`trainer.make_train_step` over the trainable trees (a dict) with frozen trees."""
        params = {n: self.trees[n] for n in param_names}
        opt = self.opt_state("opt", params)
        state = trainer.TrainState(step=self.scalar(jnp.int32), params=params, opt_state=opt,
                                   extra={})
        frozen = {n: self.trees[n] for n in frozen_names} or None
        step = trainer.make_train_step(loss_fn, self.optimizer, self.opts.microbatches)
        state_sh = jax.tree.map(lambda x: x.sharding, state)
        return Program(name, self.wrap(step), (state, frozen, batch, self.key()),
                       out_shardings=(state_sh, self.rep), donate=(0,),
                       resident=tuple(param_names) + ("opt",) + tuple(frozen_names))


def _last_token_scores(cfg, params, tokens, mask):
    out = models.forward(cfg, params, tokens, models.positions_from_mask(mask), mask,
                         want_logits=False)
    last = jnp.maximum(jnp.sum(mask, -1) - 1, 0)
    return jnp.take_along_axis(out["scores"], last[:, None], 1)[:, 0]


def build_programs(cfg: models.ModelConfig, opts: Options, devices) -> tuple[Builder,
                                                                              list[Program]]:
    """Every jitted program of `opts.stage`, with abstract placed arguments."""
    if opts.stage not in STAGES:
        raise UserError("--stage", f"{opts.stage!r} is unknown", f"choose one of {STAGES}")
    b = Builder(cfg, opts, devices)
    cfg = b.cfg
    B, T = opts.batch, opts.seq
    remat_extra = 1.0 if cfg.remat != "none" else 0.0
    programs = []

    if opts.stage == "sft":
        b.params("policy")
        batch = {"tokens": b.rows((B, T)), "mask": b.rows((B, T)), "loss_mask": b.rows((B, T))}

        def loss(params, frozen, mb, key):
            return ops.lm_loss_sums(cfg, params["policy"], mb)

        p = b.train_program("train_step", loss, ["policy"], [], batch)
        fwd = forward_flops(cfg, B, T, T, lm_rows=B * (T - 1))  # shifted targets
        p.model_flops, p.hw_flops = 3 * fwd, (3 + remat_extra) * fwd
        p.hbm_bytes, p.ici_bytes = b.train_traffic(b.tree_bytes_full("policy"), B, T)
        programs.append(p)

    elif opts.stage == "rm":
        b.params("rm", ("score",))
        batch = {"tokens": b.rows((2 * B, T)), "mask": b.rows((2 * B, T))}

        def loss(params, frozen, mb, key):
            s = _last_token_scores(cfg, params["rm"], mb["tokens"], mb["mask"])
            margin = s[0::2] - s[1::2]
            return -jnp.sum(jax.nn.log_sigmoid(margin)), {"count": jnp.float32(margin.shape[0])}

        p = b.train_program("train_step", loss, ["rm"], [], batch)
        fwd = forward_flops(cfg, 2 * B, T, T, lm_rows=0)
        p.model_flops, p.hw_flops = 3 * fwd, (3 + remat_extra) * fwd
        p.hbm_bytes, p.ici_bytes = b.train_traffic(b.tree_bytes_full("rm"), 2 * B, T)
        programs.append(p)

    elif opts.stage == "dpo":
        b.params("policy")
        b.params("ref")
        batch = {"tokens": b.rows((2 * B, T)), "mask": b.rows((2 * B, T)),
                 "loss_mask": b.rows((2 * B, T))}

        def seq_logp(params, mb):
            logp, _ = ops.token_logprobs(cfg, params, mb["tokens"], mb["mask"])
            return jnp.sum(logp * mb["loss_mask"][:, 1:], -1)

        def loss(params, frozen, mb, key):
            lp = seq_logp(params["policy"], mb)
            ref = jax.lax.stop_gradient(seq_logp(frozen["ref"], mb))
            m = (lp[0::2] - ref[0::2]) - (lp[1::2] - ref[1::2])
            return -jnp.sum(jax.nn.log_sigmoid(0.1 * m)), {"count": jnp.float32(m.shape[0])}

        p = b.train_program("train_step", loss, ["policy"], ["ref"], batch)
        fwd = forward_flops(cfg, 2 * B, T, T, lm_rows=2 * B * (T - 1))
        p.model_flops, p.hw_flops = 4 * fwd, (4 + remat_extra) * fwd
        h1, i1 = b.train_traffic(b.tree_bytes_full("policy"), 2 * B, T)
        h2, i2 = b.forward_traffic(b.tree_bytes_full("ref"), 2 * B, T)
        p.hbm_bytes, p.ici_bytes = h1 + h2, i1 + i2
        programs.append(p)

    else:  # on-policy: ppo, grpo, rloo
        programs = _onpolicy_programs(b, opts)
    return b, programs


def _onpolicy_programs(b: Builder, opts: Options) -> list[Program]:
    cfg = b.cfg
    ppo = opts.stage == "ppo"
    rows = opts.batch * (1 if ppo else opts.samples)
    Pl, N = opts.prompt_len, opts.response_len
    S = Pl + N
    remat_extra = 1.0 if cfg.remat != "none" else 0.0
    b.params("policy")
    b.params("ref")
    b.params("rm", ("score",))
    if ppo:
        b.params("value", ("score",))
    programs = []

    # Sampler: the cache is [B, kv_heads, S, head_dim] per layer, placed by CACHE axes.
    def cache_tree():
        one = jax.ShapeDtypeStruct((rows, cfg.kv_heads, S, cfg.dim_per_head), jnp.dtype(cfg.dtype))
        spec = lambda ax, shape: NamedSharding(b.mesh, sharding.logical_to_spec(  # noqa: E731
            ax, b.rules, shape, b.mesh))
        layer = jax.ShapeDtypeStruct(one.shape, one.dtype,
                                     sharding=spec(models.transformer.CACHE_LAYER_AXES, one.shape))
        mask = jax.ShapeDtypeStruct((rows, S), jnp.bool_,
                                    sharding=spec(models.transformer.CACHE_MASK_AXES, (rows, S)))
        return {"k": (layer,) * cfg.n_layers, "v": (layer,) * cfg.n_layers, "mask": mask}

    cache = cache_tree()
    kv_chip = per_chip_bytes({"k": cache["k"], "v": cache["v"]})
    dparams = b.trees["policy"]

    def prefill(params, tokens, mask, cache):
        pos = models.positions_from_mask(mask)
        out = models.forward(cfg, params, tokens, pos, mask, cache=cache, cache_index=0,
                             want_logits=False)
        return models.lm_logits(cfg, params, out["hidden"][:, -1:]), out["cache"]

    cache_sh = jax.tree.map(lambda x: x.sharding, cache)
    p = Program("sample_prefill", b.wrap(prefill),
                (dparams, b.rows((rows, Pl)), b.rows((rows, Pl)), cache),
                out_shardings=(None, cache_sh), donate=(3,), resident=("policy",))
    p.model_flops = p.hw_flops = forward_flops(cfg, rows, Pl, S, lm_rows=rows)
    p.hbm_bytes, p.ici_bytes = b.forward_traffic(b.tree_bytes_full("policy"), rows, Pl, kv_chip)
    programs.append(p)

    def decode(params, token, pos, cache, index):
        mask = jnp.ones_like(token)
        out = models.forward(cfg, params, token, pos, mask, cache=cache, cache_index=index,
                             want_logits=False)
        return models.lm_logits(cfg, params, out["hidden"]), out["cache"]

    p = Program("sample_decode_step", b.wrap(decode),
                (dparams, b.rows((rows, 1)), b.rows((rows, 1)), cache, b.scalar(jnp.int32)),
                out_shardings=(None, cache_sh), donate=(3,), resident=("policy",), tokens=rows)
    p.model_flops = p.hw_flops = forward_flops(cfg, rows, 1, S)
    p.hbm_bytes, p.ici_bytes = b.forward_traffic(b.tree_bytes_full("policy"), rows, 1, kv_chip)
    programs.append(p)

    # Scoring: policy / reference log-probs, RM score (and values) over the full sequences.
    names = ["policy", "ref", "rm"] + (["value"] if ppo else [])

    def score(trees, tokens, mask):
        out = {"logp": ops.token_logprobs(cfg, trees["policy"], tokens, mask)[0],
               "ref_logp": ops.token_logprobs(cfg, trees["ref"], tokens, mask)[0],
               "reward": _last_token_scores(cfg, trees["rm"], tokens, mask)}
        if ppo:
            out["values"] = models.forward(cfg, trees["value"], tokens,
                                           models.positions_from_mask(mask), mask,
                                           want_logits=False)["scores"]
        return out

    p = Program("score_passes", b.wrap(score),
                ({n: b.trees[n] for n in names}, b.rows((rows, S)), b.rows((rows, S))),
                resident=tuple(names))
    lm_fwd = forward_flops(cfg, rows, S, S, lm_rows=rows * (S - 1))
    head_fwd = forward_flops(cfg, rows, S, S, lm_rows=0)
    p.model_flops = p.hw_flops = 2 * lm_fwd + (2 if ppo else 1) * head_fwd
    hb = [b.forward_traffic(b.tree_bytes_full(n), rows, S) for n in names]
    p.hbm_bytes, p.ici_bytes = sum(h for h, _ in hb), sum(i for _, i in hb)
    programs.append(p)

    # The update: clipped policy-gradient loss (+ the value loss for PPO), Adam on the trainees.
    trainees = ["policy"] + (["value"] if ppo else [])
    batch = {"tokens": b.rows((rows, S)), "mask": b.rows((rows, S)),
             "loss_mask": b.rows((rows, S)), "old_logp": b.rows((rows, S - 1), jnp.float32),
             "ref_logp": b.rows((rows, S - 1), jnp.float32),
             "advantages": b.rows((rows, S - 1), jnp.float32),
             "returns": b.rows((rows, S), jnp.float32)}

    def loss(params, frozen, mb, key):
        w = mb["loss_mask"][:, 1:].astype(jnp.float32)
        logp, _ = ops.token_logprobs(cfg, params["policy"], mb["tokens"], mb["mask"])
        ratio = jnp.exp(logp - mb["old_logp"])
        adv = mb["advantages"]
        pg = -jnp.minimum(ratio * adv, jnp.clip(ratio, 0.8, 1.2) * adv)
        total = jnp.sum((pg + 0.05 * (logp - mb["ref_logp"])) * w)
        if ppo:
            v = models.forward(cfg, params["value"], mb["tokens"],
                               models.positions_from_mask(mb["mask"]), mb["mask"],
                               want_logits=False)["scores"]
            total = total + 0.5 * jnp.sum(jnp.square(v - mb["returns"]) * mb["loss_mask"])
        return total, {"count": jnp.sum(w)}

    p = b.train_program("update", loss, trainees, [], batch)
    fwd = lm_fwd + (head_fwd if ppo else 0)
    p.model_flops, p.hw_flops = 3 * fwd, (3 + remat_extra) * fwd
    tb = [b.train_traffic(b.tree_bytes_full(n), rows, S) for n in trainees]
    p.hbm_bytes, p.ici_bytes = sum(h for h, _ in tb), sum(i for _, i in tb)
    programs.append(p)
    return programs


# --------------------------------------------------------------------------------- compiling

_COLLECTIVE = re.compile(r"=\s*(.*?)\s(all-gather|reduce-scatter|all-reduce|all-to-all|"
                         r"collective-permute)(?:-start)?\(")
_SHAPE = re.compile(r"(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64)\[([\d,]*)\]")
_ITEM = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
         "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def hlo_collectives(hlo: str) -> dict[str, tuple[int, int]]:
    """{kind: (count, result bytes per chip)} of the collectives in a compiled HLO text. Each
    op is counted once as written: one inside a scanned layer's loop body runs once per layer."""
    out: dict[str, list[int]] = {}
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if m is None:
            continue
        shapes, kind = m.group(1), m.group(2)
        size = sum(_ITEM[t] * math.prod(int(d) for d in dims.split(",") if d)
                   for t, dims in _SHAPE.findall(shapes))
        c = out.setdefault(kind, [0, 0])
        c[0] += 1
        c[1] += size
    return {k: (v[0], v[1]) for k, v in out.items()}


@dataclasses.dataclass
class Compiled:
    program: Program
    ok: bool
    argument: int = 0
    output: int = 0
    alias: int = 0
    temp: int = 0
    cost_flops: float = 0.0
    collectives: dict = dataclasses.field(default_factory=dict)
    error: str = ""
    seconds: float = 0.0

    @property
    def total(self) -> int:
        """Per-chip bytes live while it runs: arguments + outputs not aliased to them + temps."""
        return self.argument + self.output - self.alias + self.temp


def compile_program(p: Program) -> Compiled:
    t0 = time.time()
    fn = jax.jit(p.fn, out_shardings=p.out_shardings, donate_argnums=p.donate)
    try:
        compiled = fn.lower(*p.args).compile()
    except Exception as e:  # noqa: BLE001 - XLA's out-of-memory is the answer, not a crash
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg and "Ran out of memory" not in msg:
            raise
        m = re.search(r"required for HLO temporaries \(([\d.]+)([GMK])\)", msg)
        temp = int(float(m.group(1)) * {"G": 1e9, "M": 1e6, "K": 1e3}[m.group(2)]) if m else 0
        return Compiled(p, False, argument=per_chip_bytes(p.args), temp=temp,
                        error=msg.splitlines()[0][:200], seconds=time.time() - t0)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return Compiled(p, True, argument=mem.argument_size_in_bytes,
                    output=mem.output_size_in_bytes, alias=mem.alias_size_in_bytes,
                    temp=mem.temp_size_in_bytes, cost_flops=float((cost or {}).get("flops", 0)),
                    collectives=hlo_collectives(compiled.as_text()),
                    seconds=time.time() - t0)


# ---------------------------------------------------------------------------------- the plan

@dataclasses.dataclass
class Plan:
    opts: Options
    chip: Chip
    n_chips: int
    resident: dict  # tree -> per-chip bytes
    kv_cache: int
    programs: list  # Compiled (or Program when not compiled)
    peak: int  # per-chip bytes at the stage's peak
    estimated: bool  # True: activations from the analytic estimate (not compiled)
    step_time: float
    bound: str
    mfu: float
    model_flops: float
    decode_tok_s_chip: float | None

    @property
    def fits(self) -> bool:
        return self.peak <= self.chip.hbm_bytes and all(
            getattr(c, "ok", True) for c in self.programs)

    @property
    def headroom(self) -> float:
        return self.chip.hbm_bytes - self.peak

    def override(self) -> str:
        d, f, t = self.opts.mesh
        return (f"--config.mesh.data={d} --config.mesh.fsdp={f} --config.mesh.tensor={t} "
                f"--config.model.remat={self.opts.remat} "
                f"--config.train.accum_steps={self.opts.microbatches}")


def _activation_estimate(b: Builder, p: Program) -> int:
    """Rough per-chip temporaries of a program (used only to rank candidates before compiling):
    saved residuals per layer under remat, one layer's working set, the LM head's chunk."""
    cfg, d, f, t = b.cfg, b._ax("data"), b._ax("fsdp"), b._ax("tensor")
    toks = [x for x in jax.tree.leaves(p.args) if x.dtype == jnp.int32 and x.ndim == 2]
    if not toks:
        return 0
    rows, seq = toks[0].shape
    mb = b.opts.microbatches if p.name in ("train_step", "update") else 1
    local = rows / (d * f) / mb
    it = jnp.dtype(cfg.dtype).itemsize
    D, F, H = cfg.d_model, cfg.ff_dim / t, cfg.n_heads / t
    train = p.name in ("train_step", "update")
    kept = {"full": 1, "dots": 6, "none": 14}[cfg.remat] if train else 0
    resid = local * seq * D * it * cfg.n_layers * kept
    layer = local * seq * (8 * D + 4 * F) * it + local * H * seq * (seq if seq > 1 else 1) * 10
    full_params = max(b.tree_bytes_full(n) for n in p.resident) / t / max(1, cfg.n_layers)
    return int(resid + layer * (2 if train else 1) + 4 * full_params)


def make_plan(cfg: models.ModelConfig, opts: Options, devices, chip: Chip,
              compile: bool = True) -> Plan:
    b, programs = build_programs(cfg, opts, devices)
    resident = {n: per_chip_bytes(t) for n, t in b.trees.items()}
    res_total = sum(resident.values())
    kv = 0
    results, peak, estimated = [], 0, not compile
    for p in programs:
        in_args = sum(resident[n] for n in p.resident)
        others = res_total - in_args
        if p.name.startswith("sample"):
            kv = per_chip_bytes(p.args[3])
        if compile and res_total <= chip.hbm_bytes:
            c = compile_program(p)
            results.append(c)
            peak = max(peak, c.total + others)
        else:
            results.append(p)
            peak = max(peak, res_total + per_chip_bytes(p.args) - in_args
                       + _activation_estimate(b, p))
            estimated = True
    # Roofline: each program's max(compute, HBM, ICI) bound; the step runs each once, except the
    # decode step (response_len times).
    total_t, bound_t, mflops = 0.0, {}, 0.0
    decode = None
    n = b.n
    for p in programs:
        times = {"compute": p.hw_flops / n / chip.peak_flops, "hbm": p.hbm_bytes / chip.hbm_bw,
                 "ici": p.ici_bytes / chip.ici_bw}
        t = max(times.values())
        reps = opts.response_len - 1 if p.name == "sample_decode_step" else 1
        if p.name == "sample_decode_step":
            decode = p.tokens / n / t
        total_t += t * reps
        k = max(times, key=times.get)
        bound_t[k] = bound_t.get(k, 0.0) + t * reps
        mflops += p.model_flops * reps
    mfu = mflops / n / chip.peak_flops / total_t if total_t else 0.0
    return Plan(opts, chip, n, resident, kv, results, peak, estimated, total_t,
                max(bound_t, key=bound_t.get), mfu, mflops, decode)


def candidate_meshes(n: int, cfg: models.ModelConfig, rows: int):
    """(data, fsdp, tensor) with tensor dividing kv_heads and data x fsdp dividing the rows."""
    for t in (1, 2, 4, 8):
        if n % t or cfg.kv_heads % t or cfg.ff_dim % t:
            continue
        rest = n // t
        f = 1
        while f <= rest:
            if rest % f == 0 and rows % rest == 0:
                yield (rest // f, f, t)
            f *= 2


def search(cfg, opts: Options, devices, chip: Chip, compile_top: int = 1,
           remats=("full", "dots", "none"), microbatches=(1, 2, 4, 8)) -> list[Plan]:
    """Screen every (mesh, remat, microbatches) analytically; compile the `compile_top` best
    that the screen says fit (fastest roofline first). Returns the screened plans, fitting ones
    first, best first; compiled plans carry compiled memory."""
    n = len(devices)
    rows = opts.batch * (opts.samples if opts.stage in ("grpo", "rloo") else 1) * (
        2 if opts.stage in ("rm", "dpo") else 1)
    screened = []
    for mesh in candidate_meshes(n, cfg, rows):
        for remat in remats:
            for mb in microbatches:
                if (rows // (mesh[0] * mesh[1])) % mb:
                    continue
                o = dataclasses.replace(opts, mesh=mesh, remat=remat, microbatches=mb)
                screened.append(make_plan(cfg, o, devices, chip, compile=False))
    key = lambda pl: (not pl.fits, pl.step_time, pl.peak)  # noqa: E731
    screened.sort(key=key)
    done = []
    for pl in [p for p in screened if p.fits][:compile_top]:
        done.append(make_plan(cfg, pl.opts, devices, chip, compile=True))
    rest = [p for p in screened if all(p.opts != d.opts for d in done)]
    return sorted(done, key=key) + rest


# ------------------------------------------------------------------------------------ report

def _g(x: float) -> str:
    return f"{x / GiB:.2f}"


def describe(pl: Plan) -> str:
    o = pl.opts
    lines = [f"{o.stage} on {pl.n_chips} x {pl.chip.name} (HBM {_g(pl.chip.hbm_bytes)} GiB/chip), "
             f"mesh data={o.mesh[0]} fsdp={o.mesh[1]} tensor={o.mesh[2]}, remat={o.remat}, "
             f"microbatches={o.microbatches}: "
             + ("FITS" if pl.fits else "DOES NOT FIT")
             + f", peak {_g(pl.peak)} GiB/chip ({'estimated' if pl.estimated else 'compiled'}), "
             f"headroom {_g(pl.headroom)} GiB"]
    lines.append("  resident per chip: " + ", ".join(f"{k} {_g(v)} GiB"
                                                      for k, v in pl.resident.items())
                 + (f"; KV cache {_g(pl.kv_cache)} GiB" if pl.kv_cache else ""))
    for c in pl.programs:
        if isinstance(c, Compiled):
            colls = ", ".join(f"{k} x{n} {v / 2**20:.1f} MiB" for k, (n, v) in
                              sorted(c.collectives.items()))
            lines.append(
                f"  {c.program.name}: args {_g(c.argument)} + temps {_g(c.temp)} + out "
                f"{_g(c.output - c.alias)} GiB{'' if c.ok else ' (OUT OF MEMORY: ' + c.error + ')'}"
                f"; model FLOPs {c.program.model_flops:.3g} (cost analysis, scan body once: "
                f"{c.cost_flops * pl.n_chips:.3g}); collectives: {colls or 'none'} "
                f"[compiled in {c.seconds:.0f} s]")
        else:
            lines.append(f"  {c.name}: model FLOPs {c.model_flops:.3g} (not compiled)")
    lines.append(f"  roofline step {pl.step_time:.3g} s ({pl.bound}-bound), MFU bound "
                 f"{pl.mfu:.1%}" + (f", decode {pl.decode_tok_s_chip:.0f} tok/s/chip"
                                    if pl.decode_tok_s_chip else ""))
    return "\n".join(lines)


def shortfall(plans: list[Plan]) -> str:
    best = min(plans, key=lambda p: p.peak)
    where = ("anywhere on this topology: the smallest configuration" if len(plans) > 1
             else "with")
    return (f"does not fit {where} "
            f"({best.override()}) needs {_g(best.peak)} GiB per chip, "
            f"{_g(-best.headroom)} GiB more than the {_g(best.chip.hbm_bytes)} GiB of HBM")


def smallest_slice(cfg, opts: Options, generation: str, compile_top: int = 0):
    """The smallest slice of `generation` on which some searched configuration fits."""
    shapes = {"v5e": ["2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"],
              "v6e": ["2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"],
              "v5p": ["2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8"],
              "v4": ["2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8"]}
    for shape in shapes[generation]:
        topo = f"{generation}:{shape}"
        plans = search(cfg, opts, topology_devices(topo), CHIPS[generation], compile_top)
        if plans and plans[0].fits:
            return topo, plans[0]
    return None, None


TABLE_TOPOLOGIES = ("v5e:4x4", "v5e:8x8", "v5e:16x16", "v5p:4x4x4", "v6e:8x8", "v6e:16x16")
TABLE_MODELS = ("qwen2.5-0.5b", "qwen3-1.7b", "llama-3.1-8b", "llama-3.1-70b")
TABLE_STAGES = {"sft": dict(batch=256, seq=2048), "rm": dict(batch=128, seq=2048),
                "dpo": dict(batch=128, seq=2048),
                "ppo": dict(batch=256, prompt_len=1024, response_len=1024),
                "grpo": dict(batch=64, samples=4, prompt_len=1024, response_len=1024)}


def scale_table(compile_top: int = 0, models_=TABLE_MODELS, out=sys.stdout) -> None:
    """The scale table of docs/scaling.md: every stage x model x topology, best screened
    configuration (compile_top=0: resident memory exact, activations estimated). The table
    searches remat=full and 1 or 4 microbatches (the full search is the per-row command)."""
    print("| stage | model | slice | fits | mesh (d,f,t) remat mb | GiB/chip | step s (bound) | "
          "MFU bound | decode tok/s/chip | regenerate |", file=out)
    print("|---|---|---|---|---|---|---|---|---|---|", file=out)
    for stage, kw in TABLE_STAGES.items():
        for model in models_:
            for topo in TABLE_TOPOLOGIES:
                cfg = model_config(model)
                opts = Options(stage=stage, **kw)
                chip = chip_of(topo)
                plans = search(cfg, opts, topology_devices(topo), chip, compile_top,
                               remats=("full",), microbatches=(1, 4))
                pl = plans[0]
                flags = " ".join(f"--{k}={v}" for k, v in kw.items())
                cmd = (f"`python -m rlhf_jax.plan --stage={stage} --model={model} "
                       f"--topology={topo} {flags}`")
                # Slice names count chips for v5e / v6e and TensorCores (2 per chip) for v5p / v4.
                gen, n_dev = topo.split(":")[0], len(topology_devices(topo))
                name = f"{gen}-{n_dev * (2 if gen in ('v5p', 'v4') else 1)}"
                if not pl.fits:
                    print(f"| {stage} | {model} | {name} | no: short "
                          f"{_g(-pl.headroom)} GiB/chip | | {_g(pl.peak)} | | | | {cmd} |",
                          file=out)
                    continue
                o = pl.opts
                dec = f"{pl.decode_tok_s_chip:.0f}" if pl.decode_tok_s_chip else ""
                print(f"| {stage} | {model} | {name} | yes | {o.mesh} {o.remat} "
                      f"{o.microbatches} | {_g(pl.peak)} | {pl.step_time:.3g} ({pl.bound}) | "
                      f"{pl.mfu:.0%} | {dec} | {cmd} |", file=out, flush=True)


def main(argv=None) -> int:
    ap = errors.ArgumentParser(prog="python -m rlhf_jax.plan", description=__doc__.split(
        "\n\n")[0])
    ap.add_argument("--stage", default="sft", choices=STAGES)
    ap.add_argument("--model", default="llama-3.1-8b", help=f"one of {list(MODEL_NAMES)}")
    ap.add_argument("--topology", default="v5e:16x16")
    ap.add_argument("--num_slices", type=int, default=1)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--prompt_len", type=int, default=1024)
    ap.add_argument("--response_len", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--mesh", default="", help="data,fsdp,tensor (skip the search)")
    ap.add_argument("--remat", default="full")
    ap.add_argument("--microbatches", type=int, default=1)
    ap.add_argument("--param_dtype", default="bfloat16")
    ap.add_argument("--opt_dtype", default="float32")
    ap.add_argument("--compile_top", type=int, default=1,
                    help="how many of the best screened configurations to compile")
    ap.add_argument("--show", type=int, default=5, help="configurations to print")
    ap.add_argument("--smallest", action="store_true",
                    help="find the smallest slice of the topology's generation that fits")
    ap.add_argument("--table", action="store_true", help="print the scale table (docs/scaling.md)")
    ap.add_argument("--table_models", default="", help="--table: comma-separated models")
    ap.add_argument("--table_compile", type=int, default=0,
                    help="--table: compile this many best configurations per row (0: screen only)")
    a = ap.parse_args(argv)
    if a.table:
        scale_table(a.table_compile, a.table_models.split(",") if a.table_models
                    else TABLE_MODELS)
        return 0
    if jax.default_backend() != "cpu":
        print("note: the planner compiles for TPU from any host; run it with JAX_PLATFORMS=cpu",
              file=sys.stderr)
    cfg = model_config(a.model)
    opts = Options(stage=a.stage, batch=a.batch, seq=a.seq, prompt_len=a.prompt_len,
                   response_len=a.response_len, samples=a.samples, remat=a.remat,
                   microbatches=a.microbatches, param_dtype=a.param_dtype,
                   opt_dtype=a.opt_dtype)
    chip = chip_of(a.topology)
    if a.smallest:
        topo, pl = smallest_slice(cfg, opts, chip.name, a.compile_top)
        print(f"smallest {chip.name} slice that fits: {topo}" if topo else
              f"no {chip.name} slice up to the largest searched fits")
        if pl:
            print(describe(pl))
        return 0
    devices = topology_devices(a.topology, a.num_slices)
    if a.mesh:
        mesh = tuple(int(x) for x in a.mesh.split(","))
        if len(mesh) != 3:
            raise UserError("--mesh", f"{a.mesh!r} must be data,fsdp,tensor", "e.g. 1,256,1")
        pl = make_plan(cfg, dataclasses.replace(opts, mesh=mesh), devices, chip)
        print(describe(pl))
        if not pl.fits:
            print(shortfall([pl]))
        return 0
    plans = search(cfg, opts, devices, chip, a.compile_top)
    fitting = [p for p in plans if p.fits]
    if not fitting:
        print(f"{a.stage} {a.model} on {a.topology}: " + shortfall(plans))
        return 1
    for pl in fitting[:a.show]:
        print(describe(pl))
        print(f"  override: {pl.override()}")
    return 0


if __name__ == "__main__":
    argv, verbose = errors.pop_verbose(sys.argv)
    raise SystemExit(errors.report_user_errors(main, argv[1:], verbose=verbose))
