"""Which fields of the shipped configs does no smoke test ever read?

    python scripts/unread_config_fields.py                 # the stage smoke tests (~5 min)
    python scripts/unread_config_fields.py tests/test_rm_stage.py

A developer's check, not part of CI. It runs the given tests (default: every stage's smoke runs
and the tiny pipeline) with `ml_collections.ConfigDict.__getitem__` (which attribute access goes
through) recording each read, in the test process and in every subprocess it starts (through a
generated `sitecustomize`). Reads made while a config is serialised (`to_dict`, `repr`, JSON) do
not count. A field is named by the keys of the ConfigDict that holds it plus its own key, so
copies of a config (the pipeline copies each stage's) count alike.

A field listed is either read only on a branch the tests never take (then add a test), read
only through `to_dict()` by a data builder (builders check their keys themselves), or dead.
"""

from __future__ import annotations

import glob
import importlib
import json
import os
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


def main(tests: list[str]) -> int:
    rc, unread = unread_fields(tests)
    if rc:
        print(f"pytest exited {rc}; the reads below are from the tests that ran")
    for name, fields in unread.items():
        print(f"{name}: {len(fields)} never read" + "".join(f"\n    {p}" for p in fields))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or list(DEFAULT_TESTS)))
