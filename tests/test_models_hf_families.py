"""Llama 3.x rotary scaling and Qwen3 against PyTorch `transformers`, and the real-size presets.

Tiny random models built with `save_pretrained` (no downloads): logits parity to 1e-4 at
positions where Llama 3's scaling changes the frequencies, exports that `transformers` loads,
bitwise import -> export -> import round trips; KV-cache decoding of both; the presets'
hyper-parameters and parameter counts from abstract shapes (no memory).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rlhf_jax import models  # noqa: E402
from rlhf_jax.errors import UserError  # noqa: E402
from rlhf_jax.models import hf, presets, transformer  # noqa: E402

V, B, T = 96, 3, 12
LENGTHS = (12, 7, 3)
OFFSET = 300  # position ids start here: past the tiny models' "original" 64-token context
KINDS = ("llama3", "qwen3")
# Llama 3.1's published rope scaling, with a 64-token original context so a tiny model at
# positions ~300 sees every band: kept, interpolated and stretched frequencies.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _hf_model(kind: str):
    t = transformers
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  bos_token_id=0, eos_token_id=1, attn_implementation="eager")
    if kind == "llama3":  # GQA, untied head, Llama 3 rope scaling
        return t.LlamaForCausalLM(t.LlamaConfig(tie_word_embeddings=False,
                                                rope_parameters=LLAMA3_ROPE, **common))
    if kind == "qwen3":  # q/k norms, head_dim 12 != 32 / 4, tied embeddings
        return t.Qwen3ForCausalLM(t.Qwen3Config(tie_word_embeddings=True, head_dim=12,
                                                rope_parameters={"rope_type": "default",
                                                                 "rope_theta": 1e4}, **common))
    raise ValueError(kind)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """One saved tiny model per family, with norms (q/k norms included) perturbed and q/k
    projections scaled up, so attention is far from uniform and RoPE errors show in the logits."""
    root = tmp_path_factory.mktemp("hf_families")
    out = {}
    for i, kind in enumerate(KINDS):
        torch.manual_seed(10 + i)
        model = _hf_model(kind).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.3 * torch.randn_like(p))
                if "q_proj" in name or "k_proj" in name:
                    p.mul_(8.0)
        path = str(root / kind)
        model.save_pretrained(path)
        out[kind] = (path, model)
    return out


def _batch(side: str):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V, (B, T))
    mask = np.zeros((B, T), np.int64)
    for b, n in enumerate(LENGTHS):
        if side == "left":
            mask[b, T - n:] = 1
        else:
            mask[b, :n] = 1
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0) + OFFSET
    return tokens, mask, positions


def _torch_logits(model, tokens, mask, positions):
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions)).logits.float().numpy()


_forward = jax.jit(models.forward, static_argnums=0)


def _our_logits(cfg, params, tokens, mask, positions):
    out = _forward(cfg, params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
    return np.asarray(out["logits"])


@pytest.mark.parametrize("kind", KINDS)
def test_import_matches_pytorch_and_export_round_trips(kind, hf_dirs, tmp_path):
    path, model = hf_dirs[kind]
    cfg, params = hf.load_hf(path)
    if kind == "llama3":
        assert (cfg.hf_model_type, cfg.rope_type, cfg.rope_factor, cfg.rope_original_max_len) == (
            "llama", "llama3", 8.0, 64)
        assert cfg.rope_theta == 500.0 and not cfg.qk_norm and "lm_head" in params
    else:
        assert cfg.hf_model_type == "qwen3" and cfg.qk_norm and not cfg.qkv_bias
        assert cfg.dim_per_head == 12 != cfg.d_model // cfg.n_heads
        assert params["layers"]["q_norm"]["scale"].shape == (2, 12)
        assert params["layers"]["q"]["kernel"].shape == (2, 32, 4, 12)
        assert "lm_head" not in params

    for side in ("left", "right"):
        tokens, mask, positions = _batch(side)
        real = mask.astype(bool)
        ref = _torch_logits(model, tokens, mask, positions)
        ours = _our_logits(cfg, params, tokens, mask, positions)
        np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0, err_msg=side)
        assert np.abs(ref[real]).max() > 0.05

    # Export: transformers loads it with no missing / unexpected keys and the same logits.
    out_dir = str(tmp_path / "export")
    hf.save_hf(cfg, params, out_dir)
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        out_dir, attn_implementation="eager", output_loading_info=True)
    assert type(reloaded) is type(model)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert reloaded.config.rope_parameters == model.config.rope_parameters
    tokens, mask, positions = _batch("left")
    real = mask.astype(bool)
    np.testing.assert_array_equal(_torch_logits(reloaded.eval(), tokens, mask, positions)[real],
                                  _torch_logits(model, tokens, mask, positions)[real])

    # Bitwise: the exported file holds exactly the original tensors; re-import is identical.
    original = load_file(os.path.join(path, hf.WEIGHTS_FILE))
    exported = load_file(os.path.join(out_dir, hf.WEIGHTS_FILE))
    assert sorted(exported) == sorted(original)
    for name in original:
        assert exported[name].dtype == original[name].dtype
        np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
    cfg2, params2 = hf.load_hf(out_dir)
    assert cfg2 == cfg
    assert jax.tree.structure(params2) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_llama3_frequencies_equal_transformers_and_change_the_logits(hf_dirs):
    path, model = hf_dirs["llama3"]
    cfg, params = hf.load_hf(path)
    ours = np.asarray(transformer._rope_inv_freq(cfg, cfg.dim_per_head))
    theirs = model.model.rotary_emb.inv_freq.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    plain = np.asarray(transformer._rope_inv_freq(cfg.replace(rope_type="default"), cfg.dim_per_head))
    # head_dim 8: the first frequency is kept, the second interpolated, the last two stretched.
    assert ours[0] == plain[0] and plain[1] / 8 < ours[1] < plain[1]
    np.testing.assert_allclose(ours[2:], plain[2:] / 8, rtol=1e-6)
    tokens, mask, positions = _batch("right")
    real = mask.astype(bool)
    unscaled = _our_logits(cfg.replace(rope_type="default"), params, tokens, mask, positions)
    assert np.abs(unscaled[real] - _torch_logits(model, tokens, mask, positions)[real]).max() > 1e-2


# The published meta-llama/Llama-3.1-8B config.json (transformers 4.43 layout: top-level
# rope_theta, `rope_scaling`), as copied in LLM-Prof's sglang/Model_Config.md.
LLAMA31_8B_CONFIG_JSON = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
}


def test_published_llama31_config_json_gives_the_preset_both_layouts():
    cfg = hf.config_from_hf(LLAMA31_8B_CONFIG_JSON)
    assert cfg == presets.model_config("llama-3.1-8b")
    # transformers 5 reads the 4.x file into rope_parameters; that layout converts the same.
    t5 = transformers.LlamaConfig(**{k: v for k, v in LLAMA31_8B_CONFIG_JSON.items()
                                     if k not in ("architectures", "transformers_version")})
    assert hf.config_from_hf(t5.to_dict()) == cfg
    # Our export writes both layouts; each alone converts back to the same config.
    out = json.loads(json.dumps(hf.config_to_hf(cfg)))
    assert out["rope_parameters"]["rope_type"] == "llama3" and out["rope_scaling"]["factor"] == 8.0
    assert hf.config_from_hf(out) == cfg
    assert hf.config_from_hf({k: v for k, v in out.items() if k != "rope_scaling"}) == cfg
    assert hf.config_from_hf({k: v for k, v in out.items() if k != "rope_parameters"}) == cfg


def _scaled_params(cfg):
    return jax.jit(lambda k: jax.tree.map(lambda x: x * 3.0, models.init_params(cfg, k)))(
        jax.random.key(0))


def test_kv_cache_decode_and_decode_params_with_qk_norm_and_llama3_rope():
    """The sampler's paths (prefill + token-by-token decode, the decode layout) compute the same
    logits as one full pass for a Qwen3-style model with Llama 3 rope scaling."""
    cfg = models.ModelConfig(arch="llama", vocab_size=V, d_model=32, n_layers=2, n_heads=4,
                             n_kv_heads=2, head_dim=12, d_ff=48, max_len=1024, qk_norm=True,
                             rope_type="llama3", rope_factor=8.0, rope_original_max_len=64,
                             rope_theta=500.0, tie_embeddings=False, hf_model_type="qwen3")
    params = _scaled_params(cfg)
    P, N = 8, 4
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, V, (2, P + N)).astype(np.int32)
    mask = np.ones((2, P + N), np.int32)
    mask[1, :3] = 0  # left padding
    positions = np.asarray(models.positions_from_mask(jnp.asarray(mask))) + OFFSET
    full = _our_logits(cfg, params, tokens, mask, positions)

    dec = models.decode_params(cfg, params)
    fwd = jax.jit(lambda p, t, pos, m, c, i: models.forward(cfg, p, t, pos, m, cache=c, cache_index=i))
    out = fwd(dec, tokens[:, :P], positions[:, :P], mask[:, :P], models.init_cache(cfg, 2, P + N), 0)
    got, cache = [np.asarray(out["logits"])], out["cache"]
    for s in range(P, P + N):
        out = fwd(dec, tokens[:, s:s + 1], positions[:, s:s + 1], mask[:, s:s + 1], cache, s)
        got.append(np.asarray(out["logits"]))
        cache = out["cache"]
    real = mask.astype(bool)
    np.testing.assert_allclose(np.concatenate(got, 1)[real], full[real], atol=2e-5, rtol=1e-5)
    # The q/k norm scales matter (a model with them at one computes other logits).
    ones = dict(params, layers=dict(params["layers"], q_norm={"scale": jnp.ones((2, 12))}))
    assert np.abs(_our_logits(cfg, ones, tokens, mask, positions) - full)[real].max() > 1e-3


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(attention_bias=True), "attention_bias"),
    (lambda c: c["rope_parameters"].pop("low_freq_factor"), "low_freq_factor"),
    (lambda c: c["rope_parameters"].update(partial_rotary_factor=0.5), "partial_rotary_factor"),
    (lambda c: c["rope_parameters"].update(rope_type="yarn"), "rope_type"),
    (lambda c: c.update(rope_scaling=dict(c["rope_parameters"], factor=4.0)), "disagree"),
    (lambda c: c.update(layer_types=["full_attention", "sliding_attention"],
                        use_sliding_window=True, sliding_window=4), "sliding"),
])
def test_unsupported_qwen3_and_rope_configs_name_the_field(edit, match):
    base = hf.config_to_hf(models.ModelConfig(
        arch="llama", vocab_size=V, d_model=32, n_layers=2, n_heads=4, qk_norm=True,
        rope_type="llama3", rope_factor=8.0))
    assert base["model_type"] == "qwen3"
    hf.config_from_hf(json.loads(json.dumps(base)))
    bad = json.loads(json.dumps(base))
    bad.pop("rope_scaling")
    edit(bad)
    with pytest.raises(hf.HFCheckpointError, match=match):
        hf.config_from_hf(bad, source="some/config.json")


def test_model_config_and_export_reject_inconsistent_families():
    cfg = models.ModelConfig(arch="llama", vocab_size=V, d_model=32, n_layers=2, n_heads=4, qk_norm=True)
    with pytest.raises(UserError, match="qwen3"):
        hf.config_to_hf(cfg.replace(hf_model_type="llama"))  # llama has no q/k norms
    with pytest.raises(UserError, match="qwen3"):
        hf.config_to_hf(cfg.replace(qk_norm=False, hf_model_type="qwen3"))
    with pytest.raises(UserError, match="rope_type"):
        cfg.replace(rope_type="yarn")
    with pytest.raises(UserError, match="rope_factor"):
        cfg.replace(rope_type="llama3", rope_low_freq_factor=4.0, rope_high_freq_factor=1.0)
    with pytest.raises(UserError, match="gpt2"):
        models.ModelConfig(arch="gpt2", qk_norm=True)


# ---------------------------------------------------------------------------------- presets


def _analytic_count(c: models.ModelConfig) -> int:
    """Parameters of a Llama-family config by hand (independent of our parameter tree)."""
    D, L, H, KV, Dh, F, Vv = (c.d_model, c.n_layers, c.n_heads, c.kv_heads, c.dim_per_head,
                              c.ff_dim, c.vocab_size)
    layer = D * H * Dh + 2 * D * KV * Dh + H * Dh * D + 3 * D * F + 2 * D
    layer += (H + 2 * KV) * Dh if c.qkv_bias else 0
    layer += 2 * Dh if c.qk_norm else 0
    return Vv * D * (1 if c.tie_embeddings else 2) + L * layer + D


# name -> (model_type, d_model, layers, heads, kv heads, head_dim, d_ff, vocab, tied, rope, params)
EXPECTED = {
    "qwen2.5-0.5b": ("qwen2", 896, 24, 14, 2, 64, 4864, 151936, True, "default", 494_032_768),
    "qwen3-1.7b": ("qwen3", 2048, 28, 16, 8, 128, 6144, 151936, True, "default", 1_720_574_976),
    "llama-3.1-8b": ("llama", 4096, 32, 32, 8, 128, 14336, 128256, False, "llama3", 8_030_261_248),
    "llama-3.1-70b": ("llama", 8192, 80, 64, 8, 128, 28672, 128256, False, "llama3", 70_553_706_496),
}


CONFIG_CLASSES = {"qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "llama": "LlamaConfig"}


def test_presets_have_the_published_shapes_and_parameter_counts():
    assert presets.NAMES == tuple(EXPECTED)
    for name, (mt, D, L, H, KV, Dh, F, Vv, tied, rope, count) in EXPECTED.items():
        cfg = presets.model_config(name)
        assert type(presets.hf_config(name)).__name__ == CONFIG_CLASSES[mt]
        got = (cfg.hf_model_type, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.kv_heads,
               cfg.dim_per_head, cfg.ff_dim, cfg.vocab_size, cfg.tie_embeddings, cfg.rope_type)
        assert got == (mt, D, L, H, KV, Dh, F, Vv, tied, rope), name
        assert cfg.param_dtype == "bfloat16" and cfg.qkv_bias == (mt == "qwen2")
        assert cfg.qk_norm == (mt == "qwen3")
        # Counted from abstract shapes (jax.eval_shape through the module: no allocation).
        shapes = models.abstract_params(cfg)
        assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
        assert models.param_count(cfg) == _analytic_count(cfg) == count, name
        # Export config -> transformers' own config class -> back: the same model.
        hf_dict = hf.config_to_hf(cfg)
        again = transformers.AutoConfig.for_model(**hf_dict).to_dict()
        assert hf.config_from_hf(again) == cfg, name
    llama8 = presets.model_config("llama-3.1-8b")
    assert (llama8.rope_theta, llama8.rope_factor, llama8.rope_low_freq_factor,
            llama8.rope_high_freq_factor, llama8.rope_original_max_len) == (5e5, 8.0, 1.0, 4.0, 8192)
    assert presets.model_config("qwen3-1.7b").rope_theta == 1e6
    # Published totals: 0.49B, 1.7B (1.4B without embeddings), 8.03B, 70.6B.
    q17 = presets.model_config("qwen3-1.7b")
    assert round(models.param_count(q17) / 1e9, 1) == 1.7
    assert round((models.param_count(q17) - q17.vocab_size * q17.d_model) / 1e9, 1) == 1.4
    # Names: case-insensitive, Hugging Face owner allowed; overrides apply; unknown is an error.
    assert presets.model_config("meta-llama/Llama-3.1-8B", remat="full") == llama8.replace(remat="full")
    with pytest.raises(UserError, match="llama-3.1-8b"):
        presets.model_config("llama-3-8b")
