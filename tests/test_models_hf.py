"""Hugging Face import/export against PyTorch `transformers` on tiny random models (no downloads).

Covers: logits parity (left- and right-padded), export that `transformers` loads, bitwise round
trips (ours and the original HF file), sharded checkpoints, score-head side file, placement onto
a mesh, dtype handling, and errors that name the tensor / field and the file.
"""

import copy
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rlhf_jax import models, sharding  # noqa: E402
from rlhf_jax.models import hf  # noqa: E402

V, B, T = 96, 3, 10
LENGTHS = (10, 6, 3)


def _hf_model(kind: str):
    t = transformers
    common = dict(vocab_size=V, bos_token_id=0, eos_token_id=1, attn_implementation="eager")
    llama_like = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    if kind == "gpt2":
        return t.GPT2LMHeadModel(t.GPT2Config(n_positions=32, n_embd=32, n_layer=2, n_head=4, **common))
    if kind == "llama":  # grouped-query attention, untied head, non-default RoPE base
        return t.LlamaForCausalLM(t.LlamaConfig(tie_word_embeddings=False, rope_theta=500.0,
                                                **llama_like, **common))
    if kind == "qwen2":  # q/k/v biases, tied embeddings
        return t.Qwen2ForCausalLM(t.Qwen2Config(tie_word_embeddings=True, **llama_like, **common))
    raise ValueError(kind)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """One saved tiny model per family, with biases and norms perturbed so they matter."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, kind in enumerate(("gpt2", "llama", "qwen2")):
        torch.manual_seed(i)
        model = _hf_model(kind).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "bias" in name or "norm" in name or ".ln_" in name:
                    p.add_(0.2 * torch.randn_like(p))
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
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    return tokens, mask, positions


def _torch_logits(model, tokens, mask, positions):
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions)).logits.float().numpy()


_forward = jax.jit(models.forward, static_argnums=0)  # one compile per model, not one per op


def _our_logits(cfg, params, tokens, mask, positions):
    out = _forward(cfg, params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
    return np.asarray(out["logits"])


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_import_matches_pytorch_and_export_round_trips(kind, hf_dirs, tmp_path):
    path, model = hf_dirs[kind]
    cfg, params = hf.load_hf(path)
    assert cfg.hf_model_type == kind
    assert ("lm_head" in params) == (kind == "llama")  # tied models carry no head matrix
    if kind == "llama":
        assert cfg.kv_heads == 2 < cfg.n_heads and cfg.rope_theta == 500.0
    if kind == "qwen2":
        assert cfg.qkv_bias and params["layers"]["q"]["bias"].shape == (2, 4, 8)

    for side in ("left", "right"):
        tokens, mask, positions = _batch(side)
        real = mask.astype(bool)
        ref = _torch_logits(model, tokens, mask, positions)
        ours = _our_logits(cfg, params, tokens, mask, positions)
        np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0, err_msg=side)
        assert np.abs(ref[real]).max() > 0.05  # logits are not trivially ~0

    # Export: transformers loads it (no missing / unexpected keys) and computes the same logits.
    out_dir = str(tmp_path / "export")
    hf.save_hf(cfg, params, out_dir)
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        out_dir, attn_implementation="eager", output_loading_info=True)
    assert type(reloaded) is type(model)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tokens, mask, positions = _batch("left")
    real = mask.astype(bool)
    np.testing.assert_array_equal(_torch_logits(reloaded.eval(), tokens, mask, positions)[real],
                                  _torch_logits(model, tokens, mask, positions)[real])

    # Bitwise: the exported file holds exactly the original tensors, and re-import is identical.
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


def test_config_round_trip_and_mistral_export(tmp_path):
    """Mistral is Llama by config: our export as mistral loads in transformers with equal logits."""
    cfg = models.ModelConfig(arch="llama", vocab_size=V, d_model=32, n_layers=2, n_heads=4,
                             n_kv_heads=2, d_ff=48, max_len=32, rope_theta=1e6,
                             tie_embeddings=False, hf_model_type="mistral", norm_eps=1e-6)
    assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg
    params = jax.jit(lambda k: jax.tree.map(lambda x: x * 5, models.init_params(cfg, k)))(jax.random.key(0))
    hf.save_hf(cfg, params, str(tmp_path))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager")
    assert type(model).__name__ == "MistralForCausalLM"
    tokens, mask, positions = _batch("left")
    real = mask.astype(bool)
    np.testing.assert_allclose(_our_logits(cfg, params, tokens, mask, positions)[real],
                               _torch_logits(model.eval(), tokens, mask, positions)[real], atol=1e-4)
    # Every field the decoder uses survives for the other families too.
    for c in (cfg.replace(hf_model_type="llama", head_dim=16),
              cfg.replace(hf_model_type="qwen2", qkv_bias=True, tie_embeddings=True),
              models.ModelConfig(arch="gpt2", vocab_size=V, d_model=32, n_layers=3, n_heads=4,
                                 d_ff=80, max_len=40, norm_eps=1e-6, tie_embeddings=False)):
        assert hf.config_from_hf(json.loads(json.dumps(hf.config_to_hf(c)))) == c.replace(
            hf_model_type=c.hf_model_type or "gpt2")
    with pytest.raises(ValueError, match="qwen2"):
        hf.config_to_hf(cfg.replace(qkv_bias=True))  # llama / mistral have no q/k/v-only bias


def test_sharded_checkpoint_score_head_and_mesh_placement(hf_dirs, tmp_path):
    path, model = hf_dirs["llama"]
    cfg, params = hf.load_hf(path)
    sharded = str(tmp_path / "sharded")
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert os.path.exists(os.path.join(sharded, hf.INDEX_FILE))
    assert not os.path.exists(os.path.join(sharded, hf.WEIGHTS_FILE))

    # Place each tensor straight onto a data×fsdp×tensor mesh via the logical rules.
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    seen_heads = []

    def place(c, heads):
        seen_heads.append(heads)
        return sharding.logical_to_shardings(models.param_axes(c, heads), mesh,
                                             shapes=models.abstract_params(c, heads))

    cfg_s, params_s = hf.load_hf(sharded, shardings=place)
    assert cfg_s == cfg and seen_heads == [("lm",)]
    # A ready-made tree of shardings works too.
    _, again = hf.load_hf(sharded, shardings=place(cfg, ("lm",)))
    assert again["layers"]["up"]["kernel"].sharding == params_s["layers"]["up"]["kernel"].sharding
    P = jax.sharding.PartitionSpec
    assert params_s["layers"]["q"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    assert params_s["layers"]["down"]["kernel"].sharding.spec == P(None, "tensor", "fsdp")
    assert params_s["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
    assert len(params_s["embed"]["embedding"].addressable_shards[0].data.shape) == 2
    assert params_s["embed"]["embedding"].addressable_shards[0].data.shape == (V // 2, 16)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_s)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # A reward model: the score head goes to a side file that transformers ignores.
    rm = dict(params_s, score_head={"kernel": jnp.arange(32.0) / 7, "bias": jnp.array(0.25)})
    rm_dir = str(tmp_path / "rm")
    hf.save_hf(cfg, rm, rm_dir)
    assert os.path.exists(os.path.join(rm_dir, hf.SCORE_HEAD_FILE))
    transformers.AutoModelForCausalLM.from_pretrained(rm_dir)
    cfg_rm, rm2 = hf.load_hf(rm_dir)
    np.testing.assert_array_equal(np.asarray(rm2["score_head"]["kernel"]), np.asarray(rm["score_head"]["kernel"]))
    assert float(rm2["score_head"]["bias"]) == 0.25 and rm2["score_head"]["bias"].shape == ()
    tokens, mask, positions = _batch("right")
    out = _forward(cfg_rm, rm2, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
    assert out["scores"].shape == (B, T)
    # Re-exporting without the head removes the stale side file.
    hf.save_hf(cfg, params, rm_dir)
    assert not os.path.exists(os.path.join(rm_dir, hf.SCORE_HEAD_FILE))


def test_dtypes_and_tokenizer_copy(hf_dirs, tmp_path):
    path, model = hf_dirs["qwen2"]
    bf_dir = str(tmp_path / "bf16")
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(bf_dir)  # the fixture stays f32
    cfg, params = hf.load_hf(bf_dir)
    assert cfg.param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    cfg32, params32 = hf.load_hf(bf_dir, dtype="float32")
    assert cfg32.param_dtype == "float32"
    assert {x.dtype for x in jax.tree.leaves(params32)} == {jnp.dtype(jnp.float32)}
    np.testing.assert_array_equal(np.asarray(params32["embed"]["embedding"]),
                                  np.asarray(params["embed"]["embedding"]).astype(np.float32))

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.json").write_text('{"fake": 1}')
    (tok_dir / "config.json").write_text("{}")  # must not overwrite the model's config
    out = str(tmp_path / "out")
    hf.save_hf(cfg, params, out, tokenizer_dir=str(tok_dir), extra_config={"eos_token_id": 1})
    assert open(os.path.join(out, "tokenizer.json")).read() == '{"fake": 1}'
    written = json.load(open(os.path.join(out, "config.json")))
    assert written["model_type"] == "qwen2" and written["eos_token_id"] == 1
    assert written["dtype"] == "bfloat16"
    assert load_file(os.path.join(out, hf.WEIGHTS_FILE))["model.norm.weight"].dtype.name == "bfloat16"
    with pytest.raises(ValueError, match="hidden_size"):
        hf.save_hf(cfg, params, out, extra_config={"hidden_size": 8})


# ---------------------------------------------------------------------------------- bad input


def _edited_copy(src, dst, tensors=None, config=None):
    shutil.copytree(src, dst)
    if config:
        cfg = json.load(open(os.path.join(dst, "config.json")))
        config(cfg)
        json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    if tensors:
        f = os.path.join(dst, hf.WEIGHTS_FILE)
        t = load_file(f)
        tensors(t)
        save_file(t, f)
    return dst, os.path.join(dst, hf.WEIGHTS_FILE)


def test_bad_checkpoints_name_tensor_and_file(hf_dirs, tmp_path):
    llama, _ = hf_dirs["llama"]
    gpt2, _ = hf_dirs["gpt2"]
    k = "model.layers.1.self_attn.k_proj.weight"

    d, f = _edited_copy(llama, tmp_path / "missing", tensors=lambda t: t.pop(k))
    with pytest.raises(hf.HFCheckpointError, match="missing") as e:
        hf.load_hf(d)
    assert k in str(e.value) and f in str(e.value)

    d, f = _edited_copy(llama, tmp_path / "shape", tensors=lambda t: t.update({k: np.zeros((24, 32), np.float32)}))
    with pytest.raises(hf.HFCheckpointError, match=r"shape \(24, 32\)") as e:
        hf.load_hf(d)
    assert k in str(e.value) and f in str(e.value) and "(16, 32)" in str(e.value)  # the expected shape

    extra = "model.layers.0.self_attn.o_proj.bias"
    d, f = _edited_copy(llama, tmp_path / "extra", tensors=lambda t: t.update({extra: np.zeros(32, np.float32)}))
    with pytest.raises(hf.HFCheckpointError, match="unexpected") as e:
        hf.load_hf(d)
    assert extra in str(e.value) and f in str(e.value)

    # A sharded checkpoint names the shard that holds the bad tensor.
    sharded = tmp_path / "sharded_src"
    hf_dirs["llama"][1].save_pretrained(str(sharded), max_shard_size="20KB")
    index = json.load(open(sharded / hf.INDEX_FILE))
    shard = str(sharded / index["weight_map"][k])
    t = load_file(shard)
    t[k] = t[k][:4]
    save_file(t, shard)
    with pytest.raises(hf.HFCheckpointError) as e:
        hf.load_hf(str(sharded))
    assert k in str(e.value) and shard in str(e.value)

    # A tied checkpoint may carry lm_head.weight only if it equals the embedding.
    def untie(t):
        t["lm_head.weight"] = t["transformer.wte.weight"] + 1

    d, f = _edited_copy(gpt2, tmp_path / "tied", tensors=untie)
    with pytest.raises(hf.HFCheckpointError, match="tie_word_embeddings") as e:
        hf.load_hf(d)
    assert "lm_head.weight" in str(e.value) and f in str(e.value)
    # ... and GPT-2's causal-mask buffers (older checkpoints store them) are not parameters.
    d, _ = _edited_copy(gpt2, tmp_path / "buffers", tensors=lambda t: t.update(
        {"transformer.h.0.attn.bias": np.ones((1, 1, 32, 32), np.float32),
         "lm_head.weight": t["transformer.wte.weight"].copy()}))
    cfg, with_buffers = hf.load_hf(d)
    assert cfg.is_gpt2
    # The original OpenAI GPT-2 files name tensors without the "transformer." prefix.
    d, _ = _edited_copy(gpt2, tmp_path / "no_prefix", tensors=lambda t: t.update(
        {k.removeprefix("transformer."): t.pop(k) for k in list(t)}))
    _, bare = hf.load_hf(d)
    for a, b in zip(jax.tree.leaves(with_buffers), jax.tree.leaves(bare)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("field, edit", [
    ("model_type", lambda c: c.update(model_type="gpt_neox")),
    ("rope_parameters", lambda c: c.update(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                            "rope_theta": 1e4})),
    ("rope_scaling", lambda c: (c.pop("rope_parameters"), c.update(rope_scaling={"type": "dynamic", "factor": 2.0}))),
    ("hidden_act", lambda c: c.update(hidden_act="gelu")),
    ("attention_bias", lambda c: c.update(attention_bias=True)),
    ("sliding_window", lambda c: c.update(model_type="mistral", sliding_window=16)),
    ("hidden_size", lambda c: c.pop("hidden_size")),
])
def test_unsupported_configs_name_field_and_file(field, edit, hf_dirs, tmp_path):
    d, _ = _edited_copy(hf_dirs["llama"][0], tmp_path / "bad", config=edit)
    with pytest.raises(hf.HFCheckpointError, match=field) as e:
        hf.load_hf(str(d))
    assert os.path.join(str(d), "config.json") in str(e.value)


def test_qwen2_sliding_window_in_use_is_rejected():
    base = hf.config_to_hf(models.ModelConfig(arch="llama", vocab_size=V, d_model=32, n_layers=2,
                                              n_heads=4, qkv_bias=True, hf_model_type="qwen2"))
    hf.config_from_hf(base)  # full attention on every layer is fine
    with pytest.raises(hf.HFCheckpointError, match="sliding"):
        hf.config_from_hf(dict(base, layer_types=["full_attention", "sliding_attention"],
                               use_sliding_window=True, sliding_window=4))


# ---------------------------------------------------------------------------------- convert CLI


def _tiny_tokenizer(path):
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"] + [f"w{i}" for i in range(20)])}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                         bos_token="<bos>", unk_token="<unk>").save_pretrained(path)


def test_convert_cli_hf_to_orbax_to_hf(hf_dirs, tmp_path, capsys):
    from rlhf_jax import checkpoint, convert

    src, model = hf_dirs["qwen2"]
    with_tok = str(tmp_path / "with_tok")
    shutil.copytree(src, with_tok)
    _tiny_tokenizer(with_tok)
    work = str(tmp_path / "work")
    assert convert.main(["hf-to-orbax", "--src", with_tok, "--dst", work]) == 0
    params, meta = checkpoint.load_stage_params(work)
    cfg, ref = hf.load_hf(src)
    assert models.ModelConfig.from_dict(meta["model_config"]) == cfg
    assert meta["tokenizer_dir"] == os.path.abspath(with_tok)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), b)

    # A reward-model stage output (score head added) back to Hugging Face.
    rm_work = str(tmp_path / "rm_work")
    head = {"kernel": np.linspace(-1, 1, cfg.d_model).astype(np.float32), "bias": np.float32(0.5)}
    norm = {"gain": 0.25, "bias": -1.5, "method": "reference_samples"}
    checkpoint.save_final(rm_work, {**params, "score_head": head}, {**meta, "reward_norm": norm}, step=7)
    out = str(tmp_path / "hf_out")
    assert convert.main(["orbax-to-hf", "--src", rm_work, "--dst", out]) == 0
    assert "wrote" in capsys.readouterr().out
    written = json.load(open(os.path.join(out, "config.json")))
    assert (written["eos_token_id"], written["pad_token_id"], written["bos_token_id"]) == (1, 0, 2)
    assert transformers.AutoTokenizer.from_pretrained(out).eos_token_id == 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    tokens, mask, positions = _batch("right")
    real = mask.astype(bool)
    np.testing.assert_array_equal(_torch_logits(reloaded.eval(), tokens, mask, positions)[real],
                                  _torch_logits(model, tokens, mask, positions)[real])
    _, back = hf.load_hf(out)
    np.testing.assert_array_equal(np.asarray(back["score_head"]["kernel"]), head["kernel"])
    # The RM's score normalisation survives the round trip (PPO reads it from the metadata).
    assert json.load(open(os.path.join(out, convert.REWARD_NORM_FILE))) == norm
    rm_back = str(tmp_path / "rm_back")
    assert convert.main(["hf-to-orbax", "--src", out, "--dst", rm_back]) == 0
    assert checkpoint.load_stage_params(rm_back)[1]["reward_norm"] == norm

    # bf16 export on request; a directory that is not a finished stage is a clear error.
    out16 = str(tmp_path / "hf_bf16")
    assert convert.main(["orbax-to-hf", "--src", work, "--dst", out16, "--dtype", "bfloat16"]) == 0
    assert hf.load_hf(out16)[0].param_dtype == "bfloat16"
    assert convert.main(["orbax-to-hf", "--src", str(tmp_path / "nowhere"), "--dst",
                         str(tmp_path / "new")]) == 2
    assert "nowhere: no such directory" in capsys.readouterr().err
    assert convert.main(["hf-to-orbax", "--src", str(tmp_path / "nowhere"), "--dst",
                         str(tmp_path / "new")]) == 2
    assert "error: --src: " in capsys.readouterr().err
