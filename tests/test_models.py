"""The decoder family on its own: parameter tree and axes, KV cache, padding, packing, scan/remat,
bf16 compute, and sharding over a data×fsdp×tensor mesh (8 CPU devices from conftest)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models, sharding
from rlhf_jax.models import transformer

V = 64
ARCHES = ["llama", "gpt2"]


def _cfg(arch, **kw):
    base = dict(arch=arch, vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_len=32)
    if arch == "llama":
        # GQA, Qwen2-style biases and an untied head exercise the most code; gpt2 stays tied.
        base.update(n_kv_heads=2, qkv_bias=True, tie_embeddings=False)
    base.update(kw)
    return models.ModelConfig(**base)


# Jitted once per (config, shapes): eager op-by-op dispatch would dominate these tiny tests.
_forward = jax.jit(models.forward, static_argnums=0)


@jax.jit(static_argnums=(0, 1))
def _params(cfg, heads=("lm", "score"), seed=0):
    # Scaled-up init: logits of std ~1 instead of ~0.1, so mismatches cannot hide in rounding.
    p = models.init_params(cfg, jax.random.key(seed), heads=heads)
    return jax.tree.map(lambda x: x * 3.0, p)


def _logits(cfg, params, tokens, mask, positions=None, **kw):
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    positions = models.positions_from_mask(mask) if positions is None else jnp.asarray(positions)
    return np.asarray(_forward(cfg, params, tokens, positions, mask, **kw)["logits"])


_alone_cache: dict = {}


def _alone(cfg, params, row):
    """Logits of one unpadded row on its own (memoised: each distinct length costs a compile)."""
    key = (cfg, tuple(row))
    if key not in _alone_cache:
        _alone_cache[key] = _logits(cfg, params, np.array([row]), np.ones((1, len(row))))[0]
    return _alone_cache[key]


def _left_pad(rows, length):
    tokens = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        tokens[i, length - len(r):] = r
        mask[i, length - len(r):] = 1
    return tokens, mask


ROWS = [[5, 9, 17, 3, 8, 2, 60, 33], [3, 4, 5], [40, 41, 42, 43, 44, 1], [7]]


@pytest.mark.parametrize("arch", ARCHES)
def test_param_tree_axes_and_heads(arch):
    cfg = _cfg(arch)
    params = _params(cfg)
    axes = models.param_axes(cfg, heads=("lm", "score"))
    flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_a = dict(jax.tree_util.tree_flatten_with_path(axes, is_leaf=sharding.is_axes_leaf)[0])
    assert len(flat_p) == len(flat_a)
    for path, x in flat_p:
        assert len(flat_a[path]) == x.ndim, path
    L, D, Dh = cfg.n_layers, cfg.d_model, cfg.dim_per_head
    assert params["layers"]["q"]["kernel"].shape == (L, D, cfg.n_heads, Dh)
    assert params["layers"]["k"]["kernel"].shape == (L, D, cfg.kv_heads, Dh)
    assert params["layers"]["o"]["kernel"].shape == (L, cfg.n_heads, Dh, D)
    assert axes["layers"]["o"]["kernel"] == ("layers", "heads", "head_dim", "embed")
    assert params["score_head"]["kernel"].shape == (D,) and params["score_head"]["bias"].shape == ()
    assert ("lm_head" in params) == (not cfg.tie_embeddings)
    assert ("pos_embed" in params) == (arch == "gpt2")
    assert models.param_count(cfg, ("lm", "score")) == sum(x.size for x in jax.tree.leaves(params))
    out = _forward(cfg, params, jnp.zeros((2, 5), jnp.int32), jnp.zeros((2, 5), jnp.int32),
                   jnp.ones((2, 5), bool))
    assert out["logits"].shape == (2, 5, V) and out["scores"].shape == (2, 5)
    assert out["logits"].dtype == jnp.float32


@pytest.mark.parametrize("arch", ARCHES)
def test_kv_cache_decode_equals_full_forward(arch):
    """Prefill a left-padded prompt, then decode token by token: same logits as one full pass."""
    cfg = _cfg(arch)
    params = _params(cfg)
    P, N = 8, 5
    prompt, pmask = _left_pad(ROWS, P)
    rng = np.random.default_rng(1)
    new = rng.integers(0, V, (len(ROWS), N)).astype(np.int32)
    tokens = np.concatenate([prompt, new], 1)
    mask = np.concatenate([pmask, np.ones_like(new)], 1)
    positions = np.asarray(models.positions_from_mask(jnp.asarray(mask)))
    full = _logits(cfg, params, tokens, mask, positions)

    fwd = jax.jit(lambda p, t, pos, m, c, i: models.forward(cfg, p, t, pos, m, cache=c, cache_index=i))
    cache = models.init_cache(cfg, len(ROWS), P + N)
    out = fwd(params, prompt, positions[:, :P], pmask, cache, 0)
    got = [np.asarray(out["logits"])]
    cache = out["cache"]
    for j in range(N):
        s = P + j
        out = fwd(params, tokens[:, s:s + 1], positions[:, s:s + 1], mask[:, s:s + 1], cache, s)
        cache = out["cache"]
        got.append(np.asarray(out["logits"]))
    got = np.concatenate(got, 1)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], full[real], atol=2e-5, rtol=1e-5)
    assert np.asarray(cache["mask"]).tolist() == real.tolist()


@pytest.mark.parametrize("arch", ARCHES)
def test_decode_params_give_the_same_numbers(arch):
    """The sampler's layout (per-layer trees, q/k/v or k/v and gate/up stacked) is the same
    model: same logits with and without a KV cache, and the stacked kernels are really used."""
    cfg = _cfg(arch)
    params = _params(cfg)
    dec = models.decode_params(cfg, params)
    assert isinstance(dec["layers"], tuple) and len(dec["layers"]) == cfg.n_layers
    group = "kv" if arch == "llama" else "qkv"  # llama here is GQA
    assert dec["layers"][1][group]["kernel"].shape[:2] == (cfg.d_model, len(group))
    assert ("gate_up" in dec["layers"][0]) == (arch == "llama")
    np.testing.assert_array_equal(dec["layers"][1]["k"]["kernel"], params["layers"]["k"]["kernel"][1])
    tokens, mask = _left_pad(ROWS, 9)
    np.testing.assert_allclose(_logits(cfg, dec, tokens, mask), _logits(cfg, params, tokens, mask),
                               atol=2e-5, rtol=1e-5)
    # One stacked matmul per group and layer instead of 2-3 separate ones (unrolled both ways).
    fwd = lambda p: models.forward(cfg.replace(scan_layers=False), p, jnp.asarray(tokens[:, :1]), jnp.zeros((len(ROWS), 1), jnp.int32),  # noqa: E731
                                   jnp.ones((len(ROWS), 1), bool))["logits"]
    n_dots = lambda p: str(jax.make_jaxpr(fwd)(p)).count("dot_general")  # noqa: E731
    assert n_dots(params) - n_dots(dec) == 2 * cfg.n_layers
    # With a cache (how the sampler calls it).
    cache = models.init_cache(cfg, len(ROWS), 12)
    run = jax.jit(lambda p, c: models.forward(cfg, p, jnp.asarray(tokens), models.positions_from_mask(
        jnp.asarray(mask)), jnp.asarray(mask), cache=c, cache_index=0))
    a, b = run(dec, cache), run(params, cache)
    np.testing.assert_allclose(np.asarray(a["logits"]), np.asarray(b["logits"]), atol=2e-5, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(a["cache"]), jax.tree.leaves(b["cache"])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5, rtol=1e-5)


def test_grow_cache_keeps_entries_and_masks_new_slots():
    cfg = _cfg("llama")
    cache = models.init_cache(cfg, 3, 4)
    assert len(cache["k"]) == cfg.n_layers and cache["k"][0].shape == (3, cfg.kv_heads, 4, cfg.dim_per_head)
    filled = jax.tree.map(lambda a: jnp.ones_like(a), cache)
    grown = models.grow_cache(filled, 7)
    assert grown["k"][1].shape == (3, cfg.kv_heads, 7, cfg.dim_per_head)
    assert np.all(np.asarray(grown["v"][0])[:, :, :4] == 1) and np.all(np.asarray(grown["v"][0])[:, :, 4:] == 0)
    assert np.asarray(grown["mask"]).tolist() == [[True] * 4 + [False] * 3] * 3
    # The axes tree matches the cache tree (what the sampler pins under a mesh).
    axes = models.cache_axes(cfg)
    jax.tree.map(lambda ax, a: None if len(ax) == a.ndim else pytest.fail(f"{ax} vs {a.shape}"),
                 axes, grown, is_leaf=sharding.is_axes_leaf)
    with pytest.raises(ValueError, match="already holds 7 > 5"):
        models.grow_cache(grown, 5)


@pytest.mark.parametrize("arch", ARCHES)
def test_left_padded_rows_match_rows_alone(arch):
    cfg = _cfg(arch)
    params = _params(cfg)
    tokens, mask = _left_pad(ROWS, 10)
    batch = _logits(cfg, params, tokens, mask)
    for i, row in enumerate(ROWS):
        np.testing.assert_allclose(batch[i, 10 - len(row):], _alone(cfg, params, row), atol=2e-5, rtol=1e-5)
    # Right padding too (the SFT layout).
    right = np.zeros_like(tokens)
    rmask = np.zeros_like(mask)
    for i, row in enumerate(ROWS):
        right[i, :len(row)], rmask[i, :len(row)] = row, 1
    batch_r = _logits(cfg, params, right, rmask)
    for i, row in enumerate(ROWS):
        np.testing.assert_allclose(batch_r[i, :len(row)], batch[i, 10 - len(row):], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHES)
def test_packed_segments_match_segments_alone(arch):
    cfg = _cfg(arch)
    params = _params(cfg)
    # Two packed rows: [ROWS0 | ROWS1 | pad], [ROWS2 | ROWS3 | ROWS1 | pad].
    packing = [[0, 1], [2, 3, 1]]
    T = 14
    tokens = np.zeros((2, T), np.int32)
    seg = np.zeros((2, T), np.int32)
    pos = np.zeros((2, T), np.int32)
    spans = []
    for b, ids in enumerate(packing):
        start = 0
        for s, r in enumerate(ids, start=1):
            n = len(ROWS[r])
            tokens[b, start:start + n], seg[b, start:start + n] = ROWS[r], s
            pos[b, start:start + n] = np.arange(n)  # positions restart in every segment
            spans.append((b, start, r))
            start += n
    mask = (seg > 0).astype(np.int32)
    packed = _logits(cfg, params, tokens, mask, pos, segment_ids=jnp.asarray(seg))
    for b, start, r in spans:
        np.testing.assert_allclose(packed[b, start:start + len(ROWS[r])], _alone(cfg, params, ROWS[r]),
                                   atol=2e-5, rtol=1e-5)
    # Without segment ids, later segments would see earlier ones: the check above is not vacuous.
    leaky = _logits(cfg, params, tokens, mask, pos)
    b, start, r = spans[1]
    assert np.abs(leaky[b, start] - packed[b, start]).max() > 1e-3


def test_scan_and_remat_do_not_change_logits_or_grads(arch="llama"):
    base = _cfg(arch)
    params = _params(base)
    tokens, mask = _left_pad(ROWS, 9)

    def loss(p, cfg):
        out = models.forward(cfg, p, jnp.asarray(tokens), models.positions_from_mask(jnp.asarray(mask)),
                             jnp.asarray(mask))
        return jnp.sum(jax.nn.log_softmax(out["logits"])[..., 3] * mask), out["logits"]

    ref_grads, ref_logits = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)(params, base)
    # Against the scanned, non-remat reference: both scan modes and both remat policies.
    for scan, remat in ((False, "full"), (True, "dots")):
        cfg = base.replace(scan_layers=scan, remat=remat)
        grads, logits = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)(params, cfg)
        np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5, err_msg=f"{scan} {remat}")
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4, err_msg=f"{scan} {remat}")


@pytest.mark.parametrize("arch", ARCHES)
def test_stacked_projections_match_separate(arch, monkeypatch):
    """Training-size calls run q/k/v (or k/v) and gate/up as one matmul over kernels stacked at
    run time; decode-size calls keep separate matmuls. Both must give the same numbers."""
    cfg = _cfg(arch)
    params = _params(cfg)
    tokens, mask = _left_pad(ROWS, 9)
    logits, n_dots = {}, {}
    for name, threshold in (("separate", 10**9), ("stacked", 0)):
        monkeypatch.setattr(transformer, "_FUSE_MIN_TOKENS", threshold)

        def fwd(p):  # a fresh function per setting: the threshold is read at trace time
            return models.forward(cfg, p, jnp.asarray(tokens), models.positions_from_mask(jnp.asarray(mask)),
                                  jnp.asarray(mask))["logits"]

        n_dots[name] = str(jax.make_jaxpr(fwd)(params)).count("dot_general")
        logits[name] = np.asarray(jax.jit(fwd)(params))
    # gpt2 (multi-head): q/k/v -> 1 matmul; llama (GQA): k/v -> 1 and gate/up -> 1.
    assert n_dots["separate"] - n_dots["stacked"] == 2
    np.testing.assert_allclose(logits["stacked"], logits["separate"], atol=1e-5, rtol=1e-5)


def test_bf16_compute_is_close_to_f32(arch="llama"):
    cfg = _cfg(arch)
    params = _params(cfg)
    tokens, mask = _left_pad(ROWS, 9)
    f32 = _logits(cfg, params, tokens, mask)
    # bf16 parameters and bf16 compute (what a bf16 checkpoint runs as).
    cfg16 = cfg.replace(param_dtype="bfloat16", dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(models.abstract_params(cfg16))} == {jnp.dtype(jnp.bfloat16)}
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    bf16 = _logits(cfg16, p16, tokens, mask)
    assert bf16.dtype == np.float32  # logits stay f32 for the losses
    real = mask.astype(bool)
    err = np.abs(bf16 - f32)[real]
    assert 0 < err.max() < 0.1 * np.abs(f32[real]).max()  # bf16 really ran, and stayed close
    assert np.corrcoef(bf16[real].ravel(), f32[real].ravel())[0, 1] > 0.999


@pytest.mark.parametrize("spec, with_bias", [("btd,dcf->btcf", True), ("btnh,nhd->btd", False)])
def test_low_precision_projection_matches_f32_and_keeps_f32_accumulation(spec, with_bias):
    """bf16 projections (`transformer._project`): bf16 operands accumulated in f32 forward and
    backward (XLA:CPU runs that form 1.5-2.0x faster than f32; bf16 -> bf16 is slower), values and
    gradients close to f32 autodiff, each gradient in its argument's dtype (f32 master kernel:
    f32 gradient)."""
    n_in = len(spec.split(",")[0]) - 2
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (3, 5, 4, 6) if n_in == 2 else (3, 5, 8))
    w = jax.random.normal(k[1], (4, 6, 7) if n_in == 2 else (8, 2, 7)) * 0.3
    b = jax.random.normal(k[2], w.shape[n_in:]) if with_bias else None
    g = jax.random.normal(k[3], x.shape[:-n_in] + w.shape[n_in:])

    def loss_in(dtype):
        def loss(x, w, b):
            y = transformer._project(x.astype(dtype), w, spec, dtype, b)
            assert y.dtype == dtype
            return jnp.sum(y.astype(jnp.float32) * g)
        return loss

    args = (0, 1, 2) if with_bias else (0, 1)
    ref, ref_g = jax.value_and_grad(loss_in(jnp.float32), argnums=args)(x, w, b)
    got, got_g = jax.value_and_grad(loss_in(jnp.bfloat16), argnums=args)(x, w, b)
    assert abs(got - ref) < 0.02 * float(jnp.sum(jnp.abs(g)))
    for r, o in zip(ref_g, got_g):
        assert o.dtype == jnp.float32
        assert 0 < float(jnp.max(jnp.abs(o - r))) < 0.03 * float(jnp.max(jnp.abs(r)))
    # Every matmul of the bf16 forward + backward: bf16 operands, f32 accumulation.
    jaxpr = jax.make_jaxpr(jax.grad(loss_in(jnp.bfloat16), argnums=args))(x, w, b).jaxpr
    dots = [(tuple(v.aval.dtype.name for v in e.invars), e.outvars[0].aval.dtype.name)
            for e in _equations(jaxpr) if e.primitive.name == "dot_general"]
    assert dots == [(("bfloat16", "bfloat16"), "float32")] * 3, dots


def _equations(jaxpr):
    """Every equation of a jaxpr, inside nested jaxprs (custom_vjp, pjit) too."""
    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


def test_sharded_forward_on_2x2x2_mesh_matches_one_device(monkeypatch, arch="llama"):
    assert jax.device_count() >= 8, "conftest should give 8 CPU devices"
    cfg = _cfg(arch)
    heads = ("lm", "score")
    params = _params(cfg)
    tokens, mask = _left_pad(ROWS, 8)
    ref = _forward(cfg, params, jnp.asarray(tokens), models.positions_from_mask(jnp.asarray(mask)),
                   jnp.asarray(mask))

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = sharding.logical_to_shardings(models.param_axes(cfg, heads), mesh,
                                              shapes=models.abstract_params(cfg, heads))
    placed = jax.device_put(params, shardings)
    P = jax.sharding.PartitionSpec
    lp = placed["layers"]
    assert lp["q"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    assert lp["o"]["kernel"].sharding.spec == P(None, "tensor", None, "fsdp")
    mlp_in = lp["fc_in" if arch == "gpt2" else "gate"]["kernel"]
    assert mlp_in.sharding.spec == P(None, "fsdp", "tensor")
    assert mlp_in.addressable_shards[0].data.shape == (cfg.n_layers, 16, cfg.ff_dim // 2)
    assert placed["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert placed["score_head"]["bias"].sharding.spec == P()

    batch = sharding.host_to_global({"tokens": tokens, "mask": mask}, mesh)
    fwd = jax.jit(lambda p, t, m: models.forward(cfg, p, t, models.positions_from_mask(m), m))
    with jax.set_mesh(mesh):
        out = fwd(placed, batch["tokens"], batch["mask"])
    assert out["logits"].sharding.num_devices == 8
    np.testing.assert_allclose(np.asarray(out["logits"]), np.asarray(ref["logits"]), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out["scores"]), np.asarray(ref["scores"]), atol=2e-5, rtol=1e-5)
    # The stacked-kernel projections (training-size calls) keep each kernel's sharding.
    monkeypatch.setattr(transformer, "_FUSE_MIN_TOKENS", 0)
    fwd_stacked = jax.jit(lambda p, t, m: models.forward(cfg, p, t, models.positions_from_mask(m), m))
    with jax.set_mesh(mesh):
        out = fwd_stacked(placed, batch["tokens"], batch["mask"])
    np.testing.assert_allclose(np.asarray(out["logits"]), np.asarray(ref["logits"]), atol=2e-5, rtol=1e-5)
