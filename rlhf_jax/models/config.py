"""Model configuration: one decoder-only family that covers GPT-2 and Llama/Qwen2/Qwen3/Mistral."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from rlhf_jax.errors import UserError

ARCHES = ("gpt2", "llama")
REMAT_POLICIES = ("none", "full", "dots")
DTYPES = ("float32", "bfloat16", "float16")
ROPE_TYPES = ("default", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the decoder. Frozen and hashable so jitted code can close over it.

    `arch="gpt2"`: learned positions, LayerNorm, GELU (tanh) MLP, biases everywhere, tied
    embeddings. `arch="llama"`: RMSNorm, RoPE, SwiGLU, grouped-query attention; `qkv_bias`
    gives Qwen2, `qk_norm` Qwen3, `rope_type="llama3"` Llama 3.1+; `tie_embeddings` is free for
    either.

    RoPE scaling (`rope_type="llama3"`, Hugging Face's `rope_parameters`): wavelengths longer
    than `rope_original_max_len / rope_low_freq_factor` are stretched by `rope_factor`, those
    shorter than `rope_original_max_len / rope_high_freq_factor` are kept, and the band between
    is interpolated smoothly. The four `rope_*` scaling fields are ignored for "default".
    """

    arch: str = "llama"
    vocab_size: int = 1024
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: = n_heads (multi-head attention)
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int | None = None  # None: 4*d_model (gpt2) or the Llama 8/3 rule rounded to 16
    max_len: int = 512  # learned-position table size (gpt2) / a sanity bound (llama)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"  # or "llama3" (frequency-dependent scaling, Llama 3.1+)
    rope_factor: float = 1.0  # llama3: `factor`
    rope_low_freq_factor: float = 1.0  # llama3: `low_freq_factor`
    rope_high_freq_factor: float = 4.0  # llama3: `high_freq_factor`
    rope_original_max_len: int = 8192  # llama3: `original_max_position_embeddings`
    qkv_bias: bool = False  # Qwen2 has q/k/v biases; GPT-2 always has biases
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k (per head) before RoPE
    tie_embeddings: bool = True
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; logits are always float32
    scan_layers: bool = True
    remat: str = "none"
    dropout: float = 0.0  # off by default in every stage (Huang et al. 2023)
    hf_model_type: str | None = None  # model_type to write on export (gpt2, llama, qwen2, qwen3, mistral)

    def __post_init__(self):
        if self.arch not in ARCHES:
            raise UserError("model.arch", f"{self.arch!r} is not one of {ARCHES}")
        if self.remat not in REMAT_POLICIES:
            raise UserError("model.remat", f"{self.remat!r} is not one of {REMAT_POLICIES}")
        for field in ("param_dtype", "dtype"):
            if getattr(self, field) not in DTYPES:
                raise UserError(f"model.{field}", f"{getattr(self, field)!r} is not one of "
                                f"{DTYPES}")
        if self.d_model % self.n_heads and self.head_dim is None:
            raise UserError(
                "model.d_model", f"{self.d_model} is not divisible by model.n_heads="
                f"{self.n_heads}", "set model.head_dim explicitly")
        if self.n_heads % self.kv_heads:
            raise UserError(
                "model.n_heads", f"{self.n_heads} must be a multiple of model.n_kv_heads="
                f"{self.kv_heads}")
        if self.arch == "gpt2" and self.kv_heads != self.n_heads:
            raise UserError("model.n_kv_heads", "must equal model.n_heads for arch='gpt2'")
        if self.rope_type not in ROPE_TYPES:
            raise UserError("model.rope_type", f"{self.rope_type!r} is not one of {ROPE_TYPES}")
        if self.arch == "gpt2" and (self.qk_norm or self.rope_type != "default"):
            raise UserError("model.arch", "arch='gpt2' has learned positions and no q/k norm",
                            "leave model.rope_type='default' and model.qk_norm=False")
        if self.rope_type == "llama3" and not (
                self.rope_factor > 0 and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor
                and self.rope_original_max_len > 0):
            raise UserError(
                "model.rope_factor", f"llama3 RoPE scaling needs rope_factor > 0, 0 < "
                f"rope_low_freq_factor < rope_high_freq_factor, rope_original_max_len > 0; got "
                f"{self.rope_factor}, {self.rope_low_freq_factor}, {self.rope_high_freq_factor}, "
                f"{self.rope_original_max_len}")

    # Derived sizes -----------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.arch == "gpt2":
            return 4 * self.d_model
        return 16 * -(-int(8 * self.d_model / 3) // 16)

    @property
    def is_gpt2(self) -> bool:
        return self.arch == "gpt2"

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise UserError("model_config", f"unknown field(s) {sorted(unknown)}",
                            f"known: {sorted(names)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


# Small Llama-style models for the simulated world. `vocab_size` is filled in from the world's
# tokenizer. Sizes are the trunk + tied embedding with a ~1.5k-word vocabulary.
PRESETS: dict[str, ModelConfig] = {
    "sim-0.1m": ModelConfig(d_model=48, n_layers=2, n_heads=4, d_ff=128, max_len=128),
    "sim-0.4m": ModelConfig(d_model=96, n_layers=3, n_heads=4, d_ff=256, max_len=128),
    "sim-1.6m": ModelConfig(d_model=160, n_layers=5, n_heads=5, d_ff=448, max_len=128),
    "sim-4m": ModelConfig(d_model=256, n_layers=6, n_heads=8, d_ff=704, max_len=128),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise UserError("config.model.preset", f"{name!r} is unknown",
                        f"choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
