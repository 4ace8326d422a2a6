"""Real preference formats: each fixture (written in the published format) parses to the expected
prompt / chosen / rejected; malformed rows name file:line; dropped rows are counted."""

import gzip
import json
import shutil
from pathlib import Path

import pytest

from rlhf_jax.data import preference_formats as pf

FIX = Path(__file__).parent / "fixtures"


def test_hh_rlhf_fixture():
    recs, stats = pf.parse_file(str(FIX / "hh_rlhf.jsonl"), "hh_rlhf")
    # 9 rows, one with chosen == rejected ("Say hello.") dropped and counted.
    assert (stats.rows, stats.kept, stats.identical, stats.bad) == (9, 8, 1, 0)
    r = recs[0]
    assert r["prompt"] == "\n\nHuman: What is a good way to keep basil fresh?\n\nAssistant:"
    assert r["responses"] == [
        " Trim the stems and keep the bunch in a glass of water on the counter, loosely covered "
        "with a bag.",
        " Put it in the freezer.",
    ]
    assert r["ranks"] == [0, 1]
    assert r["source"].endswith("hh_rlhf.jsonl:1")
    # Multi-turn: the prompt keeps every earlier turn and ends at the last Assistant cue.
    m = recs[1]
    assert m["prompt"] == (
        "\n\nHuman: Can you help me write a birthday note for my aunt?\n\nAssistant: Of course. "
        "What would you like it to say?\n\nHuman: Something short and warm.\n\nAssistant:")
    assert m["responses"][1] == " Happy birthday."
    # prompt + response reproduces the published dialogue exactly.
    row = json.loads((FIX / "hh_rlhf.jsonl").read_text().splitlines()[1])
    assert m["prompt"] + m["responses"][0] == row["chosen"]
    assert m["prompt"] + m["responses"][1] == row["rejected"]
    # The dropped row's line is skipped in the sources: row 7 is the identical pair.
    assert [r["source"].rsplit(":", 1)[1] for r in recs] == ["1", "2", "3", "4", "5", "6", "8", "9"]


def test_hh_rlhf_gzip(tmp_path):
    gz = tmp_path / "train.jsonl.gz"
    with open(FIX / "hh_rlhf.jsonl", "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    recs, stats = pf.parse_file(str(gz), "hh_rlhf")
    plain, _ = pf.parse_file(str(FIX / "hh_rlhf.jsonl"), "hh_rlhf")
    assert [r["responses"] for r in recs] == [r["responses"] for r in plain]


def test_summarize_comparisons_fixture():
    recs, stats = pf.parse_file(str(FIX / "summarize_comparisons.json"), "summarize_comparisons")
    assert stats.kept == 4
    r0, r1, _, cnn = recs
    assert r0["prompt"] == (
        "SUBREDDIT: r/relationships\n\nTITLE: My roommate keeps eating my food\n\nPOST: We share a "
        "fridge. I label everything and he still eats it. I asked him twice nicely. What should I "
        "do next?\n\nTL;DR:")
    assert r0["responses"] == [
        " Roommate eats my labelled food even after I asked twice; how do I get him to stop?",
        " roommate food"]
    # choice = 1: the second summary is the chosen one.
    assert r1["responses"][0].startswith(" Twelve weeks of training")
    assert r1["responses"][1] == " Legs heavy a week before my first half marathon."
    assert (r0["annotator"], r0["bucket"]) == ("w_alpha", "batch3")
    assert cnn["prompt"].startswith("The city council voted")
    assert cnn["prompt"].endswith("\n\nTL;DR:")
    # The published rows carry a split: keep only one.
    train, st = pf.parse_file(str(FIX / "summarize_comparisons.json"), "summarize_comparisons",
                              split="train")
    assert len(train) == 2 and st.rows == 2


def test_ultrafeedback_fixture():
    recs, stats = pf.parse_file(str(FIX / "ultrafeedback_binarized.jsonl"), "ultrafeedback")
    assert stats.kept == 3
    assert recs[0]["prompt"] == "\n\nHuman: Name three primary colors.\n\nAssistant:"
    assert recs[0]["responses"] == [
        " Red, yellow and blue (in painting); red, green and blue for light.",
        " Green, purple and orange."]
    assert recs[2]["prompt"] == (
        "\n\nSystem: You are a translator.\n\nHuman: Translate 'good morning' into French."
        "\n\nAssistant: Bonjour.\n\nHuman: And in German?\n\nAssistant:")
    assert recs[2]["responses"] == [" Guten Morgen.", " Gute Nacht."]


def test_ultrafeedback_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = [json.loads(x) for x in (FIX / "ultrafeedback_binarized.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("messages")  # an empty list in one row has no parquet type to infer
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train_prefs.parquet")
    recs, _ = pf.parse_file(str(tmp_path / "train_prefs.parquet"), "ultrafeedback")
    jsonl, _ = pf.parse_file(str(FIX / "ultrafeedback_binarized.jsonl"), "ultrafeedback")
    pairs = lambda rs: [(r["prompt"], r["responses"]) for r in rs]  # noqa: E731
    assert pairs(recs) == pairs(jsonl)


def test_generic_jsonl_fixture():
    recs, _ = pf.parse_file(str(FIX / "preferences.jsonl"), "jsonl")
    assert recs[0]["responses"] == [" Hello and welcome!", " Go away."]
    assert recs[0]["ranks"] == [0, 1]
    assert recs[0]["annotator"] == "a1" and recs[0]["bucket"] == "greetings"
    assert recs[1]["responses"] == [" Sunny and warm.", " Rain.", " It is weather."]
    assert recs[1]["ranks"] == [0, 1, 2]


def test_malformed_rows_report_file_and_line():
    path = str(FIX / "hh_rlhf_bad.jsonl")
    with pytest.raises(pf.PreferenceDataError,
                       match=r"hh_rlhf_bad\.jsonl:2: missing field 'rejected'"):
        pf.parse_file(path, "hh_rlhf")
    recs, stats = pf.parse_file(path, "hh_rlhf", skip_bad_rows=True)
    assert (stats.rows, stats.kept, stats.bad) == (5, 2, 3)
    assert [m.split(": ", 1)[0].rsplit(":", 1)[1] for m in stats.bad_examples] == ["2", "3", "5"]
    assert "invalid JSON" in stats.bad_examples[2]
    assert "field 'chosen': dialogue has no" in stats.bad_examples[1]


@pytest.mark.parametrize("fmt,row,needle", [
    ("summarize_comparisons", {"info": {"post": "p", "title": "t", "subreddit": "s"},
                               "summaries": [{"text": "a"}, {"text": "b"}], "choice": 2},
     "'choice' must be 0 or 1"),
    ("ultrafeedback", {"prompt": "q", "chosen": [{"role": "user", "content": "q"}],
                       "rejected": [{"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "x"}]},
     "last turn of 'chosen' must have role 'assistant'"),
    ("ultrafeedback", {"prompt": "q",
                       "chosen": [{"role": "user", "content": "q"},
                                  {"role": "assistant", "content": "a"}],
                       "rejected": [{"role": "user", "content": "other"},
                                    {"role": "assistant", "content": "b"}]},
     "differ before their last turn"),
    ("hh_rlhf", {"chosen": "\n\nHuman: a\n\nAssistant: b",
                 "rejected": "\n\nHuman: c\n\nAssistant: d"},
     "differ before the last Assistant turn"),
    ("jsonl", {"prompt": "p", "responses": ["a", "b"], "ranks": [0]}, "'ranks' has 1 entries"),
    ("jsonl", {"prompt": "p", "responses": ["a", "b"], "ranks": [1, 1]}, "no preference"),
])
def test_format_errors_name_the_problem(tmp_path, fmt, row, needle):
    f = tmp_path / "data.jsonl"
    f.write_text("\n" + json.dumps(row) + "\n")  # blank first line: the row is line 2
    with pytest.raises(pf.PreferenceDataError) as e:
        pf.parse_file(str(f), fmt)
    assert "data.jsonl:2: " in str(e.value) and needle in str(e.value)


def test_tfds_builder_roundtrip(tmp_path):
    splits = {
        "train": {"format": "hh_rlhf", "files": [str(FIX / "hh_rlhf.jsonl")]},
        "test": {"format": "hh_rlhf", "files": [str(FIX / "hh_rlhf_bad.jsonl")],
                 "skip_bad_rows": True},
    }
    recs, stats = pf.build_preference_dataset(splits, str(tmp_path / "tfds"))
    direct, _ = pf.parse_file(str(FIX / "hh_rlhf.jsonl"), "hh_rlhf")
    key = lambda r: r["source"]  # noqa: E731 - TFDS may shuffle example order
    assert sorted(recs["train"], key=key) == sorted(direct, key=key)
    assert stats["train"]["identical"] == 1 and stats["test"]["bad"] == 3
    # A second call reuses the prepared dataset (same files -> same cache key) and its stats.
    recs2, stats2 = pf.build_preference_dataset(splits, str(tmp_path / "tfds"))
    assert stats2 == stats and len(recs2["test"]) == 2
