"""Token batches: targets, padding sides, packing, truncation counts, pad == eos."""

import numpy as np
import pytest

from rlhf_jax.data.tokenize import (encode_comparisons, encode_lm, encode_prompts, encode_sft,
                                    special_ids)
from rlhf_jax.sim import tokenizer as simtok
from rlhf_jax.sim.world import get_world


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return simtok.world_tokenizer(0, directory=tmp_path_factory.mktemp("tok") / "t")[0]


@pytest.fixture(scope="module")
def tok_pad_is_eos(tok):
    """The same vocabulary with no pad token, like GPT-2: pad falls back to EOS."""
    from transformers import PreTrainedTokenizerFast

    t = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<eos>")
    assert t.pad_token_id is None
    return t


def ids(tok, *words):
    return [tok.convert_tokens_to_ids(w) for w in words]


def test_sft_hand_built_example(tok):
    batch, stats = encode_sft(tok, ["the movie was"], ["great."], max_len=8)
    the, movie, was, great, dot = ids(tok, "▁the", "▁movie", "▁was", "▁great", ".")
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert batch["tokens"][0].tolist() == [the, movie, was, great, dot, eos, pad, pad]
    assert batch["mask"][0].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    # Prompt tokens weigh 0; the first completion token (predicted from "was") weighs 1; so does EOS.
    assert batch["loss_mask"][0].tolist() == [0, 0, 0, 1, 1, 1, 0, 0]
    assert stats["prompt_truncated"] == 0 and stats["target_tokens"] == 3
    assert all(v.dtype == np.int32 for v in batch.values())


def test_sft_truncates_prompt_from_left_and_counts(tok):
    batch, stats = encode_sft(tok, ["my sister said that the movie was", "i"], ["great.", "was kind."],
                              max_len=5)
    was, great, dot = ids(tok, "▁was", "▁great", ".")
    assert batch["tokens"][0].tolist() == [ids(tok, "▁movie")[0], was, great, dot, tok.eos_token_id]
    assert batch["loss_mask"][0].tolist() == [0, 0, 1, 1, 1]
    assert stats["prompt_truncated"] == 1
    long, stats = encode_sft(tok, ["i"], ["was very very very kind."], max_len=4)
    assert stats["completion_truncated"] == 1 and long["loss_mask"][0, 0] == 0


def test_sft_packed_rows_carry_the_same_examples(tok):
    w = get_world(0)
    prompts, completions = w.demonstrations(0, 40)
    un, _ = encode_sft(tok, prompts, completions, max_len=32)
    pk, st = encode_sft(tok, prompts, completions, max_len=32, pack=True)
    assert pk["tokens"].shape[0] < un["tokens"].shape[0] and st["rows"] == pk["tokens"].shape[0]
    per_example = []
    for r in range(pk["tokens"].shape[0]):
        seg = pk["segment_ids"][r]
        for s in range(1, seg.max() + 1):
            sel = seg == s
            assert pk["positions"][r][sel].tolist() == list(range(sel.sum()))
            per_example.append((pk["tokens"][r][sel].tolist(), pk["loss_mask"][r][sel].tolist()))
    assert len(per_example) == 40
    for i, (t, lm) in enumerate(per_example):
        sel = un["mask"][i] == 1
        assert t == un["tokens"][i][sel].tolist() and lm == un["loss_mask"][i][sel].tolist()
    assert (pk["mask"] == (pk["segment_ids"] > 0)).all()
    assert pk["loss_mask"].sum() == un["loss_mask"].sum()


def test_lm_unpacked_and_packed(tok):
    texts = ["the movie was great.", "i smiled.", "we ran and we ran and we ran and we ran."]
    un, st = encode_lm(tok, texts, seq_len=8)
    eos = tok.eos_token_id
    assert un["tokens"][1, :4].tolist() == ids(tok, "▁i", "▁smiled", ".") + [eos]
    assert un["loss_mask"][1].tolist() == [0, 1, 1, 1, 0, 0, 0, 0]
    assert st["truncated"] == 1 and un["mask"][2].all()
    pk, st = encode_lm(tok, texts, seq_len=8, pack=True)
    assert st["split"] == 1
    # Every token of every text (+ EOS) is kept, in order; each segment's first token is no target.
    kept = pk["tokens"][pk["mask"] == 1].tolist()
    want = sum((x + [eos] for x in tok(texts, add_special_tokens=False)["input_ids"]), [])
    assert kept == want
    starts = (pk["positions"] == 0) & (pk["mask"] == 1)
    assert (pk["loss_mask"][starts] == 0).all()
    assert pk["loss_mask"].sum() == pk["mask"].sum() - starts.sum()


def test_prompts_left_padded(tok):
    b, st = encode_prompts(tok, ["the movie was", "i", "my old sister said that the movie was"], 5)
    the, movie, was = ids(tok, "▁the", "▁movie", "▁was")
    pad = tok.pad_token_id
    assert b["prompt_tokens"][0].tolist() == [pad, pad, the, movie, was]
    assert b["prompt_mask"][0].tolist() == [0, 0, 1, 1, 1]
    assert b["prompt_mask"][1].tolist() == [0, 0, 0, 0, 1]
    assert b["prompt_tokens"][2, -3:].tolist() == [the, movie, was] and b["prompt_mask"][2].all()
    assert st["truncated"] == 1
    with pytest.raises(ValueError, match="prompt 0"):
        encode_prompts(tok, [""], 5)


def test_comparisons_layout(tok):
    b, st = encode_comparisons(tok, ["the movie was", "i"],
                               [["great.", "bad and sad.", "ok."], ["smiled.", "cried."]],
                               [[1, 2, 0], [0, 1]], max_len=8)
    assert b["tokens"].shape == (2, 3, 8) and b["rank"].tolist() == [[1, 2, 0], [0, 1, -1]]
    eos = tok.eos_token_id
    assert b["response_mask"][0, 1].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert b["tokens"][0, 1, 7] == eos and b["tokens"][0, 0, 5] == eos
    assert b["mask"][1, 2].sum() == 0 and b["response_mask"][1, 2].sum() == 0
    assert (b["response_mask"] <= b["mask"]).all()
    # The longest response decides one prompt truncation shared by all K sequences.
    b2, st2 = encode_comparisons(tok, ["the movie was"], [["great.", "bad and sad."]], [[0, 1]], 6)
    assert st2["prompt_truncated"] == 1
    assert (b2["tokens"][0, :, 0] == ids(tok, "▁was")[0]).all()
    with pytest.raises(ValueError, match="comparison 0"):
        encode_comparisons(tok, ["x"], [["a.", "b."]], [[0, 0]], 8)
    with pytest.raises(ValueError, match="comparison 0: 2 responses but 3 ranks"):
        encode_comparisons(tok, ["x"], [["a.", "b."]], [[0, 1, 2]], 8)


def test_pad_equal_to_eos(tok_pad_is_eos):
    t = tok_pad_is_eos
    pad, eos = special_ids(t)
    assert pad == eos == 1
    b, _ = encode_sft(t, ["the movie was"], ["great."], max_len=8)
    # The real EOS is a target even though pads after it have the same id.
    assert b["tokens"][0, 5:].tolist() == [eos, eos, eos]
    assert b["mask"][0].tolist() == [1] * 6 + [0, 0]
    assert b["loss_mask"][0].tolist() == [0, 0, 0, 1, 1, 1, 0, 0]
    c, _ = encode_comparisons(t, ["i"], [["smiled.", "was very sad."]], [[0, 1]], 8)
    assert c["response_mask"][0, 0].tolist() == [0, 1, 1, 1, 0, 0, 0, 0]
    p, _ = encode_prompts(t, ["i"], 3)
    assert p["prompt_mask"][0].tolist() == [0, 0, 1]
