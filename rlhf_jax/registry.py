"""The methods of the house, one entry each: what the pipeline and every experiment need to know.

A method is one `Method` record: the module that trains it, its config file (and preset), the
block of the pipeline's config that holds its stage config, the knob its sweeps turn, whether it
trains against (or picks by) the reward model, where its training data comes from, and its
family. The pipeline (`experiments.pipeline`), the figures (`experiments.frontier`) and the
failure modes (`experiments.failure_modes`) read these entries; none of them names a method in
its own code. Adding a method is one entry here (plus its module and config file).

Module paths and config files are strings: this module imports no method, no `configs` and no
`experiments` (`load` imports a method's module when a caller asks for it).

    from rlhf_jax import registry
    for m in registry.parse(config.methods):               # "ppo,dpo,bon" -> [Method, ...]
        if m.trains:
            cfg = m.stage_config(config[m.block], sft=..., rm=..., rm_config=config.rm)
            registry.load(m).run(cfg)
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterable

from rlhf_jax.errors import UserError

# Families: what a method is, for whoever groups them (plots, docs, the stage drivers).
FAMILIES = ("base", "reward", "on_policy", "offline", "inference")
# Where a method's training data comes from: its own `data` block, or the RM stage's
# comparisons (`rm`: the fields below are copied from the RM's `data` block, so the method learns
# from exactly the comparisons the RM learned from).
DATA_FROM = ("own", "rm")
RM_DATA_FIELDS = ("source", "candidates")


@dataclasses.dataclass(frozen=True)
class Method:
    """One method (or one of the base stages every method starts from)."""

    name: str
    module: str | None  # the module whose `run(config)` trains it; None: trains nothing (bon)
    config_file: str  # its stage config file, relative to the repository root
    block: str  # the field of the pipeline's (and experiments') config holding its stage config
    knob: str  # the dotted field its sweeps turn (a KL coefficient, a step count, n)
    needs_rm: bool  # trains against the RM, or picks by it (its stage config gets reward_from)
    data_from: str  # "own" or "rm" (see DATA_FROM)
    family: str
    arg: str | None = None  # the config file's preset (`configs/pg_sim.py:method=grpo`)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"method {self.name}: family {self.family!r} not in {FAMILIES}")
        if self.data_from not in DATA_FROM:
            raise ValueError(f"method {self.name}: data_from {self.data_from!r} not in "
                             f"{DATA_FROM}")

    @property
    def trains(self) -> bool:
        """Whether the method is a training stage (best-of-n is a policy made at use time)."""
        return self.module is not None

    def config_arg(self, *extra: str) -> str | None:
        """The config file's preset with `extra` preset items appended (e.g. `world=...`)."""
        parts = [p for p in (self.arg, *extra) if p]
        return ",".join(parts) or None

    def stage_config(self, block, *, sft: str | None = None, rm: str | None = None,
                     rm_config=None, seed: int | None = None):
        """A resolved, unlocked copy of `block` (this method's stage config) wired to its
        inputs: `init_from` the SFT policy, `reward_from` the RM when the method needs one,
        the RM's comparisons (`rm_config`: the RM stage's config; its `data` block is read only
        when the method learns from them) and `seed`. Inputs left as None are not set."""
        cfg = block.copy_and_resolve_references()
        with cfg.unlocked():
            if sft is not None:
                cfg.init_from = str(sft)
            if seed is not None:
                cfg.seed = int(seed)
            if self.needs_rm and rm is not None:
                cfg.reward_from = str(rm)
            if self.data_from == "rm" and rm_config is not None:
                for field in RM_DATA_FIELDS:
                    cfg.data[field] = rm_config.data[field]
        return cfg


def _m(name, module, config_file, block, knob, needs_rm, data_from, family, arg=None):
    return Method(name, module, config_file, block, knob, needs_rm, data_from, family, arg)


# The stages every method starts from (not methods: `parse` does not accept them).
STAGES: dict[str, Method] = {m.name: m for m in (
    _m("sft", "rlhf_jax.sft", "configs/sft_sim.py", "sft", "train.steps", False, "own", "base"),
    _m("rm", "rlhf_jax.rm", "configs/rm_sim.py", "rm", "data.source.num_train", False, "own",
       "reward"),
)}

METHODS: dict[str, Method] = {m.name: m for m in (
    _m("ppo", "rlhf_jax.ppo", "configs/ppo_sim.py", "ppo", "kl.beta", True, "own", "on_policy"),
    _m("dpo", "rlhf_jax.dpo", "configs/dpo_sim.py", "dpo", "dpo.beta", False, "rm", "offline"),
    # Critic-free policy gradients (rlhf_jax.pg), one preset of configs/pg_sim.py each.
    *(_m(n, "rlhf_jax.pg", "configs/pg_sim.py", n, "kl.beta", True, "own", "on_policy",
         f"method={n}") for n in ("rloo", "grpo", "dr_grpo", "reinforce")),
    _m("kto", "rlhf_jax.kto", "configs/kto_sim.py", "kto", "kto.beta", False, "rm", "offline"),
    _m("online_dpo", "rlhf_jax.online_dpo", "configs/online_dpo_sim.py", "online_dpo",
       "online_dpo.beta", True, "own", "on_policy"),
    # Best-of-n of the SFT policy by the RM: no training, a policy made at comparison time.
    _m("bon", None, "configs/best_of_n_sim.py", "bon", "n", True, "own", "inference"),
)}


def get(name: str) -> Method:
    """The entry of a method or base stage (`sft`, `rm`)."""
    if name in METHODS:
        return METHODS[name]
    if name in STAGES:
        return STAGES[name]
    raise UserError("method", f"{name!r} is not a method",
                    f"use one of {sorted(METHODS)} (or a base stage: {sorted(STAGES)})")


def parse(text, field: str = "config.methods", among: Iterable[str] | None = None
          ) -> list[Method]:
    """A comma list of method names -> their entries, in order. `among` narrows the names an
    experiment accepts (default: every method). Empty, unknown or repeated names raise one
    `UserError` naming `field` and what to use instead."""
    allowed = list(METHODS) if among is None else [n for n in among if n in METHODS]
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if bad or repeated or not names:
        problem = (f"names an unknown method {bad[0]!r}" if bad else
                   f"repeats {repeated[0]!r}" if repeated else "names no method")
        raise UserError(field, f"{str(text)!r} {problem}",
                        f"use a comma list of {', '.join(allowed)}")
    return [METHODS[n] for n in names]


def load(method: Method | str):
    """The module of a method or base stage (imported now); UserError for best-of-n."""
    m = get(method) if isinstance(method, str) else method
    if m.module is None:
        raise UserError("method", f"{m.name} trains nothing (it has no stage module)",
                        "skip it where stages are trained (`Method.trains`)")
    return importlib.import_module(m.module)


__all__ = ["DATA_FROM", "FAMILIES", "METHODS", "Method", "RM_DATA_FIELDS", "STAGES", "get",
           "load", "parse"]
