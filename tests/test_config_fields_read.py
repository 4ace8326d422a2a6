"""Every field of every shipped config is read by some run (DESIGN pitfall 12: fields silently
ignored). Slow (~5 min: it reruns the stage smoke tests and the tiny pipeline with reads
recorded), so not in CI: `python -m pytest -m slow tests/test_config_fields_read.py`."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Fields no smoke run reads, each for a stated reason. A new field that no run reads fails the
# test; so does a field here that a run starts reading (then drop it from this list).
_SIM_SOURCE = ["data.source.num_eval", "data.source.num_train"]  # the builder reads to_dict()
_FILES_SOURCE = ["data.source.eval_split", "data.source.format", "data.source.train_split"]
_SINGLE_PROCESS = ["distributed.num_processes", "distributed.process_id"]  # need an address
EXPECTED_UNREAD = {
    "pretrain_sim": _SIM_SOURCE + _SINGLE_PROCESS,
    "sft_sim": _SIM_SOURCE + _SINGLE_PROCESS,
    "rm_sim": ["data.source.num_buckets"] + _SIM_SOURCE + _SINGLE_PROCESS,
    "rm_hh": _FILES_SOURCE + _SINGLE_PROCESS,
    "ppo_sim": _SIM_SOURCE + _SINGLE_PROCESS + ["ptx.source.num_eval", "ptx.source.num_train"],
    # PPO-ptx is off in the ppo_hf smoke run (its sim counterpart runs it).
    "ppo_hf": _FILES_SOURCE + _SINGLE_PROCESS + [
        "ptx.source.eval", "ptx.source.kind", "ptx.source.skip_malformed", "ptx.source.train"],
}


@pytest.mark.slow
def test_every_shipped_config_field_is_read():
    spec = importlib.util.spec_from_file_location(
        "unread_config_fields", ROOT / "scripts" / "unread_config_fields.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rc, unread = script.unread_fields(list(script.DEFAULT_TESTS), quiet=True)
    assert rc == 0, "a smoke test failed; run scripts/unread_config_fields.py to see it"
    for name, fields in EXPECTED_UNREAD.items():
        assert sorted(unread[name]) == sorted(fields), name
    # The pipeline holds the stage configs: only the same fields, under each stage's name.
    stage_of = {"pretrain": "pretrain_sim", "sft": "sft_sim", "rm": "rm_sim", "ppo": "ppo_sim"}
    expected = sorted(f"{stage}.{f}" for stage, cfg in stage_of.items()
                      for f in EXPECTED_UNREAD[cfg])
    assert sorted(unread["pipeline_sim"]) == expected
