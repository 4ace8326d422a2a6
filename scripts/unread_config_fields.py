"""Which fields of the shipped configs does no code read?

    python scripts/unread_config_fields.py --static        # every config, by reading the code (s)
    python scripts/unread_config_fields.py                 # the stage smoke tests (~5 min)
    python scripts/unread_config_fields.py tests/test_rm_stage.py

`--static` (what CI runs, tests/test_config_fields_read.py): every leaf field of every
`configs/*.py` (`get_config()` and its bare presets) against the names the code under
`rlhf_jax/` and `experiments/` reads: attribute loads (`c.train.steps`), constant subscripts
and `.get("key")`, field-name strings (`"kl.target"`, key tuples such as a builder's accepted
keys), and f-string keys by their constant prefix (`task[f"num_{split}"]`). Writes (`c.x = 1`)
and the config files themselves do not count. It is name-based: a new field whose name nothing
reads is caught; a field sharing its name with one that is read is not (the dynamic check is).

The dynamic check runs the given tests (default: every stage's smoke runs and the tiny
pipeline) with `ml_collections.ConfigDict.__getitem__` (which attribute access goes through)
recording each read, in the test process and in every subprocess it starts (through a
generated `sitecustomize`). Reads made while a config is serialised (`to_dict`, `repr`, JSON) do
not count. A field is named by the keys of the ConfigDict that holds it plus its own key, so
copies of a config (the pipeline copies each stage's) count alike.

A field listed is either read only on a branch the tests never take (then add a test), read
only through `to_dict()` by a data builder (builders check their keys themselves), or dead.
"""

from __future__ import annotations

import ast
import glob
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("pretrain_sim", "sft_sim", "rm_sim", "rm_hh", "ppo_sim", "ppo_hf", "pipeline_sim")
DEFAULT_TESTS = ("tests/test_sft.py", "tests/test_rm_stage.py", "tests/test_ppo_stage.py",
                 "tests/test_pipeline.py")

SITECUSTOMIZE = '''
import atexit, functools, json, os
import ml_collections

_reads, _quiet = set(), [0]
_C = ml_collections.ConfigDict
_get = _C.__getitem__

def _getitem(self, key):
    if not _quiet[0]:
        _reads.add((tuple(sorted(self._fields)), key))
    return _get(self, key)

def _silenced(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _quiet[0] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            _quiet[0] -= 1
    return wrapper

_C.__getitem__ = _getitem
for _name in ("to_dict", "__repr__", "__str__", "to_json", "to_json_best_effort",
              "copy_and_resolve_references"):
    setattr(_C, _name, _silenced(getattr(_C, _name)))

@atexit.register
def _dump():
    if _reads:
        with open(os.path.join(os.environ["CONFIG_READS_DIR"], f"{os.getpid()}.json"), "w") as f:
            json.dump(sorted([list(k), v] for k, v in _reads), f)
'''


def leaf_fields(config, prefix=""):
    import ml_collections

    keys = tuple(sorted(config._fields))
    for key in keys:
        value = config._fields[key]
        if isinstance(value, ml_collections.ConfigDict):
            yield from leaf_fields(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", (keys, key)


def unread_fields(tests: list[str], quiet: bool = False) -> tuple[int, dict[str, list[str]]]:
    """Run `tests` with reads recorded; returns (pytest's exit code, {config: unread fields})."""
    with tempfile.TemporaryDirectory() as hook, tempfile.TemporaryDirectory() as out:
        Path(hook, "sitecustomize.py").write_text(SITECUSTOMIZE)
        env = {**os.environ, "CONFIG_READS_DIR": out,
               "PYTHONPATH": os.pathsep.join([hook, str(ROOT), os.environ.get("PYTHONPATH", "")])}
        env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              *tests], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL if quiet else None)
        reads = {(tuple(keys), key) for f in glob.glob(os.path.join(out, "*.json"))
                 for keys, key in json.loads(Path(f).read_text())}
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    unread = {}
    for name in CONFIGS:
        fields = leaf_fields(importlib.import_module(f"configs.{name}").get_config())
        unread[name] = [path for path, key in fields if key not in reads]
    return rc, unread


CODE_ROOTS = ("rlhf_jax", "experiments")
_FIELD_STRING = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def static_reads(roots=CODE_ROOTS) -> tuple[set[str], tuple[str, ...]]:
    """(names the code under `roots` reads, constant prefixes of f-string keys it reads)."""
    names, prefixes = set(), set()
    for root in roots:
        root = Path(root) if Path(root).is_absolute() else ROOT / root
        for path in sorted(root.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                    names.add(node.attr)
                elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                        and _FIELD_STRING.fullmatch(node.value):
                    names.update(node.value.split("."))
                elif isinstance(node, ast.JoinedStr) and node.values \
                        and isinstance(node.values[0], ast.Constant) \
                        and re.fullmatch(r"\w{3,}", str(node.values[0].value)):
                    prefixes.add(node.values[0].value)
    return names | registry_reads(), tuple(sorted(prefixes))


def registry_reads() -> set[str]:
    """Fields the experiments read by a method registry entry's name, which no source line
    spells: the frontier's per-method knob lists (`ppo_betas`, `experiments.frontier.values_field`)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from experiments import frontier
    from rlhf_jax import registry

    return {frontier.values_field(m) for m in registry.METHODS.values()}


def config_files() -> list[Path]:
    return sorted(p for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")


def shipped_configs() -> dict[str, object]:
    """{"<file>[:<bare preset>]": config} of every config file: `get_config()` and each bare
    preset it accepts (`:smoke`, `:tiny`), which can add fields."""
    from rlhf_jax.errors import UserError

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    out = {}
    for path in config_files():
        module = importlib.import_module(f"configs.{path.stem}")
        if not hasattr(module, "get_config"):
            continue
        out[path.stem] = module.get_config()
        for word in ("smoke", "tiny"):
            try:
                out[f"{path.stem}:{word}"] = module.get_config(word)
            except (UserError, ValueError):  # a preset this file does not take
                pass
    return out


def static_unread(configs: dict[str, object], roots=CODE_ROOTS) -> dict[str, list[str]]:
    """{config name: its leaf fields whose key no code under `roots` reads}."""
    names, prefixes = static_reads(roots)
    out = {}
    for name, config in configs.items():
        out[name] = [path for path, (_, key) in leaf_fields(config)
                     if key not in names and not key.startswith(prefixes)]
    return out


def main(tests: list[str]) -> int:
    if tests == ["--static"]:
        unread = static_unread(shipped_configs())
        for name, fields in unread.items():
            if fields:
                print(f"{name}: {len(fields)} never read" + "".join(f"\n    {p}" for p in fields))
        print(f"{len(unread)} configs checked; {sum(map(len, unread.values()))} unread fields")
        return 1 if any(unread.values()) else 0
    rc, unread = unread_fields(tests)
    if rc:
        print(f"pytest exited {rc}; the reads below are from the tests that ran")
    for name, fields in unread.items():
        print(f"{name}: {len(fields)} never read" + "".join(f"\n    {p}" for p in fields))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or list(DEFAULT_TESTS)))
