"""Config helpers shared by every stage: base fields, presets, flag parsing, validation.

Configs are `ml_collections.ConfigDict`s returned by `get_config(arg)` in `configs/*.py`; entry
points take `--config=configs/sft.py:model=small,steps=10` plus dotted overrides
(`--config.optim.lr=1e-5`). Configs are locked, so a misspelled override fails with its name.
"""

from __future__ import annotations

import ast
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections

OPTIM_SCHEDULES = ("constant", "cosine", "linear")


def base_config() -> ml_collections.ConfigDict:
    """Fields every stage shares. Stages add their own, then `lock()` the config."""
    c = ml_collections.ConfigDict()
    c.workdir = "runs/default"
    c.seed = 0
    # Work dir of the previous stage whose final params initialise this one ("" = from scratch).
    c.init_from = ""

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # Overrides of sharding.DEFAULT_RULES: ((logical, mesh_axes), ...), e.g. (("embed", None),).
    # A tuple (not a list) so that `--config.sharding_rules=...` can override it.
    c.sharding_rules = ()

    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-4,
        schedule="cosine",  # constant | cosine | linear (each after a linear warmup)
        warmup_steps=0,
        end_lr_ratio=0.0,  # final lr / peak lr for cosine and linear decay
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.0,
        grad_clip=1.0,  # global-norm clip; 0 disables
    ))

    c.train = ml_collections.ConfigDict(dict(
        steps=100,
        batch_size=8,  # global, over all processes
        accum_steps=1,  # microbatches per step (batch_size/accum_steps rows each)
        eval_every=0,  # 0 = only at the end
        eval_batches=4,
        ckpt_every=100,
        keep_checkpoints=2,
        log_every=10,
    ))

    c.distributed = ml_collections.ConfigDict(dict(
        coordinator_address="",  # "host:port" starts jax.distributed explicitly
        num_processes=1,
        process_id=0,
    ))
    return c


def _parse_value(text: str):
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()


def parse_preset(arg: str | None) -> dict:
    """`"model=small,steps=10"` → `{"model": "small", "steps": 10}` (ints, floats, bools parsed).

    A bare word (`"small"`) means `{"preset": "small"}`, so `configs/x.py:small` also works.
    """
    out: dict = {}
    if not arg:
        return out
    for i, item in enumerate(part for part in arg.split(",") if part.strip()):
        if "=" not in item:
            if i == 0 and "preset" not in out:
                out["preset"] = item.strip()
                continue
            raise ValueError(f"config preset {arg!r}: item {item!r} is not key=value "
                             "(expected e.g. 'model=small,steps=10')")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key.isidentifier():
            raise ValueError(f"config preset {arg!r}: {key!r} is not a valid field name")
        if key in out:
            raise ValueError(f"config preset {arg!r}: {key!r} given twice")
        out[key] = _parse_value(value)
    return out


def check_preset_keys(preset: dict, allowed: Sequence[str], config_file: str = "config"):
    """Fail on preset keys a `get_config` does not understand (they would be silently ignored)."""
    unknown = sorted(set(preset) - set(allowed))
    if unknown:
        raise ValueError(f"{config_file}: unknown preset key(s) {unknown}; allowed: "
                         f"{sorted(allowed)}")


def is_smoke(preset: dict) -> bool:
    """`:smoke` or `:smoke=True`: the config's two-step smoke-test variant."""
    return bool(preset.get("smoke")) or preset.get("preset") == "smoke"


def _parse(argv: list[str], name: str):
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(name, None, "config file", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
    return fv[name].value


def _unknown_override(config, argv: list[str], name: str) -> str | None:
    """Describe the first `--<name>.a.b=v` whose path is not a field of `config`."""
    import difflib

    for arg in argv:
        if not arg.startswith(f"--{name}."):
            continue
        parts = arg[len(name) + 3:].split("=", 1)[0].split(".")
        node = config
        for i, part in enumerate(parts):
            fields = sorted(node.keys()) if hasattr(node, "keys") else []
            if part not in fields:
                where = ".".join([name] + parts[:i])
                close = difflib.get_close_matches(part, fields, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                return (f"{arg}: {where} has no field {part!r}{hint} "
                        f"(fields: {', '.join(fields) or 'none, it is not a ConfigDict'})")
            node = node[part]
    return None


def parse_config_argv(argv: Sequence[str], name: str = "config") -> ml_collections.ConfigDict:
    """Parse `--config=file.py:arg --config.a.b=v ...` from `argv` (argv[0] = program name).

    Uses the real absl/ml_collections flag machinery on a private FlagValues, and re-raises its
    errors as ValueError naming the offending `--config.<field>`.
    """
    from absl import flags

    argv = list(argv)
    try:
        config = _parse(argv, name)
    except (AttributeError, KeyError) as e:  # an override names no field of the locked config
        base = _parse([a for a in argv if not a.startswith(f"--{name}.")], name)
        msg = _unknown_override(base, argv, name)
        raise ValueError(msg or f"bad config override in {argv[1:]}: {e}") from e
    except flags.Error as e:
        raise ValueError(str(e)) from e
    if config is None:
        raise ValueError(f"--{name}=<file.py[:arg]> is required")
    return config


def run_with_config(main: Callable[[ml_collections.ConfigDict], Any], name: str = "config"):
    """Entry point: `absl.app.run` whose argv is `--config=file.py:arg --config.a.b=v ...`.

    A bad override exits with status 2 and one line naming the field (no traceback).
    """
    from absl import app, flags
    from absl import logging as absl_logging

    parsed = {}

    def parser(argv):
        try:
            parsed["config"] = parse_config_argv(argv, name)
        except ValueError as e:
            sys.stderr.write(f"config error: {e}\n")
            sys.exit(2)
        flags.FLAGS.mark_as_parsed()  # absl logging reads FLAGS
        return argv[:1]

    def run(argv):
        del argv
        # Orbax logs every save step at INFO through absl; keep the console to warnings.
        absl_logging.set_verbosity(absl_logging.WARNING)
        logging.getLogger("rlhf_jax").setLevel(logging.INFO)
        main(parsed["config"])
        # absl's app.run exits with whatever `run` returns; a stage's summary dict would be
        # printed to stderr and turned into exit status 1.
        return 0

    app.run(run, flags_parser=parser)


def config_to_dict(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def save_config(config, workdir: str | Path) -> Path:
    """Write `workdir/config.json` (the full resolved config of this run)."""
    path = Path(workdir) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config_to_dict(config), indent=2, sort_keys=True, default=str))
    return path


def validate(config, n_devices: int) -> None:
    """Check the shared fields before anything compiles; errors name the field and a fix."""
    from rlhf_jax import sharding

    data, fsdp, _ = sharding.mesh_shape(config.mesh, n_devices)
    t = config.train
    for field in ("steps", "batch_size", "accum_steps", "log_every", "keep_checkpoints"):
        value = t[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config.train.{field}={value!r} must be an int >= 1")
    for field in ("eval_every", "ckpt_every", "eval_batches"):
        value = t[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"config.train.{field}={value!r} must be an int >= 0 (0 = off)")
    if t.batch_size % t.accum_steps:
        raise ValueError(f"config.train.batch_size={t.batch_size} is not divisible by "
                         f"config.train.accum_steps={t.accum_steps}")
    micro = t.batch_size // t.accum_steps
    shards = data * fsdp
    if micro % shards:
        fit = t.accum_steps * shards
        raise ValueError(
            f"config.train.batch_size={t.batch_size}: each microbatch (batch_size/accum_steps = "
            f"{micro} rows) must split evenly over the data×fsdp = {data}×{fsdp} = {shards} batch "
            f"shards of config.mesh; use a batch_size that is a multiple of {fit}")
    o = config.optim
    if o.schedule not in OPTIM_SCHEDULES:
        raise ValueError(f"config.optim.schedule={o.schedule!r} must be one of {OPTIM_SCHEDULES}")
    if not o.lr >= 0:
        raise ValueError(f"config.optim.lr={o.lr!r} must be >= 0")
    if o.warmup_steps < 0 or o.warmup_steps > t.steps:
        raise ValueError(f"config.optim.warmup_steps={o.warmup_steps} must be in "
                         f"[0, config.train.steps={t.steps}]")
    if not (0 <= o.b1 < 1 and 0 <= o.b2 < 1):
        raise ValueError(f"config.optim.b1={o.b1}, b2={o.b2} must be in [0, 1)")
    if o.grad_clip < 0:
        raise ValueError(f"config.optim.grad_clip={o.grad_clip} must be >= 0 (0 = off)")
    if o.weight_decay < 0:
        raise ValueError(f"config.optim.weight_decay={o.weight_decay} must be >= 0")
    if not config.workdir:
        raise ValueError("config.workdir is empty; give --config.workdir=<dir>")
    rules = config.get("sharding_rules")
    sharding.rules_from_config({"sharding_rules": rules})


def set_dotted(config, key: str, value) -> None:
    """`config.a.b = value` for key "a.b" (the same path a `--config.a.b=` flag names)."""
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    with config.unlocked():
        node[leaf] = value


def policy_eval_config(**overrides) -> ml_collections.ConfigDict:
    """The `eval` block of every stage that trains a policy (`evaluation.PolicyEval`).

    Sampling settings default to the simulated world's (8-token prompts, 20 new tokens at
    T = 0.7, PPO's rollout temperature); a stage ties them to its own rollout fields with
    FieldReferences where it has them.
    """
    c = ml_collections.ConfigDict(dict(
        num_prompts=256,  # held-out prompts, one sample each
        max_prompt_len=8,
        max_new_tokens=20,
        temperature=0.7,
        batch_size=128,
        judges=("vader", "vader_trap"),  # gold judges: measured, never rewarded
        gold="vader",  # the judge reported as `gold` and used for win rates ("" = none)
        sample_rows=8,  # rows of the table appended to workdir/samples.md at each eval
    ))
    c.update(overrides)
    return c


def check_number(config, path: str, kind=(int, float), *, strict: bool = True,
                 upper: float | None = None) -> None:
    """Fail with a UserError naming `config.<path>` unless its value is a number > 0 (>= 0 when
    not `strict`), and <= `upper` when given. Bools are not numbers here."""
    from rlhf_jax.errors import UserError

    node = config
    for part in path.split("."):
        node = node[part]
    value = node
    ok = not isinstance(value, bool) and isinstance(value, kind) and (
        value > 0 if strict else value >= 0) and (upper is None or value <= upper)
    if not ok:
        bound = f"{'>' if strict else '>='} 0" + ("" if upper is None else f" and <= {upper}")
        names = kind.__name__ if isinstance(kind, type) else "a number"
        raise UserError(f"config.{path}", f"{value!r} is not valid", f"give {names} {bound}")


def with_epoch_steps(config, n_train: int):
    """The config a run over `n_train` examples trains under: `train.steps` from
    `train.epochs` when that is > 0 (InstructGPT trains its RM for one epoch: more overfits the
    comparisons), warmup capped at the steps. A locked copy; the caller's is untouched, and the
    work dir's config.json records the steps the run took."""
    if config.train.epochs <= 0:
        return config
    config = config.copy_and_resolve_references()
    steps = max(1, int(config.train.epochs * n_train) // config.train.batch_size)
    set_dotted(config, "train.steps", steps)
    set_dotted(config, "optim.warmup_steps", min(config.optim.warmup_steps, steps))
    config.lock()
    return config
