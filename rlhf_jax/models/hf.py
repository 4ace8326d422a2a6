"""Hugging Face checkpoints in and out: GPT-2, Llama (incl. 3.x RoPE scaling), Qwen2, Qwen3 and
Mistral causal LMs.

A Hugging Face directory is `config.json` plus `model.safetensors` (or shards listed in
`model.safetensors.index.json`). Tensors are read with the `safetensors` numpy API (no torch)
and mapped into our parameter tree (`rlhf_jax.models.transformer`):

* GPT-2 stores `Conv1D` weights as [in, out] and fuses q/k/v in `attn.c_attn` ([D, 3D]);
* Llama-family `nn.Linear` weights are [out, in]; q/k/v/o are reshaped into heads;
* RoPE: HF Llama checkpoints already use the rotate-half layout that our `_rope` uses, so no
  permutation is applied (the permutation is only needed for Meta's original checkpoints);
  Llama 3.x's `rope_type="llama3"` scaling maps onto `ModelConfig.rope_*`;
* Qwen3's per-head `q_norm` / `k_norm` ([head_dim]) map onto `layers/q_norm`, `layers/k_norm`;
* tied embeddings have no `lm_head.weight` (a tied checkpoint that still carries one is
  accepted only if it equals the embedding).

Every mapping is a transpose / reshape / split / concatenate, so import -> export -> import is
bitwise identical.

Score heads are not part of a causal-LM checkpoint. `save_hf` writes a model's `score_head`
to a side file, `score_head.safetensors` (tensors `score_head.kernel` [D] and
`score_head.bias` []), which `transformers` ignores and `load_hf` reads back when present.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from rlhf_jax.errors import UserError
from rlhf_jax.models.config import DTYPES, ModelConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SCORE_HEAD_FILE = "score_head.safetensors"

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "qwen2", "qwen3", "mistral")
_ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
# Files save_hf writes itself; never copied over from a tokenizer directory.
_OWN_FILES = {CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE, SCORE_HEAD_FILE, "generation_config.json"}


class HFCheckpointError(UserError):
    """A Hugging Face checkpoint that does not match its config or our model family.

    `where` is the file (config.json, a safetensors file) or field at fault."""


# ----------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def _dtype_name(d: dict) -> str:
    # transformers 5 writes "dtype", 4.x wrote "torch_dtype".
    name = d.get("dtype", d.get("torch_dtype")) or "float32"
    return name if name in DTYPES else "float32"


def _require(d: dict, key: str, ok: Callable[[Any], bool], want: str, source: str, default=None):
    value = d.get(key, default)
    if not ok(value):
        raise HFCheckpointError(source, f"{key}={value!r} is not supported (rlhf_jax needs {want})")
    return value


# HF `rope_parameters` keys of each supported rope_type (besides rope_type / type / rope_theta)
# -> our ModelConfig field.
_ROPE_FIELDS = {
    "default": {},
    "llama3": {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
               "high_freq_factor": "rope_high_freq_factor",
               "original_max_position_embeddings": "rope_original_max_len"},
}


def _rope_config(d: dict, source: str) -> dict:
    """ModelConfig's RoPE fields (rope_theta, rope_type, the scaling) from `rope_parameters`
    (transformers 5) or `rope_theta` + `rope_scaling` (4.x); anything else is an error."""
    out = {"rope_theta": float(d.get("rope_theta", 10000.0))}
    found = None
    for field in ("rope_parameters", "rope_scaling"):  # 5.x, 4.x
        spec = d.get(field)
        if spec is None:
            continue
        if not isinstance(spec, dict):
            raise HFCheckpointError(source, f"{field}={spec!r} is not a dict")
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind not in _ROPE_FIELDS:
            raise HFCheckpointError(
                source, f"{field}={spec!r} is not supported; rlhf_jax implements rope_type "
                f"{sorted(_ROPE_FIELDS)}")
        keys = _ROPE_FIELDS[kind]
        # Anything beyond these (partial rotary, attention factors, per-layer-type tables)
        # changes the math.
        extra = sorted(set(spec) - {"rope_type", "type", "rope_theta"} - set(keys))
        missing = sorted(set(keys) - set(spec))
        if extra or missing:
            raise HFCheckpointError(
                source, f"{field}={spec!r}: " + (f"key(s) {extra} are not supported"
                                                 if extra else f"key(s) {missing} are missing")
                + f" for rope_type={kind!r}")
        this = {"rope_theta": float(spec.get("rope_theta", out["rope_theta"])), "rope_type": kind}
        for hf_key, ours in keys.items():
            this[ours] = int(spec[hf_key]) if ours == "rope_original_max_len" else float(spec[hf_key])
        if found is not None and this != found:
            raise HFCheckpointError(source, f"rope_parameters and rope_scaling disagree "
                                    f"({found} vs {this})")
        found = this
    out.update(found or {})
    return out


def config_from_hf(hf: dict, source: str = CONFIG_FILE) -> ModelConfig:
    """A `ModelConfig` for a Hugging Face `config.json` dict (model_type gpt2/llama/qwen2/qwen3/
    mistral).

    Raises HFCheckpointError naming the field and `source` for anything our decoder does not
    compute exactly (other architectures, RoPE scalings other than Llama 3's, sliding windows in
    use, biases on the output/MLP projections, other activations).
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HFCheckpointError(source, f"model_type={model_type!r} is not supported",
                                f"rlhf_jax converts {list(SUPPORTED_MODEL_TYPES)}")
    try:
        return _config_from_hf(hf, model_type, source)
    except KeyError as e:
        raise HFCheckpointError(source, f"required field {e.args[0]!r} is missing") from None


def _config_from_hf(hf: dict, model_type: str, source: str) -> ModelConfig:
    common = dict(vocab_size=int(hf["vocab_size"]), param_dtype=_dtype_name(hf), hf_model_type=model_type)
    if model_type == "gpt2":
        _require(hf, "activation_function", lambda v: v in ("gelu_new", "gelu_pytorch_tanh"),
                 "the tanh GELU 'gelu_new'", source, "gelu_new")
        _require(hf, "scale_attn_weights", lambda v: v is True, "True", source, True)
        _require(hf, "scale_attn_by_inverse_layer_idx", lambda v: not v, "False", source, False)
        _require(hf, "add_cross_attention", lambda v: not v, "False", source, False)
        n_inner = hf.get("n_inner")
        return ModelConfig(
            arch="gpt2",
            d_model=int(hf["n_embd"]),
            n_layers=int(hf["n_layer"]),
            n_heads=int(hf["n_head"]),
            d_ff=int(n_inner) if n_inner else None,
            max_len=int(hf["n_positions"]),
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            **common,
        )

    # Llama family.
    _require(hf, "hidden_act", lambda v: v == "silu", "'silu' (SwiGLU)", source, "silu")
    if model_type in ("llama", "qwen3"):
        _require(hf, "attention_bias", lambda v: not v, "False (o_proj bias is not implemented)",
                 source, False)
    if model_type == "llama":
        _require(hf, "mlp_bias", lambda v: not v, "False", source, False)
    if model_type in ("qwen2", "qwen3"):
        layer_types = hf.get("layer_types") or []
        sliding = [i for i, t in enumerate(layer_types) if t != "full_attention"]
        # transformers 4.x: layers from max_window_layers on use the window (if one is set).
        if sliding or (hf.get("use_sliding_window") and not layer_types and hf.get("sliding_window")
                       and int(hf.get("max_window_layers", 0)) < int(hf["num_hidden_layers"])):
            raise HFCheckpointError(
                source, f"use_sliding_window / layer_types put sliding-window attention on "
                f"layers {sliding or 'from max_window_layers on'}; only full attention is "
                "implemented")
    if model_type == "mistral":
        window = hf.get("sliding_window")
        if window is not None and int(window) < int(hf["max_position_embeddings"]):
            raise HFCheckpointError(
                source, f"sliding_window={window} < max_position_embeddings="
                f"{hf['max_position_embeddings']} is a sliding window in use; only full "
                "attention is implemented", "set sliding_window to null to use full attention")
    d_model, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    n_kv = int(hf.get("num_key_value_heads") or n_heads)
    head_dim = hf.get("head_dim")
    # Keep the derived default as None so configs compare equal across a round trip.
    head_dim = None if head_dim in (None, d_model // n_heads) else int(head_dim)
    return ModelConfig(
        arch="llama",
        d_model=d_model,
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=None if n_kv == n_heads else n_kv,
        head_dim=head_dim,
        d_ff=int(hf["intermediate_size"]),
        max_len=int(hf.get("max_position_embeddings", 2048)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        **_rope_config(hf, source),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **common,
    )


def _export_model_type(cfg: ModelConfig) -> str:
    if cfg.is_gpt2:
        want = cfg.hf_model_type or "gpt2"
        if want != "gpt2":
            raise HFCheckpointError("model.hf_model_type", f"{want!r} cannot describe arch='gpt2'")
        return want
    want = cfg.hf_model_type or ("qwen2" if cfg.qkv_bias else "qwen3" if cfg.qk_norm else "llama")
    if want not in ("llama", "qwen2", "qwen3", "mistral"):
        raise HFCheckpointError("model.hf_model_type", f"{want!r} cannot describe arch='llama'")
    if (want == "qwen2") != cfg.qkv_bias:
        raise HFCheckpointError(
            "model.hf_model_type", f"{want!r} with model.qkv_bias={cfg.qkv_bias}: Hugging Face has "
            "q/k/v biases without an o_proj bias only in qwen2",
            "use hf_model_type='qwen2' iff qkv_bias")
    if (want == "qwen3") != cfg.qk_norm:
        raise HFCheckpointError(
            "model.hf_model_type", f"{want!r} with model.qk_norm={cfg.qk_norm}: Hugging Face has "
            "per-head q/k RMSNorm only in qwen3", "use hf_model_type='qwen3' iff qk_norm")
    return want


def config_to_hf(cfg: ModelConfig) -> dict:
    """The `config.json` dict `transformers` needs to rebuild this model exactly."""
    model_type = _export_model_type(cfg)
    out: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [_ARCHITECTURES[model_type]],
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "dtype": cfg.param_dtype,
    }
    if cfg.is_gpt2:
        out.update(
            n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
            n_inner=None if cfg.ff_dim == 4 * cfg.d_model else cfg.ff_dim,
            n_positions=cfg.max_len, layer_norm_epsilon=cfg.norm_eps,
            activation_function="gelu_new", scale_attn_weights=True,
            scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
            # Our dropout acts on the embeddings and the residual branches, not on attention.
            embd_pdrop=cfg.dropout, resid_pdrop=cfg.dropout, attn_pdrop=0.0,
        )
        return out
    out.update(
        hidden_size=cfg.d_model, intermediate_size=cfg.ff_dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.dim_per_head, max_position_embeddings=cfg.max_len,
        rms_norm_eps=cfg.norm_eps, hidden_act="silu", attention_dropout=0.0,
        # transformers >= 5 reads rope_parameters; 4.x reads rope_theta (and rope_scaling).
        rope_theta=cfg.rope_theta,
        rope_parameters={"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta,
                         **{k: getattr(cfg, ours) for k, ours in _ROPE_FIELDS[cfg.rope_type].items()}},
    )
    if cfg.rope_type != "default":
        out["rope_scaling"] = {k: v for k, v in out["rope_parameters"].items() if k != "rope_theta"}
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    elif model_type in ("qwen2", "qwen3"):
        out.update(use_sliding_window=False, sliding_window=None,
                   layer_types=["full_attention"] * cfg.n_layers)
        if model_type == "qwen3":
            out.update(attention_bias=False)
    else:
        out.update(sliding_window=None)
    return out


# ----------------------------------------------------------------------------------------------
# The tensor mapping. A rule ties a group of HF tensors to a group of our leaves (usually one
# to one; GPT-2's fused c_attn is one to three) with exact inverse transforms.


@dataclasses.dataclass(frozen=True)
class _Rule:
    hf: tuple[str, ...]  # HF names; "{i}" is the layer index for per-layer rules
    ours: tuple[tuple[str, ...], ...]  # paths in our tree (per-layer leaves live under "layers")
    hf_shapes: tuple[tuple[int, ...], ...]
    to_ours: Callable[[list[np.ndarray]], list[np.ndarray]]
    to_hf: Callable[[list[np.ndarray]], list[np.ndarray]]
    layered: bool = False


def _same(xs):
    return list(xs)


def _t(xs):
    return [x.T for x in xs]


def _rules(cfg: ModelConfig, prefix: str) -> list[_Rule]:
    D, H, KV, Dh, F, V = (cfg.d_model, cfg.n_heads, cfg.kv_heads,
                          cfg.dim_per_head, cfg.ff_dim, cfg.vocab_size)
    R = _Rule
    rules: list[_Rule] = []
    if cfg.is_gpt2:
        p, lp = prefix, prefix + "h.{i}."
        rules += [
            R((p + "wte.weight",), (("embed", "embedding"),), ((V, D),), _same, _same),
            R((p + "wpe.weight",), (("pos_embed", "embedding"),), ((cfg.max_len, D),), _same, _same),
            R((p + "ln_f.weight", p + "ln_f.bias"), (("final_norm", "scale"), ("final_norm", "bias")),
              ((D,), (D,)), _same, _same),
        ]
        # Conv1D weights are [in, out]: the same orientation as our kernels.
        split_w = lambda xs: [w.reshape(D, H, Dh) for w in np.split(xs[0], 3, axis=1)]  # noqa: E731
        join_w = lambda xs: [np.concatenate([w.reshape(D, H * Dh) for w in xs], axis=1)]  # noqa: E731
        split_b = lambda xs: [b.reshape(H, Dh) for b in np.split(xs[0], 3)]  # noqa: E731
        join_b = lambda xs: [np.concatenate([b.reshape(H * Dh) for b in xs])]  # noqa: E731
        layer = [
            R(("ln_1.weight", "ln_1.bias"), (("attn_norm", "scale"), ("attn_norm", "bias")),
              ((D,), (D,)), _same, _same),
            R(("ln_2.weight", "ln_2.bias"), (("mlp_norm", "scale"), ("mlp_norm", "bias")),
              ((D,), (D,)), _same, _same),
            R(("attn.c_attn.weight",), (("q", "kernel"), ("k", "kernel"), ("v", "kernel")),
              ((D, 3 * H * Dh),), split_w, join_w),
            R(("attn.c_attn.bias",), (("q", "bias"), ("k", "bias"), ("v", "bias")),
              ((3 * H * Dh,),), split_b, join_b),
            R(("attn.c_proj.weight",), (("o", "kernel"),), ((H * Dh, D),),
              lambda xs: [xs[0].reshape(H, Dh, D)], lambda xs: [xs[0].reshape(H * Dh, D)]),
            R(("attn.c_proj.bias",), (("o", "bias"),), ((D,),), _same, _same),
            R(("mlp.c_fc.weight", "mlp.c_fc.bias"), (("fc_in", "kernel"), ("fc_in", "bias")),
              ((D, F), (F,)), _same, _same),
            R(("mlp.c_proj.weight", "mlp.c_proj.bias"), (("fc_out", "kernel"), ("fc_out", "bias")),
              ((F, D), (D,)), _same, _same),
        ]
    else:
        p, lp = prefix, prefix + "layers.{i}."
        rules += [
            R((p + "embed_tokens.weight",), (("embed", "embedding"),), ((V, D),), _same, _same),
            R((p + "norm.weight",), (("final_norm", "scale"),), ((D,),), _same, _same),
        ]

        def heads_in(n):  # nn.Linear [n*Dh, D] <-> our [D, n, Dh]
            return (lambda xs: [xs[0].T.reshape(D, n, Dh)],
                    lambda xs: [xs[0].reshape(D, n * Dh).T])

        layer = [
            R(("input_layernorm.weight",), (("attn_norm", "scale"),), ((D,),), _same, _same),
            R(("post_attention_layernorm.weight",), (("mlp_norm", "scale"),), ((D,),), _same, _same),
            R(("self_attn.q_proj.weight",), (("q", "kernel"),), ((H * Dh, D),), *heads_in(H)),
            R(("self_attn.k_proj.weight",), (("k", "kernel"),), ((KV * Dh, D),), *heads_in(KV)),
            R(("self_attn.v_proj.weight",), (("v", "kernel"),), ((KV * Dh, D),), *heads_in(KV)),
            # nn.Linear [D, H*Dh] <-> our [H, Dh, D]
            R(("self_attn.o_proj.weight",), (("o", "kernel"),), ((D, H * Dh),),
              lambda xs: [xs[0].T.reshape(H, Dh, D)], lambda xs: [xs[0].reshape(H * Dh, D).T]),
            R(("mlp.gate_proj.weight",), (("gate", "kernel"),), ((F, D),), _t, _t),
            R(("mlp.up_proj.weight",), (("up", "kernel"),), ((F, D),), _t, _t),
            R(("mlp.down_proj.weight",), (("down", "kernel"),), ((D, F),), _t, _t),
        ]
        if cfg.qk_norm:
            for name in ("q", "k"):
                layer.append(R((f"self_attn.{name}_norm.weight",), ((f"{name}_norm", "scale"),),
                               ((Dh,),), _same, _same))
        if cfg.qkv_bias:
            for name, n in (("q", H), ("k", KV), ("v", KV)):
                layer.append(R((f"self_attn.{name}_proj.bias",), ((name, "bias"),), ((n * Dh,),),
                               lambda xs, n=n: [xs[0].reshape(n, Dh)],
                               lambda xs, n=n: [xs[0].reshape(n * Dh)]))
    if not cfg.tie_embeddings:
        rules.append(R(("lm_head.weight",), (("lm_head", "kernel"),), ((V, D),), _t, _t))
    for r in layer:
        rules.append(dataclasses.replace(
            r, hf=tuple(lp + n for n in r.hf), ours=tuple(("layers", *o) for o in r.ours),
            layered=True))
    return rules


# Tensors some checkpoints carry that are buffers, not parameters (recomputed by our code).
_BUFFERS = {
    "gpt2": re.compile(r"^(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$"),
    "llama": re.compile(r"^(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),
}


# ----------------------------------------------------------------------------------------------
# Reading


class _Reader:
    """Lazy access to the tensors of a single-file or sharded safetensors checkpoint."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, INDEX_FILE)
        single = os.path.join(path, WEIGHTS_FILE)
        if os.path.exists(index):
            with open(index) as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise HFCheckpointError(index, f"not a safetensors index ({e!r})") from e
            self.index = index
        elif os.path.exists(single):
            weight_map, self.index = None, None
        else:
            raise HFCheckpointError(
                path, f"neither {WEIGHTS_FILE} nor {INDEX_FILE} found (only safetensors "
                "checkpoints are supported)", "re-save a .bin checkpoint with safe_serialization")
        self._handles: dict[str, Any] = {}
        self.file_of: dict[str, str] = {}  # tensor name -> file that holds it
        files = sorted(set(weight_map.values())) if weight_map else [WEIGHTS_FILE]
        for fname in files:
            full = os.path.join(path, fname)
            if not os.path.exists(full):
                raise HFCheckpointError(full, f"listed in {self.index} but missing")
            handle = self._handles[full] = safe_open(full, framework="np")
            for name in handle.keys():
                self.file_of[name] = full
        if weight_map:
            for name, fname in weight_map.items():
                full = os.path.join(path, fname)
                if self.file_of.get(name) != full:
                    raise HFCheckpointError(
                        full, f"tensor {name!r} is missing from {full} (where {self.index} puts "
                        "it)")
        self.used: set[str] = set()

    def where(self, name: str) -> str:
        if self.index:
            return f"{self.index} (and its shards)"
        return os.path.join(self.path, WEIGHTS_FILE)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.file_of[name]].get_slice(name).get_shape())

    def get(self, name: str, shape: tuple[int, ...], why: str) -> np.ndarray:
        if name not in self.file_of:
            raise HFCheckpointError(self.where(name), f"tensor {name!r} is missing from "
                                    f"{self.where(name)} ({why})")
        got = self.shape(name)
        if got != tuple(shape):
            raise HFCheckpointError(
                self.file_of[name],
                f"tensor {name!r} has shape {got}, but {why} needs {tuple(shape)}")
        self.used.add(name)
        return self._handles[self.file_of[name]].get_tensor(name)


def _describe(cfg: ModelConfig, source: str) -> str:
    return (f"{source} (d_model={cfg.d_model}, n_layers={cfg.n_layers}, heads={cfg.n_heads}/"
            f"{cfg.kv_heads}x{cfg.dim_per_head}, d_ff={cfg.ff_dim}, vocab={cfg.vocab_size}, "
            f"tied={cfg.tie_embeddings})")


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def _has(tree: dict, path: tuple[str, ...]) -> bool:
    try:
        _get(tree, path)
        return True
    except (KeyError, TypeError):
        return False


def _place(arr: np.ndarray, sharding) -> jax.Array:
    if sharding is None:
        return jnp.asarray(arr)
    # Each device receives only its own shard (also works when the mesh spans processes).
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def load_hf(path: str, *, dtype: str | None = None, shardings=None) -> tuple[ModelConfig, dict]:
    """Read a Hugging Face causal-LM directory into `(ModelConfig, params)`.

    dtype: cast every parameter to this dtype (e.g. "float32"); None keeps the checkpoint's
      dtype (`dtype`/`torch_dtype` in config.json). `cfg.param_dtype` records the result.
    shardings: None (default device), a tree of `jax.sharding.Sharding` parallel to the
      returned params, or a callable `(cfg, heads) -> tree` (heads is ("lm",) or ("lm", "score")
      when a `score_head.safetensors` side file is present). Each tensor is placed straight onto
      its sharding, leaf by leaf, so the whole model never sits on one device.
    """
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise HFCheckpointError(config_path, "not found",
                                f"is {path!r} a Hugging Face model directory?")
    with open(config_path) as f:
        cfg = config_from_hf(json.load(f), source=config_path)
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of {DTYPES}")
        cfg = cfg.replace(param_dtype=dtype)
    target = np.dtype(jnp.dtype(cfg.param_dtype))
    reader = _Reader(path)
    score_path = os.path.join(path, SCORE_HEAD_FILE)
    heads = ("lm", "score") if os.path.exists(score_path) else ("lm",)
    if callable(shardings):
        shardings = shardings(cfg, heads)

    prefix = ""
    if cfg.is_gpt2 and any(n.startswith("transformer.") for n in reader.file_of):
        prefix = "transformer."
    if not cfg.is_gpt2 and "embed_tokens.weight" not in reader.file_of:
        prefix = "model."  # LlamaForCausalLM; a bare LlamaModel has no prefix
    why = _describe(cfg, config_path)

    params: dict = {}

    def put(ours_path, arr):
        sharding = None
        if shardings is not None:
            try:
                sharding = _get(shardings, ours_path)
            except (KeyError, TypeError):
                raise ValueError(f"shardings has no entry for parameter {'/'.join(ours_path)}") from None
        # (np.ascontiguousarray would turn the 0-d score bias into shape [1].)
        _set(params, ours_path, _place(np.asarray(arr, dtype=target, order="C"), sharding))

    for rule in _rules(cfg, prefix):
        layers = range(cfg.n_layers) if rule.layered else [None]
        per_layer = []
        for i in layers:
            hf = [reader.get(n.format(i=i), s, why) for n, s in zip(rule.hf, rule.hf_shapes)]
            per_layer.append(rule.to_ours(hf))
        for j, path_j in enumerate(rule.ours):
            arrs = [outs[j] for outs in per_layer]
            put(path_j, np.stack(arrs) if rule.layered else arrs[0])
        del per_layer

    leftover = sorted(set(reader.file_of) - reader.used)
    if cfg.tie_embeddings and "lm_head.weight" in leftover:
        # Some exporters write the tied head anyway; accept it only if it really is tied.
        emb = reader.get(prefix + ("wte.weight" if cfg.is_gpt2 else "embed_tokens.weight"),
                         (cfg.vocab_size, cfg.d_model), why)
        if not np.array_equal(reader.get("lm_head.weight", (cfg.vocab_size, cfg.d_model), why), emb):
            raise HFCheckpointError(
                reader.file_of['lm_head.weight'], "tensor 'lm_head.weight' differs from the "
                f"embedding but {config_path} says tie_word_embeddings=true")
        leftover.remove("lm_head.weight")
    buffers = _BUFFERS["gpt2" if cfg.is_gpt2 else "llama"]
    leftover = [n for n in leftover if not buffers.match(n)]
    if leftover:
        raise HFCheckpointError(
            reader.file_of[leftover[0]], f"unexpected tensor {leftover[0]!r}"
            + (f" (and {len(leftover) - 1} more)" if len(leftover) > 1 else "")
            + f": it has no place in the model that {config_path} describes")

    if "score" in heads:
        with safe_open(score_path, framework="np") as f:
            names = set(f.keys())
            want = {"score_head.kernel": (cfg.d_model,), "score_head.bias": ()}
            extra = sorted(names - set(want))
            if extra:
                raise HFCheckpointError(score_path, f"unexpected tensor {extra[0]!r}")
            for name, shape in want.items():
                if name not in names:
                    raise HFCheckpointError(score_path, f"tensor {name!r} is missing")
                got = tuple(f.get_slice(name).get_shape())
                if got != shape:
                    raise HFCheckpointError(
                        score_path, f"tensor {name!r} has shape {got}, expected {shape}")
                put(("score_head", name.split(".")[1]), f.get_tensor(name))
    return cfg, params


# ----------------------------------------------------------------------------------------------
# Writing


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def hf_state_dict(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """Our params as Hugging Face tensors (names and layouts `save_pretrained` would write).

    The score head, if any, is left out (see `save_hf`).
    """
    prefix = "transformer." if cfg.is_gpt2 else "model."
    out: dict[str, np.ndarray] = {}
    for rule in _rules(cfg, prefix):
        try:
            ours = [_to_numpy(_get(params, p)) for p in rule.ours]
        except KeyError:
            missing = next(p for p in rule.ours if not _has(params, p))
            hint = (" (a score-only model of an untied config has no LM head to export)"
                    if missing[0] == "lm_head" else "")
            raise ValueError(f"params lack {'/'.join(missing)}, needed for a Hugging Face "
                             f"{_export_model_type(cfg)} checkpoint{hint}") from None
        for p, arr in zip(rule.ours, ours):
            if rule.layered and arr.shape[:1] != (cfg.n_layers,):
                raise ValueError(f"params/{'/'.join(p)} has shape {arr.shape}; expected "
                                 f"n_layers={cfg.n_layers} first")
        layers = range(cfg.n_layers) if rule.layered else [None]
        for i in layers:
            hf = rule.to_hf([a[i] for a in ours] if rule.layered else ours)
            for name, arr, shape in zip(rule.hf, hf, rule.hf_shapes):
                if arr.shape != shape:
                    raise ValueError(f"exporting {name.format(i=i)}: shape {arr.shape}, expected {shape}")
                out[name.format(i=i)] = np.asarray(arr, order="C")
    return out


def save_hf(cfg: ModelConfig, params: dict, path: str, tokenizer_dir: str | None = None, *,
            extra_config: dict | None = None) -> None:
    """Write `config.json` + `model.safetensors` that `transformers.AutoModelForCausalLM` loads.

    A `score_head` in params goes to the side file `score_head.safetensors` (Hugging Face
    causal-LM checkpoints have no place for it; `load_hf` reads it back). tokenizer_dir: every
    file in it (except config/weights) is copied next to the model. extra_config: more
    `config.json` fields (e.g. `eos_token_id`); it may not override architecture fields.
    In a multi-process run every process must call this; process 0 writes.
    """
    hf_config = config_to_hf(cfg)
    clash = sorted(set(extra_config or {}) & set(hf_config))
    if clash:
        raise ValueError(f"extra_config may not override architecture fields {clash}")
    hf_config.update(extra_config or {})
    tensors = hf_state_dict(cfg, params)
    score = None
    if "score_head" in params:
        score = {f"score_head.{k}": _to_numpy(v) for k, v in params["score_head"].items()}
    if jax.process_index() != 0:
        return
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
    # A stale index or score head from an earlier export would shadow / contradict this one.
    for stale in (INDEX_FILE,) + (() if score else (SCORE_HEAD_FILE,)):
        if os.path.exists(os.path.join(path, stale)):
            os.remove(os.path.join(path, stale))
    if score:
        save_file(score, os.path.join(path, SCORE_HEAD_FILE), metadata={"format": "np"})
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    if tokenizer_dir:
        if not os.path.isdir(tokenizer_dir):
            raise UserError("tokenizer_dir", f"{tokenizer_dir!r} is not a directory")
        for name in sorted(os.listdir(tokenizer_dir)):
            src = os.path.join(tokenizer_dir, name)
            if os.path.isfile(src) and name not in _OWN_FILES and not name.endswith(".safetensors"):
                shutil.copyfile(src, os.path.join(path, name))
