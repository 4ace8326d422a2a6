"""Provenance of a work dir: the config its checkpoints were trained under, and when it may change.

A stage's work dir holds

    config.json       the resolved config (sorted keys) that trained the checkpoints in it
    provenance.json   {"config_hash": <hash of config.json>, "history": [...]}

and every checkpoint's metadata (and `final/`'s) carries `config_hash` too. `Trainer.__init__`
calls `check_workdir(config, workdir)` before it builds anything:

* a fresh work dir (or one whose earlier run never saved a checkpoint) records the config now;
* a work dir with checkpoints compares the recorded config with this run's, field by field
  (`workdir` itself is not compared, so a moved work dir still resumes):
  - identical: resume, and nothing is rewritten (config.json stays byte-identical);
  - every difference on the allow-list below, or opted into: resume, and the new config is
    recorded only when this run saves its first checkpoint (a run that fails before that leaves
    the work dir's files as they were); `history` gets the step and the fields that changed;
  - anything else: refused with a `UserError` that names the fields and the ways out.

Safe to change on resume (`SAFE_ON_RESUME`, `SAFE_PREFIXES`): a longer `train.steps` (never a
shorter one), the logging, eval and checkpoint cadence (`train.log_every`, `train.eval_every`,
`train.eval_batches`, `train.ckpt_every`, `train.keep_checkpoints`), and where the run executes
(`mesh.*`, `sharding_rules`, `distributed.*`: checkpoints restore onto any mesh and every loss is
a token-weighted sum, so only float rounding changes). Note that a longer `train.steps` also
stretches a decaying learning-rate schedule (cosine / linear decay over `train.steps`): after the
resume point the run follows the new, longer schedule, not the one the first part trained on.

Anything else needs an explicit opt-in: `--allow_config_change=optim.lr,train.batch_size` on the
command line of any `run_with_config` entry point (or `allow_changes(...)` from Python) names the
fields this run may change; the change is recorded in `history`. The opt-in cannot make
incompatible weights load: a different model size still fails at restore, with an error that
names the checkpoint.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rlhf_jax.errors import UserError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
PROVENANCE_FILE = "provenance.json"
ALLOW_FLAG = "--allow_config_change"

# Dotted field -> rule: "any" (any new value) or "grow" (a new value >= the recorded one).
SAFE_ON_RESUME: dict[str, str] = {
    "train.steps": "grow",
    "train.log_every": "any",
    "train.eval_every": "any",
    "train.eval_batches": "any",
    "train.ckpt_every": "any",
    "train.keep_checkpoints": "any",
}
# Where the run executes, not what it computes.
SAFE_PREFIXES: tuple[str, ...] = ("mesh.", "sharding_rules", "distributed.")
# Not compared: the work dir may be moved or mounted elsewhere.
IGNORED: tuple[str, ...] = ("workdir",)

_user_allowed: frozenset[str] = frozenset()

# Fields added to the shipped configs after runs had been cached under keys of configs without
# them. At these values a field means "off, as before", so it is left out of every key built on a
# config — the zoo's base models (`zoo.config_key`), the pipeline's and experiments' stage dirs
# (`experiments.lib.stage_key`), sweep trials (`sweep.config_key`) and `config_hash` here — and a
# work dir recorded without it resumes (`diff`). Matched against the end of a field's dotted path
# (`data.source.world`, `ptx.source.world`, `sft.eval.probes`, ...).
KEY_NEUTRAL: dict[str, tuple] = {
    "source.world": ("", "default"),  # the simulated world variant (issue 16)
    "prompts.world": ("", "default"),  # the pipeline's comparison prompts (a data source)
    "source.improved_share": (0.0,),  # failure-mode options of simulated comparisons
    "source.improved_typo_rate": (0.0,),
    "source.refusals": ("",),
    "source.group_bias": (0.0,),
    "source.length_bias": (0.0,),
    "eval.probes": (0,),  # failure-mode probes of a policy evaluation
    "lora.rank": (0,),  # LoRA (issue 25): rank 0 = full fine-tuning; the rest its defaults
    "lora.alpha": (16.0,),
    "lora.dropout": (0.0,),
    "lora.targets": ("q,k,v,o,gate,up,down",),
}


def is_neutral(path: str, value) -> bool:
    """Whether dotted field `path` holds a `KEY_NEUTRAL` value (bools never count as 0)."""
    if isinstance(value, bool):
        return False
    return any((path == k or path.endswith("." + k)) and value in v
               for k, v in KEY_NEUTRAL.items())


def strip_neutral(d: Mapping, prefix: str = "") -> dict:
    """A copy of nested dict `d` without its fields at `KEY_NEUTRAL` values."""
    out = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            sub = strip_neutral(value, path + ".")
            if sub or not value:  # a block whose every field is neutral goes too (`lora`)
                out[key] = sub
        elif not is_neutral(path, value):
            out[key] = value
    return out


def key_dict(config) -> dict:
    """The config as a dict that cache keys hash: without `IGNORED` fields (the work dir) and
    without fields at their `KEY_NEUTRAL` values."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    for key in IGNORED:
        d.pop(key, None)
    return strip_neutral(d)


# ------------------------------------------------------------------------------------ opt-in


def _field_name(text: str) -> str:
    text = text.strip()
    return text[len("config."):] if text.startswith("config.") else text


def allow_changes(fields: Iterable[str]) -> None:
    """Let the next runs in this process change these fields of a trained work dir's config."""
    global _user_allowed
    _user_allowed = frozenset(_field_name(f) for f in fields if f.strip())


def allowed_changes() -> frozenset[str]:
    return _user_allowed


def pop_allow_flag(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(argv without `--allow_config_change=a.b,c.d`, the fields it names; repeatable)."""
    rest, fields = [], []
    argv = list(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if i > 0 and arg.startswith(ALLOW_FLAG + "="):
            fields += arg.split("=", 1)[1].split(",")
        elif i > 0 and arg == ALLOW_FLAG and i + 1 < len(argv):
            fields += argv[i + 1].split(",")
            i += 1
        else:
            rest.append(arg)
        i += 1
    return rest, [_field_name(f) for f in fields if f.strip()]


# ------------------------------------------------------------------------------ config values


def canonical(config) -> dict:
    """The config as config.json holds it (JSON types: tuples become lists, others str)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def config_hash(config) -> str:
    """Hash of the resolved config without the fields in `IGNORED` (16 hex digits)."""
    d = canonical(config) if not isinstance(config, dict) else json.loads(
        json.dumps(config, sort_keys=True, default=str))
    d = key_dict(d)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


_MISSING = "<absent>"


def diff(old: Mapping, new: Mapping, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """{dotted field: (old, new)} of every leaf that differs (a missing side is `<absent>`; a
    field missing on one side and at its `KEY_NEUTRAL` value on the other does not differ)."""
    out: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        if not prefix and key in IGNORED:
            continue
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if isinstance(a, Mapping) and b is _MISSING:  # a block absent on one side: its fields
            b = {}
        elif isinstance(b, Mapping) and a is _MISSING:
            a = {}
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.update(diff(a, b, path + "."))
        elif a != b and not (_MISSING in (a, b) and is_neutral(path, b if a is _MISSING else a)):
            out[path] = (a, b)
    return out


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def why_refused(field: str, old, new) -> str | None:
    """None if `field` may change from `old` to `new` on resume, else the reason it may not."""
    if field in _user_allowed:
        return None
    rule = SAFE_ON_RESUME.get(field)
    if rule == "any":
        return None
    if rule == "grow":
        if _is_number(old) and _is_number(new) and new >= old:
            return None
        return f"{field} may only grow on resume ({old} -> {new})"
    if any(field == p.rstrip(".") or field.startswith(p) for p in SAFE_PREFIXES):
        return None
    return f"{field} {_short(old)} -> {_short(new)}"


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ------------------------------------------------------------------------------- work dirs


def saved_steps(workdir: str | Path) -> list[int]:
    """Finalized checkpoint steps in `workdir/checkpoints` and `workdir/final` (a listing)."""
    steps: list[int] = []
    for sub in ("checkpoints", "final"):
        d = Path(workdir) / sub
        if d.is_dir():
            steps += [int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(set(steps))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class WorkdirRecord:
    """What `check_workdir` decided; `commit()` writes it (at most once, main process only)."""

    def __init__(self, workdir: Path, config: dict, hash_: str, write: bool,
                 history_entry: dict | None, pending: bool):
        self.workdir, self.config, self.config_hash = workdir, config, hash_
        self._write, self._entry, self._pending = write, history_entry, pending

    @property
    def pending(self) -> bool:
        return self._pending

    def commit(self) -> None:
        """Record this run's config in the work dir (before its first checkpoint lands)."""
        if not self._pending:
            return
        self._pending = False
        if not self._write:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        prov = _read_json(self.workdir / PROVENANCE_FILE)
        history = list(prov.get("history", [])) if isinstance(prov, dict) else []
        if self._entry is not None:
            history.append(self._entry)
        if self._entry is not None:
            log.info("%s: resumed at step %d with changed fields %s (recorded in %s)",
                     self.workdir, self._entry["resumed_at_step"],
                     ", ".join(f"{f}: {_short(a)} -> {_short(b)}"
                               for f, (a, b) in self._entry["changes"].items()),
                     PROVENANCE_FILE)
        _write_atomic(self.workdir / CONFIG_FILE,
                      json.dumps(self.config, indent=2, sort_keys=True))
        _write_atomic(self.workdir / PROVENANCE_FILE, json.dumps(
            {"config_hash": self.config_hash, "history": history}, indent=2))


def check_workdir(config, workdir: str | Path, *, write: bool = True) -> WorkdirRecord:
    """Compare `config` with the config recorded in `workdir`; refuse a disallowed change.

    Returns a `WorkdirRecord`. A fresh work dir (no checkpoint saved yet) is recorded at once;
    a resumed one with allowed changes is recorded by `record.commit()`, which the trainer calls
    before its first save. `write=False` (non-main processes) checks without writing.
    """
    workdir = Path(workdir)
    new = canonical(config)
    new_hash = config_hash(new)
    steps = saved_steps(workdir)
    old = _read_json(workdir / CONFIG_FILE)
    if not steps:  # nothing was trained under the recorded config (if any): record this one
        record = WorkdirRecord(workdir, new, new_hash, write, None, pending=old != new)
        record.commit()
        return record
    if not isinstance(old, dict):
        log.warning("%s has checkpoints (step %d) but no readable %s: cannot check that this run's "
                    "config matches the one that trained them; recording this run's config",
                    workdir, steps[-1], CONFIG_FILE)
        return WorkdirRecord(workdir, new, new_hash, write, None, pending=True)
    changes = diff(old, new)
    if not changes:
        return WorkdirRecord(workdir, new, new_hash, write, None, pending=False)
    refused = {f: why for f, (a, b) in changes.items() if (why := why_refused(f, a, b))}
    if refused:
        fields = sorted(refused)
        where = ", ".join(f"config.{f}" for f in fields[:4])
        if len(fields) > 4:
            where += f" (+{len(fields) - 4} more)"
        raise UserError(
            where,
            f"differs from the config that trained {workdir} (checkpoint step {steps[-1]}, "
            f"{workdir / CONFIG_FILE}): {'; '.join(refused[f] for f in fields)}",
            f"use a new --config.workdir, or continue this work dir under the new values with "
            f"{ALLOW_FLAG}={','.join(fields)} (it is recorded in {PROVENANCE_FILE})")
    entry = {
        "resumed_at_step": steps[-1],
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "from_hash": config_hash(old), "to_hash": new_hash,
        "changes": {f: list(v) for f, v in changes.items()},
        "opted_in": sorted(f for f in changes if f in _user_allowed),
    }
    return WorkdirRecord(workdir, new, new_hash, write, entry, pending=True)
