"""Every field of every shipped config is read by some code (DESIGN pitfall 12: fields silently
ignored).

In CI: a static check (scripts/unread_config_fields.py `--static`, seconds): every leaf field of
every `configs/*.py` (and its `:smoke` / `:tiny` presets) is a name the code under `rlhf_jax/`
or `experiments/` reads, and a field nothing reads fails it (shown with a synthetic config).
Slow, not in CI: the dynamic check reruns the stage smoke tests and the tiny pipeline with reads
recorded (~5 min): `python -m pytest -m slow tests/test_config_fields_read.py`."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location(
        "unread_config_fields", ROOT / "scripts" / "unread_config_fields.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_every_shipped_config_field_is_read_by_the_code():
    script = _script()
    configs = script.shipped_configs()
    assert len(configs) >= len(script.config_files())  # every file, plus its presets
    unread = {name: fields for name, fields in script.static_unread(configs).items() if fields}
    assert not unread, f"config fields no code reads (read them, or delete them): {unread}"


def test_the_static_check_fails_on_an_unread_field(tmp_path):
    """Honesty: a field nothing reads is reported; once a module reads it (attribute, `.get`,
    dotted field string or f-string prefix), it is not."""
    from rlhf_jax import config_utils

    script = _script()
    c = config_utils.base_config()
    c.train.zq_never_read_knob = 3
    c.zq_other = dict(zq_leaf=1, zq_dotted=2, zq_fmt_a=3)
    configs = {"synthetic": c}
    assert sorted(script.static_unread(configs)["synthetic"]) == [
        "train.zq_never_read_knob", "zq_other.zq_dotted", "zq_other.zq_fmt_a",
        "zq_other.zq_leaf"]
    (tmp_path / "reader.py").write_text(
        "def f(config, part):\n"
        "    x = config.train.zq_never_read_knob\n"
        "    config.zq_other.zq_leaf = 5  # a write is not a read\n"
        "    check(config, 'zq_other.zq_dotted')\n"
        "    return config.zq_other[f'zq_fmt_{part}']\n")
    roots = (*script.CODE_ROOTS, tmp_path)
    assert script.static_unread(configs, roots)["synthetic"] == ["zq_other.zq_leaf"]


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
    script = _script()
    rc, unread = script.unread_fields(list(script.DEFAULT_TESTS), quiet=True)
    assert rc == 0, "a smoke test failed; run scripts/unread_config_fields.py to see it"
    for name, fields in EXPECTED_UNREAD.items():
        assert sorted(unread[name]) == sorted(fields), name
    # The pipeline holds the stage configs: only the same fields, under each stage's name.
    stage_of = {"pretrain": "pretrain_sim", "sft": "sft_sim", "rm": "rm_sim", "ppo": "ppo_sim"}
    expected = sorted(f"{stage}.{f}" for stage, cfg in stage_of.items()
                      for f in EXPECTED_UNREAD[cfg])
    assert sorted(unread["pipeline_sim"]) == expected
