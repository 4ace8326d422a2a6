"""The commands in README.md and docs/**/*.md, as data: extracted, checked, and run at a tiny size.

    python scripts/check_doc_commands.py          # the static checks; exit 1 on a problem
    python scripts/check_doc_commands.py --run    # also run every runnable command (minutes)

`tests/test_doc_commands.py` runs the static checks over every command and runs the README's
step-by-step chain (SFT -> RM -> PPO / DPO / RLOO / best-of-n) through `run_tiny`.

Static checks, per command of a ```bash / ```sh block:

* the module exists (`python -m <module>`), or the script (`bash scripts/<x>.sh`);
* its config parses as the entry point would parse it (`config_utils.parse_config_argv`: the
  file, its preset, every `--config.<field>=` and the conflict checks), unless the command has
  placeholders (`<dir>`, `...`, `[--flag]`, `path/to`);
* a stage that needs an input (`init_from`, and `reward_from` for RL) is given one;
* chaining: every local stage dir a command reads (`init_from`, `reward_from`, `sft_from`,
  `rm_from`, `convert --src`, written or the config's default) is written by a documented
  command: an earlier one of the same page, or one on another page (a stage's `workdir`, written
  or its config's default, or `convert --dst`); and within a block, a dir a command names with
  `--config.workdir=` is read by a later command of the block when one follows (the block is a
  chain, not a dead end).

`run_tiny` is the one place that changes a documented command to run here: it adds only a size
preset (`:smoke` or `:tiny`, whichever the config takes; a preset's `steps=` becomes 2) and runs
it with a scratch directory as the working directory, so every relative output and input
(`runs/...`) lands there and chains as written.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Fields whose value is a stage work dir the command reads.
INPUT_FIELDS = ("init_from", "reward_from", "sft_from", "rm_from")
# The stage dirs each module needs (an empty value is an error when it runs).
REQUIRED_INPUTS = {"rlhf_jax.rm": ("init_from",), "rlhf_jax.dpo": ("init_from",),
                   "rlhf_jax.kto": ("init_from",), "rlhf_jax.ppo": ("init_from", "reward_from"),
                   "rlhf_jax.pg": ("init_from", "reward_from"),
                   "rlhf_jax.online_dpo": ("init_from", "reward_from")}
PLACEHOLDER = re.compile(r"<[^>]*>|\.\.\.|\[|\||path/to")
LOCAL_DIR = re.compile(r"^(runs|exports)/")


@dataclasses.dataclass
class Command:
    file: str  # README.md or docs/...
    line: int  # of the command's first line in the file
    block: int  # index of its fenced block in the file
    argv: list[str]  # shell words, comments dropped

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def module(self) -> str | None:
        if self.argv[:2] in (["python", "-m"], ["python3", "-m"]) and len(self.argv) > 2:
            return self.argv[2]
        return None

    @property
    def args(self) -> list[str]:
        return self.argv[3:] if self.module else self.argv[1:]

    @property
    def has_placeholder(self) -> bool:
        return any(PLACEHOLDER.search(a) for a in self.argv)

    def flag(self, name: str) -> str | None:
        """The value of `--name=v` or `--name v`."""
        args = self.args
        for i, a in enumerate(args):
            if a.startswith(f"--{name}="):
                return a.split("=", 1)[1]
            if a == f"--{name}" and i + 1 < len(args):
                return args[i + 1]
        return None

    def __str__(self) -> str:
        return shlex.join(self.argv)


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


def commands(files: list[Path] | None = None) -> list[Command]:
    """Every command of every ```bash / ```sh block (continuation lines joined)."""
    out = []
    for path in doc_files() if files is None else files:
        text = path.read_text()
        for b, m in enumerate(FENCE.finditer(text)):
            if m.group(1) not in ("bash", "sh", "shell"):
                continue
            first = text.count("\n", 0, m.start(2)) + 1
            lines = m.group(2).split("\n")
            i = 0
            while i < len(lines):
                start, line = i, lines[i]
                while line.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line.rstrip()[:-1] + " " + lines[i]
                i += 1
                words = shlex.split(line, comments=True)
                if words:
                    rel = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name
                    out.append(Command(rel, first + start, b, words))
    return out


def docstring_commands() -> list[Command]:
    """The `python -m` usage lines of the module docstrings of configs/, experiments/ and
    rlhf_jax/ (continuation lines joined); checked for parsing only (they show one command
    each, not a chain)."""
    import ast

    out = []
    for path in sorted([*(ROOT / "configs").glob("*.py"), *(ROOT / "experiments").glob("*.py"),
                        *(ROOT / "rlhf_jax").rglob("*.py")]):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        for i, line in enumerate(re.sub(r"\\\n\s*", " ", doc).splitlines()):
            if line.strip().startswith(("python -m", "python3 -m")):
                out.append(Command(str(path.relative_to(ROOT)), i + 1, -1 - i,
                                   shlex.split(line, comments=True)))
    return out


def default_config(module: str) -> str | None:
    """The config file an experiment reads without `--config=` (its DEFAULT_CONFIG)."""
    path = ROOT / (module.replace(".", "/") + ".py")
    m = re.search(r'DEFAULT_CONFIG = .*"configs" / "(\w+\.py)"', path.read_text()) \
        if path.exists() else None
    return f"configs/{m.group(1)}" if m else None


def config_argv(cmd: Command) -> list[str] | None:
    """argv for `config_utils.parse_config_argv` (`--config=` and `--config.*` flags only), with
    the module's default config inserted; None when the command takes no config."""
    args = [a for a in cmd.args if a.startswith("--config")]
    if not any(a.startswith("--config=") for a in args):
        default = default_config(cmd.module or "")
        if default is None:
            return None
        args.insert(0, f"--config={default}")
    return [cmd.module or "prog", *args]


def parse(cmd: Command):
    """The command's config as its entry point parses it (None when it takes none)."""
    from rlhf_jax import config_utils

    argv = config_argv(cmd)
    if argv is None:
        return None
    cwd = os.getcwd()
    os.chdir(ROOT)  # config paths in the docs are relative to the repository root
    try:
        return config_utils.parse_config_argv(argv)
    finally:
        os.chdir(cwd)


def reads_writes(cmd: Command, config) -> tuple[list[str], list[str]]:
    """(local dirs the command reads, local dirs it writes)."""
    reads, writes = [], []
    if cmd.module == "rlhf_jax.convert":
        src, dst = cmd.flag("src"), cmd.flag("dst")
        reads += [src] if src else []
        writes += [dst] if dst else []
    elif config is not None:
        for field in INPUT_FIELDS:
            if field in config and isinstance(config[field], str) and config[field]:
                reads.append(config[field])
        if "workdir" in config and cmd.module != "rlhf_jax.sweep":
            writes.append(str(config.workdir))
    norm = lambda ps: [os.path.normpath(p) for p in ps if LOCAL_DIR.match(p)]  # noqa: E731
    return norm(reads), norm(writes)


def _module_exists(module: str) -> bool:
    sys.path.insert(0, str(ROOT))
    try:
        return importlib.util.find_spec(module.split(".")[0]) is not None \
            and importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False
    finally:
        sys.path.remove(str(ROOT))


def problems(cmds: list[Command] | None = None, chain: bool = True) -> list[str]:
    """Static problems of every documented command (module, config, chaining), one line each.
    `chain=False`: the module and config checks only."""
    from rlhf_jax.errors import UserError

    cmds = commands() if cmds is None else cmds
    bad: list[str] = []
    info = []
    for cmd in cmds:
        config = None
        if cmd.argv[0] == "bash":
            if not (ROOT / cmd.argv[1]).is_file():
                bad.append(f"{cmd.where}: {cmd.argv[1]}: no such script")
        elif cmd.module is None:
            bad.append(f"{cmd.where}: {cmd}: not a `python -m` command or a script")
        elif cmd.module in ("pytest", "pip"):
            pass
        elif not _module_exists(cmd.module):
            bad.append(f"{cmd.where}: python -m {cmd.module}: no such module")
        elif not cmd.has_placeholder:
            try:
                config = parse(cmd)
            except UserError as e:
                bad.append(f"{cmd.where}: {e.line()}")
        if config is not None and cmd.module == "experiments.pipeline":
            from rlhf_jax import registry

            names = [m for m in str(config.methods).split(",") if m]
            missing = [m for m in names if m not in registry.METHODS]
            if missing:
                bad.append(f"{cmd.where}: --config.methods: {missing} are not pipeline methods")
        for field in REQUIRED_INPUTS.get(cmd.module, ()) if config is not None and chain else ():
            if not config[field]:
                bad.append(f"{cmd.where}: config.{field} is empty: the stage needs "
                           f"--config.{field}=<a finished stage's work dir>")
        reads, writes = reads_writes(cmd, config)
        info.append((cmd, reads, writes))

    # Chaining: what a command reads, an earlier command of its page (or any other page) writes.
    for i, (cmd, reads, writes) in enumerate(info if chain else []):
        earlier = {w for c, _, ws in info[:i] if c.file == cmd.file for w in ws}
        elsewhere = {w for c, _, ws in info if c.file != cmd.file for w in ws}
        for d in reads:
            if d not in earlier | elsewhere:
                bad.append(f"{cmd.where}: reads {d}, which no documented command writes "
                           f"(earlier in {cmd.file}, or on another page)")
        explicit = cmd.flag("config.workdir")
        later = [(c, r) for c, r, _ in info[i + 1:] if c.file == cmd.file
                 and c.block == cmd.block]
        if explicit and later and not any(os.path.normpath(explicit) in r for _, r in later):
            bad.append(f"{cmd.where}: writes {explicit}, which no later command of its block "
                       f"reads (the next is `{later[0][0]}`)")
    return bad


# ------------------------------------------------------------------------------- running


def _preset_words(config_file: str) -> list[str]:
    """The size presets `config_file` accepts: ["smoke"] or ["tiny"]."""
    from rlhf_jax.errors import UserError

    spec = importlib.util.spec_from_file_location("_doc_size_probe", ROOT / config_file)
    module = importlib.util.module_from_spec(spec)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    spec.loader.exec_module(module)
    for word in ("smoke", "tiny"):
        try:
            module.get_config(word)
            return [word]
        except (UserError, ValueError):
            continue
    return []


def tiny_argv(cmd: Command) -> list[str]:
    """The command at a tiny size: its `--config=<file>[:<preset>]` gets the config's size
    preset first (`smoke` or `tiny`), and a preset `steps=` becomes 2. Nothing else changes."""
    args = list(cmd.args)
    spec_at = next((i for i, a in enumerate(args) if a.startswith("--config=")), None)
    if spec_at is None:
        default = default_config(cmd.module)
        if default is None:
            return [sys.executable, "-m", cmd.module, *args]
        args.insert(0, f"--config={default}")
        spec_at = 0
    file, _, preset = args[spec_at].split("=", 1)[1].partition(":")
    items = [p for p in preset.split(",") if p]
    items = [re.sub(r"^steps=.*", "steps=2", p) for p in items]
    words = _preset_words(file)
    if words and words[0] not in items:
        items.insert(0, words[0])
    args[spec_at] = f"--config={file}" + (":" + ",".join(items) if items else "")
    return [sys.executable, "-m", cmd.module, *args]


def run_tiny(cmd: Command, scratch: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `cmd` at a tiny size with `scratch` as its working directory (its relative `runs/`
    inputs and outputs live there; `configs/` is linked from the repository)."""
    scratch.mkdir(parents=True, exist_ok=True)
    link = scratch / "configs"
    if not link.exists():
        link.symlink_to(ROOT / "configs")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT),
                                                        os.environ.get("PYTHONPATH", "")])}
    env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    return subprocess.run(tiny_argv(cmd), cwd=scratch, env=env, capture_output=True, text=True,
                          timeout=timeout)


def runnable(cmd: Command) -> bool:
    """Whether the command can run here as written: a `python -m` stage or experiment with no
    placeholders, no external model or data (`hf:`, absolute paths) and a module we have."""
    return (cmd.module is not None and cmd.module.startswith(("rlhf_jax.", "experiments."))
            and cmd.module != "rlhf_jax.sweep"
            and not cmd.has_placeholder
            and not any("hf:" in a or "=/" in a for a in cmd.args))


if __name__ == "__main__":
    found = problems() + problems(docstring_commands(), chain=False)
    print("\n".join(found) if found else
          f"{len(commands()) + len(docstring_commands())} commands checked: all resolve")
    if "--run" in sys.argv[1:] and not found:
        import tempfile

        scratch = Path(tempfile.mkdtemp(prefix="doc_commands_"))
        for cmd in commands():
            if runnable(cmd):
                proc = run_tiny(cmd, scratch / cmd.file.replace("/", "_"))
                print(f"{'ok  ' if proc.returncode == 0 else 'FAIL'} {cmd.where}: {cmd}")
                if proc.returncode:
                    print(proc.stderr[-2000:])
                    found.append(cmd.where)
    sys.exit(1 if found else 0)
