"""Checks that run before anything trains, for values a run would otherwise meet late or ignore.

* `check_conflicts(config, given)`: a field the user set (a `--config.a.b=` override, a sweep
  trial's override) that another field makes the run ignore, e.g. `train.steps` while
  `train.epochs > 0` decides the length. One `UserError` naming both fields and the fix.
* `check_best_of_n(n, field)`: a best-of-n size, checked when the config is read rather than
  after the stages it samples from have trained.
* `check_prompt_count(n, source, ...)`: a prompt count against the prompts its data source
  holds, so a run never evaluates on fewer (or repeated) prompts than its `config.json` records.
* `check_comparison(config, methods)`: both, for a pipeline's comparison block.

Entry points call them through `config_utils.parse_config_argv` (conflicts) and their own
`validate` step (the rest), before the first compile.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from rlhf_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Conflict:
    """Setting `field` has no effect while `decider`'s value satisfies `wins`.

    Both are dotted paths relative to the block that holds them (`train.steps` matches
    `config.train.steps` and a pipeline's `config.rm.train.steps`)."""

    field: str
    decider: str
    wins: Callable[[Any], bool]
    why: str  # what the decider does instead, e.g. "sets the length from the data"
    fix: str  # how to make `field` count; `{prefix}` is the block's dotted prefix


CONFLICTS: tuple[Conflict, ...] = (
    Conflict("train.steps", "train.epochs", lambda v: v > 0,
             "sets the number of steps from the data (steps = epochs x examples / batch_size)",
             "drop the steps override, or add --config.{prefix}train.epochs=0 to train exactly "
             "that many steps"),
    Conflict("optim.end_lr_ratio", "optim.schedule", lambda v: v == "constant",
             "keeps the lr constant after warmup",
             "set --config.{prefix}optim.schedule=cosine (or linear) for a decay"),
    Conflict("kl.loss_estimator", "kl.mode", lambda v: v != "loss",
             "puts the KL in the reward (k1 per token), not in the loss",
             "set --config.{prefix}kl.mode=loss to use a loss estimator"),
    Conflict("kl.target", "kl.adaptive", lambda v: not v,
             "keeps beta fixed (the controller is off)",
             "set --config.{prefix}kl.adaptive=True for a KL target"),
    Conflict("kl.horizon", "kl.adaptive", lambda v: not v,
             "keeps beta fixed (the controller is off)",
             "set --config.{prefix}kl.adaptive=True for a controller horizon"),
    Conflict("rollout.no_eos_score", "rollout.eos_trick", lambda v: not v,
             "scores responses without EOS by the RM like any other",
             "set --config.{prefix}rollout.eos_trick=True to use no_eos_score"),
)


def _lookup(config, dotted: str):
    node = config
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return _MISSING
    return node


_MISSING = object()


def override_paths(argv: Sequence[str], name: str = "config") -> list[str]:
    """The dotted field paths of `--<name>.a.b=v` (and bare `--<name>.a.b`) flags in `argv`."""
    head = f"--{name}."
    return [a[len(head):].split("=", 1)[0] for a in argv if a.startswith(head)]


def check_conflicts(config, given: Iterable[str], flag: str = "--config",
                    rules: Sequence[Conflict] = CONFLICTS) -> None:
    """Refuse a field in `given` (dotted paths the user set) that `config` would ignore.

    Every rule is matched at any depth: `rm.train.steps` in a pipeline config is checked
    against `rm.train.epochs`. A field set together with the decider that makes it count (e.g.
    `train.steps=20` with `train.epochs=0`) passes, because the check reads the final config.
    """
    for path in given:
        for rule in rules:
            if path != rule.field and not path.endswith("." + rule.field):
                continue
            prefix = path[: len(path) - len(rule.field)]
            value = _lookup(config, prefix + rule.decider)
            if value is _MISSING or not rule.wins(value):
                continue
            set_to = _lookup(config, path)
            raise UserError(
                f"{flag}.{path}={set_to!r}",
                f"is ignored: config.{prefix}{rule.decider}={value!r} {rule.why}",
                rule.fix.format(prefix=prefix))


def check_best_of_n(n, field: str = "config.n") -> int:
    """A best-of-n size: an int >= 1 (checked before the stages it samples from train)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(field, f"{n!r} must be an int >= 1",
                        "e.g. 16 (256 for Gao et al. 2022's range)")
    return n


def check_prompt_count(num_prompts, source, field: str = "config.eval.num_prompts",
                       source_field: str = "config.eval.prompts") -> int:
    """`num_prompts` against the prompts of the data source `source` ("eval" split).

    Fails when it asks for more prompts than the source holds (the run would evaluate on fewer,
    or repeat them, while its config.json records the number asked for). Returns the count
    available. Building a simulated source's prompts takes a second or two, not a compile."""
    from rlhf_jax.data import sources

    if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts < 1:
        raise UserError(field, f"{num_prompts!r} must be an int >= 1", "")
    available = len(sources.from_config(source, source_field).prompts("eval"))
    if num_prompts > available:
        sim = hasattr(source, "get") and source.get("kind") == "sim"
        more = f", or raise {source_field}.num_eval" if sim else ""
        raise UserError(field, f"{num_prompts} is more than the {available} held-out prompts of "
                        f"{source_field}", f"set it <= {available}{more}")
    return available


def check_comparison(config, methods: Sequence[str]) -> None:
    """The end of a pipeline-style run (`experiments.pipeline`): `config.bon.n` when best-of-n
    is among `methods`, and `config.eval.num_prompts` against `config.eval.prompts`. Call it
    with the stage checks, before the first stage trains."""
    from rlhf_jax import registry

    for m in registry.parse(",".join(methods)) if methods else ():
        if not m.trains:  # best-of-n: a policy made at comparison time, of size config.<block>.n
            check_best_of_n(config[m.block][m.knob], f"config.{m.block}.{m.knob}")
    check_prompt_count(config.eval.num_prompts, config.eval.prompts,
                       "config.eval.num_prompts", "config.eval.prompts")
