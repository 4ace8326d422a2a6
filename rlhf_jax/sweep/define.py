"""Sweep definitions: override lists, config files' `get_sweep`, and trials keyed by their config.

A sweep is a list of dotted override dicts, one per trial: `[{"kl.beta": 0.1, "seed": 0}, ...]`.
The helpers build such lists with big_vision's (XManager hyper) vocabulary:

    product(sweep("kl.beta", [0.03, 0.1]), fixed("kl.adaptive", False), sweep("seed", range(3)))
    zipit(sweep("optim.lr", [1e-4, 3e-4]), sweep("train.steps", [200, 100]))   # pairwise
    chainit(a, b)                                                                 # a, then b

A config file (`configs/x.py`) may define `get_sweep(arg)` next to `get_config(arg)`, taking the
same `arg` (the text after `:` in `--config=configs/x.py:arg`), and a module-level `ENTRY`
naming the program that runs one trial: a module (`ENTRY = "rlhf_jax.ppo"`, run as
`python -m rlhf_jax.ppo`) or a script path ending in `.py` (run as `python path.py`, relative to
the working directory).
The runner's `--entry` overrides it.

Each trial runs exactly the command a user would type:

    <entry> --config=<file>:<arg> [--config.x=v given to the runner] --config.a.b=<v> ...
        --config.workdir=<sweep dir>/<trial name>

Its key is a hash of the program and of its *resolved* config (`get_config(arg)` with every
override applied by the same absl / ml_collections parser the program uses, minus `workdir`), so
two ways of writing the same config share a key, and an edit of the config file that changes a
trial changes its key (and so its work dir).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import itertools
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rlhf_jax import config_utils, runcache
from rlhf_jax.errors import UserError

Sweep = list[dict[str, Any]]

_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_MODULE = _FIELD  # a dotted module name has the same shape


# ------------------------------------------------------------------------------------ helpers


def _field(name: str, where: str) -> str:
    """A dotted config path; a leading `config.` (big_vision's spelling) is accepted and dropped."""
    if not isinstance(name, str):
        raise UserError(where, f"override name {name!r} is not a string",
                        "name fields as dotted strings, e.g. 'kl.beta'")
    path = name[len("config."):] if name.startswith("config.") else name
    if not _FIELD.match(path):
        raise UserError(where, f"override name {name!r} is not a dotted field path",
                        "name fields as dotted strings, e.g. 'kl.beta'")
    if path == "workdir":
        raise UserError(where, "'workdir' cannot be swept: each trial gets <sweep dir>/<trial>",
                        "choose the sweep directory with --workdir")
    return path


def _as_sweep(value: Any, where: str) -> Sweep:
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise UserError(where, f"expected a list of override dicts, got {type(value).__name__}",
                        "build it with sweep(), fixed(), product(), zipit() or chainit()")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise UserError(where, f"item {i} is {item!r}, not a dict of overrides",
                            "each trial is a dict such as {'kl.beta': 0.1}")
        out.append({_field(k, where): v for k, v in item.items()})
    return out


def _factors(sweeps: tuple, where: str) -> list[Sweep]:
    # product([a, b]) (XManager's spelling) and product(a, b) both work.
    if len(sweeps) == 1 and isinstance(sweeps[0], (list, tuple)) and sweeps[0] and all(
            isinstance(s, (list, tuple)) for s in sweeps[0]):
        sweeps = tuple(sweeps[0])
    return [_as_sweep(s, where) for s in sweeps]


def _merge(dicts: Iterable[Mapping], where: str) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            if k in out:
                raise UserError(where, f"field {k!r} is set by two of its parts",
                                "sweep each field in one place only")
            out[k] = v
    return out


def sweep(name: str, values: Iterable[Any]) -> Sweep:
    """One field over values: `sweep("seed", range(3))` → `[{"seed": 0}, {"seed": 1}, ...]`."""
    path = _field(name, "sweep()")
    values = list(values)
    if not values:
        raise UserError("sweep()", f"{name!r} has no values", "give at least one value")
    return [{path: v} for v in values]


def fixed(name: str, value: Any) -> Sweep:
    """One field at one value, to combine with `product`: `[{name: value}]`."""
    return [{_field(name, "fixed()"): value}]


def product(*sweeps: Sweep) -> Sweep:
    """Every combination, the first sweep varying slowest (like `itertools.product`)."""
    factors = _factors(sweeps, "product()")
    return [_merge(combo, "product()") for combo in itertools.product(*factors)]


def zipit(*sweeps: Sweep) -> Sweep:
    """Element-wise combination of equally long sweeps."""
    factors = _factors(sweeps, "zipit()")
    lengths = sorted({len(f) for f in factors})
    if len(lengths) > 1:
        raise UserError("zipit()", f"its sweeps have different lengths {lengths}",
                        "zip sweeps of one length, or use product()")
    return [_merge(items, "zipit()") for items in zip(*factors)]


def chainit(*sweeps: Sweep) -> Sweep:
    """The trials of each sweep in turn."""
    return [dict(d) for f in _factors(sweeps, "chainit()") for d in f]


chain = chainit


# ------------------------------------------------------------------------------- config files


def split_config_flag(value: str) -> tuple[str, str | None]:
    """`"configs/x.py:a=1,b=2"` → `("configs/x.py", "a=1,b=2")` (as ml_collections splits it)."""
    path, sep, arg = value.partition(":")
    return path, (arg if sep else None)


def load_config_module(path: str | Path):
    """Import a config file by path (a fresh module each call, like ml_collections does)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config={path}", "no such config file",
                        "give a path such as configs/ppo_sim.py")
    name = "_rlhf_jax_sweep_config_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_sweep(path: str | Path, arg: str | None) -> Sweep:
    """The config file's `get_sweep(arg)`, checked to be a list of override dicts."""
    module = load_config_module(path)
    if not callable(getattr(module, "get_sweep", None)):
        raise UserError(str(path), "defines no get_sweep(arg)",
                        "add one returning a list of override dicts, e.g. "
                        "product(sweep('seed', range(3)))")
    return _as_sweep(module.get_sweep(arg), f"{path}: get_sweep({arg!r})")


def entry_of(path: str | Path, entry: str | None = None) -> str:
    """The program that runs one trial: `entry` if given, else the config file's `ENTRY`."""
    if not entry:
        entry = getattr(load_config_module(path), "ENTRY", None)
        if not entry:
            raise UserError(str(path), "names no program to run its trials",
                            "add ENTRY = 'rlhf_jax.ppo' (a module or a path to a .py script) "
                            "to the config file, or pass --entry=...")
    if not isinstance(entry, str) or not (entry.endswith(".py") or _MODULE.match(entry)):
        raise UserError("--entry" if entry else str(path), f"{entry!r} is neither a module name "
                        "nor a .py script path", "e.g. rlhf_jax.ppo or tests/_toy.py")
    return entry


def entry_command(entry: str, python: str = sys.executable) -> list[str]:
    """`python -m module` or `python script.py`."""
    return [python, entry] if entry.endswith(".py") else [python, "-m", entry]


# --------------------------------------------------------------------------- override values


def format_value(value: Any, field_type: type | None) -> str:
    """Text that absl / ml_collections parse back to `value` for a field of `field_type`.

    ml_collections picks the flag parser from the field's type: a `str` field takes the text as
    it is, `bool` reads true/false, `int` / `float` their literals, and tuples, dicts and untyped
    fields go through `ast.literal_eval` (so they get Python literals, strings quoted).
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if field_type is str and isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        if field_type is float:
            return repr(value)  # 'inf' / 'nan' for absl's float parser
        raise UserError("sweep", f"{value!r} can only override a float field",
                        "use a finite value")
    if isinstance(value, (list, tuple)) and field_type is tuple:
        return repr(tuple(value))
    return repr(value)


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, (list, tuple)):
        return isinstance(got, (list, tuple)) and len(got) == len(want) and all(
            _same(g, w) for g, w in zip(got, want))
    if isinstance(want, Mapping):
        got = got.to_dict() if hasattr(got, "to_dict") else got
        return isinstance(got, Mapping) and set(got) == set(want) and all(
            _same(got[k], want[k]) for k in want)
    if isinstance(want, bool) or isinstance(got, bool):
        return type(got) is type(want) and got == want
    if isinstance(want, float) and isinstance(got, float) and math.isnan(want):
        return math.isnan(got)
    return type(got) is type(want) and got == want or (
        isinstance(want, int) and isinstance(got, float) and got == want)


def _get(config, path: str):
    node = config
    for part in path.split("."):
        node = node[part]
    return node


def config_argv(config_file: str, arg: str | None) -> str:
    return f"--config={config_file}" + (f":{arg}" if arg is not None else "")


def _parse_base(config_file: str, arg: str | None, base_args: Sequence[str]):
    head = ["rlhf_jax.sweep", config_argv(config_file, arg), *base_args]
    try:
        return head, config_utils.parse_config_argv(head)
    except ValueError as e:
        raise UserError(f"--config={config_file}", str(e),
                        "fix the config or the --config.* overrides given to the sweep") from e


def resolve(config_file: str, arg: str | None, base_args: Sequence[str] = (),
            overrides: Mapping[str, Any] | None = None, where: str = "sweep", _base=None):
    """`(resolved config, override flags)`: the config the program will see, and the flags.

    Every override value is checked to read back exactly as given.
    """
    from ml_collections.config_flags import config_path

    head, base = _base or _parse_base(config_file, arg, base_args)
    flags = []
    for path, value in (overrides or {}).items():
        try:
            field_type = config_path.get_type(path, base)
        except (AttributeError, KeyError):
            field_type = None  # an unknown field: the parse below names it
        flags.append(f"--config.{path}={format_value(value, field_type)}")
    try:
        config = config_utils.parse_config_argv(head + flags)
    except ValueError as e:
        raise UserError(where, str(e), "fix the sweep's override (see get_sweep)") from e
    for path, value in (overrides or {}).items():
        got = _get(config, path)
        if not _same(got, value):
            raise UserError(f"{where}: config.{path}", f"{value!r} reads back as {got!r}",
                            f"give a value of the field's type ({type(got).__name__})")
    return config, flags


def config_key(config, entry: str) -> str:
    """12 hex digits of sha256 over the program and the resolved config minus `workdir` (and
    minus fields at their `provenance.KEY_NEUTRAL` values): `runcache.key_dict` / `digest`."""
    return runcache.digest({"entry": entry,
                            "config": runcache.key_dict(config_utils.config_to_dict(config))})


def _slug(overrides: Mapping[str, Any], limit: int = 60, label: str | None = None) -> str:
    text = label if label is not None else ",".join(f"{k}={v}" for k, v in overrides.items())
    text = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)
    return text[:limit].rstrip(",_")


# ------------------------------------------------------------------------------------- trials


@dataclasses.dataclass(frozen=True)
class Trial:
    """One run of a sweep: its config overrides, key, work dir and command line."""

    index: int
    name: str  # "<readable overrides>-<key>", the work dir's name
    key: str
    overrides: dict
    entry: str
    args: tuple[str, ...]  # the program's flags, ending with --config.workdir=<workdir>
    workdir: str

    def command(self, python: str = sys.executable) -> list[str]:
        return entry_command(self.entry, python) + list(self.args)


def check_base_args(base_args: Sequence[str]) -> list[str]:
    """The runner's own `--config.a.b=v` flags, passed to every trial unchanged."""
    out = []
    for a in base_args:
        if not (a.startswith("--config.") and "=" in a):
            raise UserError(a, "is not a --config.<field>=<value> override",
                            "write overrides as --config.a.b=value (with '=')")
        field = a[len("--config."):].split("=", 1)[0]
        if field == "workdir":
            raise UserError(a, "the sweep sets each trial's workdir", "use --workdir=<sweep dir>")
        out.append(a)
    return out


def expand(config_file: str, arg: str | None, overrides: Sweep | None = None, *,
           workdir: str | Path, entry: str | None = None,
           base_args: Sequence[str] = (), labels: Sequence[str] | None = None) -> list[Trial]:
    """Trials of a sweep: `overrides` (default: the config file's `get_sweep(arg)`) resolved.

    `workdir` is the sweep directory; trial i runs in `<workdir>/<name>`, where the name is
    `<overrides>-<key>`, or `<labels[i]>-<key>` when labels are given (e.g. when an override is
    a long path). Two trials with the same resolved config are an error (they would share a
    work dir).
    """
    config_file = str(config_file)
    if overrides is None:
        overrides = load_sweep(config_file, arg)
    else:
        overrides = _as_sweep(overrides, "sweep")
    if not overrides:
        raise UserError(f"{config_file}: get_sweep({arg!r})", "returned no trials",
                        "return at least one override dict ({} runs the config as it is)")
    entry = entry_of(config_file, entry)
    if labels is not None and len(labels) != len(overrides):
        raise UserError("sweep", f"{len(labels)} labels for {len(overrides)} trials",
                        "give one label per trial")
    base_args = check_base_args(base_args)
    given = {a[len("--config."):].split("=", 1)[0] for a in base_args}
    base = _parse_base(config_file, arg, base_args)
    trials, seen = [], {}
    for i, ov in enumerate(overrides):
        clash = sorted(given & set(ov))
        if clash:
            raise UserError(f"--config.{clash[0]}", "is both given to the sweep and swept by "
                            f"trial {i}", "drop one of the two")
        config, flags = resolve(config_file, arg, base_args, ov, where=f"trial {i} {ov}",
                                _base=base)
        key = config_key(config, entry)
        if key in seen:
            raise UserError(f"trial {i} {ov}", f"resolves to the same config as trial {seen[key]}",
                            "remove the duplicate from the sweep")
        seen[key] = i
        slug = _slug(ov) if labels is None else _slug({}, label=labels[i])
        name = f"{slug}-{key}" if slug else key
        trial_dir = str(Path(workdir) / name)
        args = (config_argv(config_file, arg), *base_args, *flags, f"--config.workdir={trial_dir}")
        trials.append(Trial(i, name, key, dict(ov), entry, args, trial_dir))
    return trials
