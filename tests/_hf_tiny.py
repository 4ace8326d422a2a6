"""A random 1-layer Hugging Face GPT-2 with a byte-level BPE tokenizer trained on test fixtures.

GPT-2 style: EOS and no pad token, so the stages pad with EOS and only masks tell them apart.
Shared by the RM and PPO smoke tests of the real-data configs (`rm_hh`, `ppo_hf`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

FIX = Path(__file__).resolve().parent / "fixtures"


def tiny_gpt2(path: Path, *, fixtures=("hh_rlhf.jsonl",), vocab_size: int = 300,
              n_positions: int = 64, bos_is_eos: bool = False):
    """Write the tokenizer and model to `path`; returns the tokenizer."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers

    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [line for f in fixtures for line in (FIX / f).read_text().splitlines()]
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    special = {"eos_token": "<|endoftext|>"}
    if bos_is_eos:
        special["bos_token"] = "<|endoftext|>"
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    fast.save_pretrained(str(path))
    torch.manual_seed(0)
    eos = fast.eos_token_id
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(fast), n_positions=n_positions, n_embd=32, n_layer=1, n_head=2,
        bos_token_id=eos, eos_token_id=eos)).save_pretrained(str(path))
    return fast
