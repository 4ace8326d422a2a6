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

from rlhf_jax.errors import UserError

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

    # LoRA on every trained model of the stage (docs/lora.md): rank 0 = full fine-tuning.
    c.lora = ml_collections.ConfigDict(dict(
        rank=0,
        alpha=16.0,  # the adapter's output is scaled by alpha / rank (PEFT's lora_alpha)
        dropout=0.0,  # must be 0: LoRA dropout is not implemented
        targets="q,k,v,o,gate,up,down",  # projections that get an adapter (comma-separated)
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
            raise UserError(f"--config=...:{arg}", f"item {item!r} is not key=value",
                            "write presets as e.g. 'model=small,steps=10'")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key.isidentifier():
            raise UserError(f"--config=...:{arg}", f"{key!r} is not a valid field name")
        if key in out:
            raise UserError(f"--config=...:{arg}", f"{key!r} given twice")
        out[key] = _parse_value(value)
    return out


# Preset keys that may also be given as a bare word (`configs/x.py:smoke` = `:smoke=True`).
BARE_PRESETS = ("smoke", "tiny")


def check_preset_keys(preset: dict, allowed: Sequence[str], config_file: str = "config"):
    """Fail on preset keys a `get_config` does not understand (they would be silently ignored).

    A bare word (`:smoke`) must be one of `BARE_PRESETS` that the file allows.
    """
    where = f"--config={Path(config_file).name}"
    unknown = sorted(set(preset) - set(allowed))
    if unknown:
        raise UserError(where, f"unknown preset key(s) {unknown}",
                        f"allowed: {sorted(k for k in allowed if k != 'preset')}")
    bare = preset.get("preset")
    words = [k for k in BARE_PRESETS if k in allowed]
    if bare is not None and bare not in words:
        raise UserError(where, f"unknown preset {bare!r}",
                        f"bare presets here: {words or 'none'}; other keys take key=value")


def is_smoke(preset: dict) -> bool:
    """`:smoke` or `:smoke=True`: the config's two-step smoke-test variant."""
    return bool(preset.get("smoke")) or preset.get("preset") == "smoke"


def _config_file_error(argv: list[str], name: str) -> UserError | None:
    """Run the `--<name>=file.py[:arg]` file's `get_config` again to recover the error that the
    flag machinery turned into traceback text (a UserError it raised, or what it raised)."""
    import importlib.util

    spec = next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")), None)
    if spec is None:
        return None
    path, _, arg = spec.partition(":")
    where = f"--{name}={spec}"
    try:
        module_spec = importlib.util.spec_from_file_location("_rlhf_jax_config_check", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            return UserError(where, f"{path} defines no get_config(arg)")
        module.get_config(*([arg] if arg else []))
    except UserError as e:
        return e
    except Exception as e:  # noqa: BLE001 - reported with its type, then the caller raises
        return UserError(where, f"get_config failed: {type(e).__name__}: {e}")
    return None


def _parse(argv: list[str], name: str):
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(name, None, "config file", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
    return fv[name].value


def _unknown_override(config, argv: list[str], name: str) -> tuple[str, str, str] | None:
    """(where, what, fix) of the first `--<name>.a.b=v` whose path is not a field of `config`."""
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
                hint = f"did you mean {close[0]!r}? " if close else ""
                return (arg, f"{where} has no field {part!r}",
                        f"{hint}(fields: {', '.join(fields) or 'none, it is not a ConfigDict'})")
            node = node[part]
    return None


def parse_config_argv(argv: Sequence[str], name: str = "config") -> ml_collections.ConfigDict:
    """Parse `--config=file.py:arg --config.a.b=v ...` from `argv` (argv[0] = program name).

    Uses the real absl/ml_collections flag machinery on a private FlagValues, and re-raises its
    errors as a `UserError` naming the offending `--config.<field>` (or the config file).
    """
    from absl import flags

    argv = list(argv)
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")), None)
    if spec is not None and not Path(spec.partition(":")[0]).is_file():
        # (ml_collections would hand back a placeholder that fails only when first read.)
        raise UserError(f"--{name}={spec}", f"no such config file {spec.partition(':')[0]!r}",
                        "give --config=<file.py>[:preset], e.g. configs/sft_sim.py")
    try:
        config = _parse(argv, name)
    except (AttributeError, KeyError) as e:  # an override names no field of the locked config
        base = _parse([a for a in argv if not a.startswith(f"--{name}.")], name)
        found = _unknown_override(base, argv, name)
        if found:
            raise UserError(*found) from e
        raise UserError(f"--{name}", f"bad config override in {argv[1:]}: {e}") from e
    except (flags.Error, OSError) as e:
        file_error = _config_file_error(argv, name)
        if file_error is not None:
            raise file_error from e
        text = str(e).strip()
        flag = text[len("flag "):].split(": ", 1)[0] if text.startswith("flag ") else f"--{name}"
        raise UserError(flag.split("=", 1)[0] if "=" in flag else flag,
                        text.split(": ", 1)[1] if text.startswith("flag ") else text) from e
    if config is None:
        raise UserError(f"--{name}", "is required", f"give --{name}=<file.py[:preset]>")
    from rlhf_jax import validation

    # An override that another field makes the run ignore (train.steps under train.epochs > 0).
    validation.check_conflicts(config, validation.override_paths(argv, name), f"--{name}")
    return config


def run_stage(run: Callable[[ml_collections.ConfigDict], dict],
              keys: Sequence[str] | None = None) -> None:
    """`python -m rlhf_jax.<stage>`: `run(config)` through `run_with_config`, then print the
    summary's `keys` (all of it when None) as JSON."""
    def main(config):
        from rlhf_jax.metrics import to_python

        summary = run(config)
        shown = summary if keys is None else {k: summary[k] for k in keys if k in summary}
        print(json.dumps(to_python(shown), indent=2, default=str))
        return summary

    run_with_config(main)


def run_with_config(main: Callable[[ml_collections.ConfigDict], Any], name: str = "config",
                    argv: Sequence[str] | None = None):
    """Entry point: `absl.app.run` whose argv is `--config=file.py:arg --config.a.b=v ...`.

    Every stage (`python -m rlhf_jax.<stage>`) and experiment goes through here, so they share
    one error surface (`rlhf_jax.errors`): a bad override, config file or any `UserError`
    raised while `main` runs exits with status 2 and one stderr line naming the field or file
    (`--verbose`: with the traceback); any other exception keeps its traceback (exit 1).

    Also understood: `--allow_config_change=a.b,c.d` lets this run continue a work dir whose
    recorded config differs in those fields (`rlhf_jax.provenance`).
    """
    from absl import app, flags
    from absl import logging as absl_logging

    from rlhf_jax import errors, provenance

    argv = list(sys.argv if argv is None else argv)
    argv, verbose = errors.pop_verbose(argv)
    argv, allowed = provenance.pop_allow_flag(argv)
    parsed = {}

    def parser(argv):
        try:
            parsed["config"] = parse_config_argv(argv, name)
        except UserError as e:
            errors.print_user_error(e, verbose)
            sys.exit(errors.EXIT_USER_ERROR)
        flags.FLAGS.mark_as_parsed()  # absl logging reads FLAGS
        return argv[:1]

    def run(argv):
        del argv
        # Orbax logs every save step at INFO through absl; keep the console to warnings.
        absl_logging.set_verbosity(absl_logging.WARNING)
        logging.getLogger("rlhf_jax").setLevel(logging.INFO)
        provenance.allow_changes(allowed)
        config = parsed["config"]
        workdir = config.get("workdir") if hasattr(config, "get") else None
        fresh = bool(workdir) and not Path(workdir).exists()
        try:
            errors.report_user_errors(main, config, verbose=verbose)
        except SystemExit as e:
            if fresh and e.code == errors.EXIT_USER_ERROR:
                remove_if_empty(Path(workdir))  # a refused run leaves nothing behind
            raise
        # absl's app.run exits with whatever `run` returns; a stage's summary dict would be
        # printed to stderr and turned into exit status 1.
        return 0

    app.run(run, argv=argv, flags_parser=parser)


def remove_if_empty(path: Path) -> bool:
    """Delete `path` when it is a directory tree holding no files (what a run refused after
    `mkdir` leaves); anything with a file in it stays. Returns whether it was removed."""
    import os
    import shutil

    path = Path(path)
    if not path.is_dir() or any(files for _, _, files in os.walk(path)):
        return False
    shutil.rmtree(path)
    return True


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
            raise UserError(f"config.train.{field}", f"{value!r} must be an int >= 1")
    for field in ("eval_every", "ckpt_every", "eval_batches"):
        value = t[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserError(f"config.train.{field}", f"{value!r} must be an int >= 0 (0 = off)")
    if t.batch_size % t.accum_steps:
        raise UserError("config.train.batch_size", f"{t.batch_size} is not divisible by "
                        f"config.train.accum_steps={t.accum_steps}")
    micro = t.batch_size // t.accum_steps
    shards = data * fsdp
    if micro % shards:
        fit = t.accum_steps * shards
        raise UserError(
            "config.train.batch_size",
            f"{t.batch_size}: each microbatch (batch_size/accum_steps = {micro} rows) must split "
            f"evenly over the data×fsdp = {data}×{fsdp} = {shards} batch shards of config.mesh",
            f"use a batch_size that is a multiple of {fit}")
    o = config.optim
    if o.schedule not in OPTIM_SCHEDULES:
        raise UserError("config.optim.schedule", f"{o.schedule!r} must be one of "
                        f"{OPTIM_SCHEDULES}")
    if not o.lr >= 0:
        raise UserError("config.optim.lr", f"{o.lr!r} must be >= 0")
    if o.warmup_steps < 0 or o.warmup_steps > t.steps:
        raise UserError("config.optim.warmup_steps", f"{o.warmup_steps} must be in "
                        f"[0, config.train.steps={t.steps}]")
    if not (0 <= o.b1 < 1 and 0 <= o.b2 < 1):
        raise UserError("config.optim.b1", f"b1={o.b1}, b2={o.b2} must be in [0, 1)")
    if o.grad_clip < 0:
        raise UserError("config.optim.grad_clip", f"{o.grad_clip} must be >= 0 (0 = off)")
    if o.weight_decay < 0:
        raise UserError("config.optim.weight_decay", f"{o.weight_decay} must be >= 0")
    if not config.workdir:
        raise UserError("config.workdir", "is empty", "give --config.workdir=<dir>")
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


def sim_source(**fields) -> dict:
    """A `data.source` dict of the simulated world: `kind="sim"`, `world=""` (the default world;
    `--config.data.source.world=failure_modes` picks the issue-16 variant) and `fields`."""
    return {"kind": "sim", "world": "", **fields}


def world_preset(preset: dict) -> str:
    """The `world=<variant>` preset key of a sim config ("" for the default world), checked."""
    from rlhf_jax.sim.world import WORLD_VARIANTS

    world = str(preset.get("world", "") or "")
    if world not in WORLD_VARIANTS and world:
        raise UserError("--config=...:world", f"unknown world variant {world!r}",
                        f"use one of {sorted(WORLD_VARIANTS)}")
    return "" if world == "default" else world


def failure_mode_eval(ev, smoke: bool = False) -> None:
    """An `eval` block (`policy_eval_config`) for a world with failure-mode features: the
    `spec` judge beside VADER and the probes (64 prompts per probe set, 8 in a smoke run)."""
    ev.judges = tuple(dict.fromkeys(tuple(ev.judges) + ("spec",)))
    ev.probes = 8 if smoke else 64


def sim_comparison_source(**fields) -> dict:
    """`sim_source` plus the failure-mode options of simulated comparisons, all off
    (`rlhf_jax.data.builders.COMPARISON_OPTIONS`, documented in `_comparison_options`), so
    that a flag can switch one on; `fields` set the rest (k, judge, ...)."""
    from rlhf_jax.data.builders import COMPARISON_OPTIONS

    return sim_source(**{**COMPARISON_OPTIONS, **fields})


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
        # Failure-mode probes (issue 16): prompts per probe set of the data source's simulated
        # world, sampled at every eval and reported as probe/* (0 = off; evaluation.PolicyEval).
        probes=0,
    ))
    c.update(overrides)
    return c


def check_choice(config, path: str, choices: Sequence[str]) -> None:
    """Fail with a UserError naming `config.<path>` unless its value is one of `choices`."""
    from rlhf_jax.errors import UserError

    node = config
    for part in path.split("."):
        node = node[part]
    if node not in choices:
        raise UserError(f"config.{path}", f"{node!r} is not one of the options",
                        f"use one of {tuple(choices)}")


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
    logging.getLogger("rlhf_jax").info(
        "train.steps = %d: train.epochs=%s over %d examples at batch_size %d", steps,
        config.train.epochs, n_train, config.train.batch_size)
    return config
