"""Real-size model configs: published Hugging Face hyper-parameters, nothing downloaded.

Each entry builds the model's `transformers` config class (`LlamaConfig`, `Qwen2Config`,
`Qwen3Config`) with the values of the published `config.json` and converts it through the same
path as a checkpoint import (`rlhf_jax.models.hf.config_from_hf`), so a preset is exactly the
`ModelConfig` that `load_hf` would give for the real checkpoint (bf16 parameters, as published).

    cfg = presets.model_config("llama-3.1-8b", remat="full", dtype="bfloat16")
    shapes = models.abstract_params(cfg)   # ShapeDtypeStructs, no memory

Names are case-insensitive and may carry the Hugging Face owner ("meta-llama/Llama-3.1-8B").
The values were checked against copies of the published config.json files (fields quoted in
each entry's comment); the parameter counts they give (tests/test_models_hf_families.py) match
the published totals: 0.494e9, 1.72e9, 8.03e9 and 70.55e9.
"""

from __future__ import annotations

from typing import Any

from rlhf_jax.errors import UserError
from rlhf_jax.models.config import ModelConfig

# The Llama 3.1 family's RoPE: theta 5e5, "llama3" scaling from an 8k pre-training context.
_LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}

# name -> (transformers config class, its keyword arguments).
_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    # Qwen/Qwen2.5-0.5B config.json: hidden 896, intermediate 4864, 24 layers, 14 heads / 2 KV
    # heads, vocab 151936, tied, rope_theta 1e6, rms_norm_eps 1e-6, max_position 32768, sliding
    # window off (copies: the nanoinfer benchmark's QWEN25_05B dict and mlx-audio's Spark-TTS
    # test config, which is Qwen2.5-0.5B's with another vocabulary).
    "qwen2.5-0.5b": ("Qwen2Config", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        max_window_layers=24, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default",
                                                                  "rope_theta": 1000000.0},
        use_sliding_window=False, sliding_window=32768, tie_word_embeddings=True,
        bos_token_id=151643, eos_token_id=151643)),
    # Qwen/Qwen3-1.7B config.json: hidden 2048, intermediate 6144, 28 layers, 16 heads / 8 KV
    # heads of head_dim 128 (not 2048/16), vocab 151936, tied, q/k RMSNorm, rope_theta 1e6,
    # rms_norm_eps 1e-6, max_position 40960, no attention bias (copies: a Qwen3 checkpoint
    # inspector's test fixture for "Qwen/Qwen3-1.7B"; the family-wide fields as in the
    # published Qwen3-4B/8B/14B config.json files collected in LLM-Prof's Model_Config.md).
    "qwen3-1.7b": ("Qwen3Config", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=40960, max_window_layers=28, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        attention_bias=False, use_sliding_window=False, sliding_window=None,
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645)),
    # meta-llama/Llama-3.1-8B config.json (verbatim copy in LLM-Prof's Model_Config.md): hidden
    # 4096, intermediate 14336, 32 layers, 32 heads / 8 KV heads, vocab 128256, untied,
    # rms_norm_eps 1e-5, rope_theta 5e5 with rope_scaling llama3 (factor 8, low 1, high 4,
    # original 8192), max_position 131072, no attention / MLP bias.
    "llama-3.1-8b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_parameters=_LLAMA31_ROPE, attention_bias=False, mlp_bias=False,
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)),
    # meta-llama/Llama-3.1-70B config.json: hidden 8192, intermediate 28672, 80 layers, 64 heads
    # / 8 KV heads, vocab 128256, untied, rms_norm_eps 1e-5, the same rope_scaling as 8B
    # (copies: a Go inference engine's Llama-3.1-70B config test; an hf_sync test's
    # LLAMA_3_1_70B_CONFIG).
    "llama-3.1-70b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_parameters=_LLAMA31_ROPE, attention_bias=False, mlp_bias=False,
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=[128001, 128008, 128009])),
}

NAMES: tuple[str, ...] = tuple(_SPECS)


def _key(name: str) -> str:
    key = str(name).strip().lower().rsplit("/", 1)[-1]  # "meta-llama/Llama-3.1-8B" works too
    if key not in _SPECS:
        raise UserError("model", f"{name!r} is not a real-size preset", f"choose one of {NAMES}")
    return key


def hf_config(name: str):
    """The `transformers` config object of preset `name` (bf16, as published)."""
    import transformers

    cls, kwargs = _SPECS[_key(name)]
    return getattr(transformers, cls)(dtype="bfloat16", **kwargs)


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """`ModelConfig` of preset `name` (see NAMES), converted like a checkpoint import, with
    `overrides` applied (e.g. remat="full", dtype="bfloat16", scan_layers=True)."""
    from rlhf_jax.models import hf

    cfg = hf.config_from_hf(hf_config(name).to_dict(), source=f"rlhf_jax.models.presets:{_key(name)}")
    return cfg.replace(**overrides) if overrides else cfg
