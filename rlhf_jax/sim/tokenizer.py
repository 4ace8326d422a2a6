"""The simulated world's tokenizer: word level, trained with `tokenizers`, loaded like a checkpoint's.

One token per word and per punctuation mark keeps sequences short (a prompt is <= 8 tokens, a
continuation <= 20). Words carry SentencePiece's "▁" space marker, so decoding restores the
spaces exactly: `decode(encode(t)) == normalize(t)` where `normalize` lower-cases and collapses
whitespace (the world's text is already in that form). The directory is written with
`PreTrainedTokenizerFast.save_pretrained`, so `transformers.AutoTokenizer.from_pretrained(dir)`
loads it exactly as it loads a real model's tokenizer; stages take either.

Special tokens have distinct ids: <pad> 0, <eos> 1, <bos> 2, <unk> 3. No BOS is ever prepended
(the encoders in `rlhf_jax.data.tokenize` pass `add_special_tokens=False`).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import shutil
import tempfile
from pathlib import Path

from rlhf_jax.paths import cache_dir
from rlhf_jax.sim.world import World, get_world

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
TOKENIZER_VERSION = 1
_TRAIN_DOCS = 20_000  # corpus sample the trainer counts words on (~400k tokens)


def normalize(text: str) -> str:
    """The text form the tokenizer round-trips: lower case, single spaces, no outer spaces."""
    return re.sub(r"\s+", " ", text.lower()).strip()


def build_tokenizer(world: World, num_docs: int = _TRAIN_DOCS):
    """Train a word-level `tokenizers.Tokenizer` on a sample of the world's corpus."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    # Same as `normalize`: what the tokenizer sees is what round-trips.
    tok.normalizer = normalizers.Sequence([
        normalizers.Lowercase(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.WordLevelTrainer(
        vocab_size=1_000_000, min_frequency=1, special_tokens=list(SPECIAL_TOKENS),
        show_progress=False)
    # The corpus sample gives frequency order; listing the vocabulary once more guarantees that
    # rare words the sample missed still get an id (the world can emit every one of them).
    # " ." adds the bare "▁" token, so "great ." (space before a mark) also round-trips.
    vocab_text = " ".join(w for w in world.vocabulary() if w not in ",.")
    tok.train_from_iterator(itertools.chain(world.corpus(0, num_docs), [vocab_text, "a ."]),
                            trainer=trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(s) != i:
            raise RuntimeError(f"special token {s} got id {tok.token_to_id(s)}, expected {i}")
    return tok


def _wrap(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
        unk_token="<unk>", clean_up_tokenization_spaces=False, padding_side="right")


def world_tokenizer(seed: int = 0, directory: str | os.PathLike | None = None,
                    variant: str = "default"):
    """(tokenizer, dir): the world's tokenizer, built once and cached as a Hugging Face directory.

    `variant` names the world (`rlhf_jax.sim.world.WORLD_VARIANTS`): a variant's own words
    (typos, refusal, group words) get their own ids. The directory is
    `cache_dir()/tokenizer-<hash of world fingerprint + tokenizer version>` unless given.
    It is written to a temporary directory and renamed, so concurrent builders do not collide.
    """
    from transformers import AutoTokenizer

    world = get_world(seed, variant)
    key = hashlib.sha256(f"{world.fingerprint()}-{TOKENIZER_VERSION}-{_TRAIN_DOCS}".encode())
    path = Path(directory) if directory is not None else cache_dir() / f"tokenizer-{key.hexdigest()[:12]}"
    if not (path / "tokenizer.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=path.parent))
        try:
            _wrap(build_tokenizer(world)).save_pretrained(str(tmp))
            try:
                os.rename(tmp, path)
            except OSError:
                if not (path / "tokenizer.json").exists():  # not another process's win: real error
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(str(path)), path
