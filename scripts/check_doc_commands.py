"""A developer's check of the commands in README.md and docs/**/*.md (not in CI: it loads every
config a command names, which imports JAX): each `python -m <module>` names a module that exists,
each `--config=<file>.py[:<preset>]` loads with that preset, and each `--config.<field>=` override
names a field of that config. Commands with placeholders (`<dir>`, `...`) are checked for their
module only.

    python scripts/check_doc_commands.py        # prints the problems; exit 1 if any
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COMMAND = re.compile(r"python3? -m ([\w.]+)([^`#\n]*)")
CONFIG = re.compile(r"--config=([\w/.]+\.py)(?::([^\s`]*))?")
OVERRIDE = re.compile(r"--config\.([\w.]+)=")
DEFAULT = re.compile(r'DEFAULT_CONFIG = .*"configs" / "(\w+\.py)"')


def default_config(module: str) -> str | None:
    """The config file an experiment module reads without `--config=` (its DEFAULT_CONFIG)."""
    path = ROOT / (module.replace(".", "/") + ".py")
    m = DEFAULT.search(path.read_text()) if path.exists() else None
    return f"configs/{m.group(1)}" if m else None


def commands() -> list[tuple[str, str, str]]:
    """(file, module, arguments) of every `python -m` command, continuation lines joined."""
    out = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = re.sub(r"\\\n\s*", " ", path.read_text())
        for m in COMMAND.finditer(text):
            out.append((str(path.relative_to(ROOT)), m.group(1), m.group(2)))
    return out


def load_config(file: str, arg: str | None):
    spec = importlib.util.spec_from_file_location(f"_doc_config_{abs(hash((file, arg)))}",
                                                  ROOT / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg or None)


def has_field(config, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return False
    return True


def problems() -> list[str]:
    bad, configs = [], {}
    for where, module, args in commands():
        if module in ("pytest", "pip") or module.endswith("."):  # `experiments.<name>`
            continue
        if importlib.util.find_spec(module.split(".")[0]) is None \
                or importlib.util.find_spec(module) is None:
            bad.append(f"{where}: python -m {module}: no such module")
            continue
        m = CONFIG.search(args)
        file, arg = (m.group(1), m.group(2)) if m else (default_config(module), None)
        if file is None:
            continue
        if not (ROOT / file).exists():
            bad.append(f"{where}: {file}: no such config file")
            continue
        if "<" in args or "..." in args:
            continue
        if (file, arg) not in configs:
            try:
                configs[file, arg] = load_config(file, arg)
            except Exception as e:  # a preset the config refuses
                configs[file, arg] = None
                bad.append(f"{where}: {file}:{arg or ''}: {type(e).__name__}: {e}")
        config = configs[file, arg]
        for field in OVERRIDE.findall(args):
            if config is not None and not has_field(config, field):
                bad.append(f"{where}: {file}: no field {field}")
    return bad


if __name__ == "__main__":
    found = problems()
    print("\n".join(found) if found else f"{len(commands())} commands checked: all resolve")
    sys.exit(1 if found else 0)
