"""The method registry: one entry per method, one parser, the inputs each stage is wired to."""

import ast
import importlib.util
from pathlib import Path

import ml_collections
import pytest

from rlhf_jax import registry
from rlhf_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_every_entry_names_a_config_file_and_a_module():
    for m in [*registry.STAGES.values(), *registry.METHODS.values()]:
        assert (ROOT / m.config_file).is_file(), m
        if m.trains:
            assert importlib.util.find_spec(m.module) is not None, m
        assert m.family in registry.FAMILIES and m.data_from in registry.DATA_FROM


def test_parse_names_entries_in_order_and_rejects_bad_lists():
    assert [m.name for m in registry.parse("ppo, dpo,bon")] == ["ppo", "dpo", "bon"]
    for bad, what in (("ppo,nope", "unknown method 'nope'"), ("", "names no method"),
                      ("ppo,ppo", "repeats 'ppo'"), ("sft", "unknown method 'sft'")):
        with pytest.raises(UserError, match="config.methods") as e:
            registry.parse(bad)
        assert what in str(e.value)
    with pytest.raises(UserError, match="unknown method 'dpo'"):
        registry.parse("ppo,dpo", among=["ppo", "rloo"])
    assert registry.get("rm").module == "rlhf_jax.rm"
    with pytest.raises(UserError):
        registry.get("nope")
    with pytest.raises(UserError, match="trains nothing"):
        registry.load("bon")


def _block(**extra):
    c = ml_collections.ConfigDict(dict(
        init_from="", seed=0, data=dict(source=dict(kind="sim", num_train=1), candidates="x"),
        **extra))
    c.lock()
    return c


def test_stage_config_wires_inputs_by_entry():
    rm_cfg = ml_collections.ConfigDict(dict(data=dict(source=dict(kind="sim", num_train=99),
                                                      candidates="policy", other=1)))
    ppo = registry.METHODS["ppo"].stage_config(_block(reward_from=""), sft="/s", rm="/r",
                                               rm_config=rm_cfg, seed=3)
    assert (ppo.init_from, ppo.reward_from, ppo.seed) == ("/s", "/r", 3)
    assert ppo.data.source.num_train == 1  # learns from its own prompts
    dpo = registry.METHODS["dpo"].stage_config(_block(), sft="/s", rm="/r", rm_config=rm_cfg)
    assert "reward_from" not in dpo
    assert dpo.data.source.num_train == 99 and dpo.data.candidates == "policy"
    assert registry.METHODS["kto"].data_from == "rm" and not registry.METHODS["kto"].needs_rm
    assert registry.METHODS["online_dpo"].needs_rm
    assert registry.METHODS["rloo"].config_arg("world=w") == "method=rloo,world=w"
    assert registry.METHODS["ppo"].config_arg("world=w") == "world=w"


def test_no_method_name_is_special_cased_outside_the_registry():
    """`if name == "dpo"`-style branches on method names live only in the registry."""
    names = set(registry.METHODS)
    found = []
    for path in [*(ROOT / "experiments").glob("*.py"), *(ROOT / "rlhf_jax").rglob("*.py")]:
        if path.name == "registry.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(
                    isinstance(c, ast.Constant) and c.value in names
                    for c in [node.left, *node.comparators]) and any(
                    isinstance(x, ast.Name) and x.id in ("name", "method", "n", "m")
                    for x in [node.left, *node.comparators]):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found
