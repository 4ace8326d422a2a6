"""TFDS builders (array_record, read back through as_data_source) and the JSONL parser."""

import json

import numpy as np
import pytest

from rlhf_jax.data import builders as B
from rlhf_jax.sim.judges import get_judge
from rlhf_jax.sim.world import get_world


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = [
    {"prompt": "the movie was", "completion": " great."},
    {"messages": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye?"},
                  {"role": "assistant", "content": "bye."}]},
]


def test_jsonl_parses_both_formats(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", GOOD + [""])  # a trailing blank line is not a row
    rows, stats = B.parse_sft_jsonl(f)
    assert rows[0][:2] == ("the movie was", " great.")
    assert rows[1][:2] == ("system: be kind\nuser: hi\nassistant: hello\nuser: bye?\nassistant:", " bye.")
    assert rows[1][2] == f"{f}:2" and stats == {"examples": 2, "malformed": 0, "malformed_examples": []}


@pytest.mark.parametrize("row, why", [
    ("{not json", "invalid JSON"),
    ({"prompt": "x"}, "missing field 'completion'"),
    ({"prompt": "x", "completion": 3}, "'completion' must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "last message must be the assistant"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, r"messages\[0\]"),
    ({"text": "x"}, "needs 'prompt' and 'completion'"),
    ([1, 2], "expected a JSON object"),
])
def test_jsonl_malformed_names_file_and_line(tmp_path, row, why):
    f = write_jsonl(tmp_path / "bad.jsonl", GOOD + [row])
    with pytest.raises(B.DataFormatError, match=rf"bad.jsonl:3: .*{why}"):
        B.parse_sft_jsonl(f)
    rows, stats = B.parse_sft_jsonl(f, skip_malformed=True)
    assert len(rows) == 2 and stats["malformed"] == 1 and ":3:" in stats["malformed_examples"][0]


def test_jsonl_builder_round_trip_and_skip_count(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", GOOD + ["oops", GOOD[0]])
    ev = write_jsonl(tmp_path / "eval.jsonl", GOOD[:1])
    src = {"kind": "jsonl", "train": str(train), "eval": str(ev), "data_dir": str(tmp_path / "tfds")}
    with pytest.raises(B.DataFormatError, match="train.jsonl:3"):
        B.load_sft_texts(src)
    src["skip_malformed"] = True
    prompts, completions, stats = B.load_sft_texts(src)
    chat = "system: be kind\nuser: hi\nassistant: hello\nuser: bye?\nassistant:"
    assert prompts == ["the movie was", chat, "the movie was"]
    assert completions == [" great.", " bye.", " great."]
    assert stats["malformed"] == 1 and not stats["cached"]
    assert (tmp_path / "tfds" / "rlhf_jax_jsonl_sft").is_dir()
    # Reused build: still reports what was skipped.
    _, _, again = B.load_sft_texts(src)
    assert again["cached"] and again["malformed"] == 1
    p_eval, _, st = B.load_sft_texts(src, "eval")
    assert p_eval == ["the movie was"] and st["malformed"] == 0
    prompts_only, _ = B.load_prompts(src)
    assert prompts_only == prompts


def test_sim_builders_match_the_world(tmp_path):
    src = {"kind": "sim", "seed": 3, "num_train": 40, "num_eval": 7, "data_dir": str(tmp_path)}
    w = get_world(3)
    p, c, stats = B.load_sft_texts(src)
    assert (p, c) == w.demonstrations(0, 40) and stats["examples"] == 40
    p_eval, _, _ = B.load_sft_texts(src, "eval")
    assert p_eval == w.demonstrations(0, 7, "eval")[0]
    texts, _ = B.load_pretrain_texts(src)
    assert texts == w.corpus(0, 40)
    prompts, _ = B.load_prompts(src)
    assert prompts == w.prompts(0, 40)
    _, _, again = B.load_sft_texts(src)
    assert again["cached"]
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['num_trian'\]"):
        B.load_sft_texts({"kind": "sim", "num_trian": 5})
    with pytest.raises(ValueError, match="config.data.source.kind: .csv. must be"):
        B.load_sft_texts({"kind": "csv"})


def test_sim_comparisons(tmp_path):
    src = {"kind": "sim", "seed": 0, "num_train": 60, "num_eval": 0, "k": 3, "data_dir": str(tmp_path),
           "judge": "vader_trap"}
    recs, stats = B.load_comparisons(src)
    assert len(recs) == 60 and stats["tau"] > 0
    judge = get_judge("vader_trap")
    for i, r in enumerate(recs):
        assert r["source"] == f"sim:train:{i}" and len(r["responses"]) == 3
        assert sorted(r["ranks"]) == [0, 1, 2]
        np.testing.assert_allclose(r["gold"], judge.score([r["prompt"]] * 3, r["responses"]), atol=1e-6)
        assert r["annotator"] in {str(a) for a in range(6)} and 0 <= int(r["bucket"]) < 10
    # Labels follow the gold judge more often than not.
    agree = [r["ranks"][int(np.argmax(r["gold"]))] < r["ranks"][int(np.argmin(r["gold"]))]
             for r in recs if max(r["gold"]) > min(r["gold"])]
    assert np.mean(agree) > 0.6
    with pytest.raises(ValueError, match="split 'eval' is not in this dataset"):
        B.load_comparisons(src, "eval")
    with pytest.raises(ValueError, match="unknown judge"):
        B.load_comparisons({**src, "judge": "nope"})
