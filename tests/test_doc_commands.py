"""The documented commands are tests (issue 26).

Every command of every ```bash / ```sh block in README.md and docs/**/*.md is checked statically
(scripts/check_doc_commands.py: the module exists, the config parses with its preset and
overrides as the entry point parses it, a stage that needs an input gets one, and blocks chain:
what a command reads an earlier documented command writes; a dir a block's command writes with
`--config.workdir=` is read by the block's next commands). Then README commands run, in
order, at a tiny size through one helper (`run_tiny`: a size preset, a scratch working
directory, nothing else), so each stage reads the previous stage's output exactly as the README
says: in CI the chain SFT -> RM -> best-of-n and the export; marked slow, every runnable README
command (adding PPO, DPO, RLOO and a weak-to-strong trial: 8 processes, 18.7 min wall on this
2-core machine under a load average of ~20, 4.3 CPU-minutes).

Not run here (each has its own tiny test): `experiments.pipeline` (tests/test_pipeline.py),
`experiments.weak_to_strong` (tests/test_w2s.py), `rlhf_jax.sweep` (tests/test_sweep.py); the
docs/ pages' variants of the README commands are checked statically only; commands needing
external models or data (`hf:/models/...`, `/data/...`, `path/to/...`) are checked statically.
`scripts/check_doc_commands.py --run` runs every runnable command of every page.
"""

from __future__ import annotations

import importlib.util
import resource
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_doc_commands",
                                               ROOT / "scripts" / "check_doc_commands.py")
docs = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = docs  # (dataclasses look their module up)
_spec.loader.exec_module(docs)

# Run in the README chain test: README commands whose module has its own tiny test are not.
NOT_RUN_HERE = {"experiments.pipeline", "experiments.weak_to_strong"}


def test_every_documented_command_resolves_and_chains():
    cmds = docs.commands()
    assert len(cmds) >= 50 and {c.file for c in cmds} >= {"README.md", "docs/methods/ppo.md"}
    assert docs.problems(cmds) == []


def test_usage_lines_in_module_docstrings_parse():
    """The `python -m` lines of configs/, experiments/ and rlhf_jax/ docstrings name modules and
    presets that exist and fields the config has (one command each: not chained)."""
    cmds = docs.docstring_commands()
    assert len(cmds) >= 50 and any(c.file == "configs/pg_sim.py" for c in cmds)
    assert docs.problems(cmds, chain=False) == []


def test_the_checks_fail_on_commands_that_do_not_chain(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\n"
        "# trains a base model, and the next line starts from the zoo instead\n"
        "python -m rlhf_jax.sft --config=configs/pretrain_sim.py --config.workdir=runs/base\n"
        "python -m rlhf_jax.sft --config=configs/sft_sim.py\n"
        "```\n\n```sh\n"
        "python -m rlhf_jax.ppo --config=configs/ppo_sim.py:steps=50 \\\n"
        "    --config.reward_from=runs/rm_nowhere\n"
        "python -m rlhf_jax.rm --config=configs/rm_sim.py --config.train.steps=20\n"
        "python -m rlhf_jax.nosuch --config=configs/rm_sim.py\n"
        "```\n")
    cmds = docs.commands([page])
    assert [(c.line, c.block) for c in cmds] == [(3, 0), (4, 0), (8, 1), (10, 1), (11, 1)]
    found = docs.problems(cmds)
    assert found == [
        "page.md:8: config.init_from is empty: the stage needs --config.init_from=<a finished "
        "stage's work dir>",
        "page.md:10: --config.train.steps=20: is ignored: config.train.epochs=1.0 sets the "
        "number of steps from the data (steps = epochs x examples / batch_size); drop the steps "
        "override, or add --config.train.epochs=0 to train exactly that many steps",
        "page.md:11: python -m rlhf_jax.nosuch: no such module",
        "page.md:3: writes runs/base, which no later command of its block reads (the next is "
        "`python -m rlhf_jax.sft --config=configs/sft_sim.py`)",
        "page.md:8: reads runs/rm_nowhere, which no documented command writes (earlier in "
        "page.md, or on another page)",
    ]


def test_the_helper_adds_only_a_size_preset():
    c = docs.Command("x.md", 1, 0, ["python", "-m", "rlhf_jax.pg",
                                    "--config=configs/pg_sim.py:method=grpo,steps=60",
                                    "--config.init_from=runs/sft_sim"])
    assert docs.tiny_argv(c)[1:] == ["-m", "rlhf_jax.pg",
                                     "--config=configs/pg_sim.py:smoke,method=grpo,steps=2",
                                     "--config.init_from=runs/sft_sim"]
    c = docs.Command("x.md", 1, 0, ["python", "-m", "experiments.best_of_n", "--config.n=4"])
    assert docs.tiny_argv(c)[1:] == ["-m", "experiments.best_of_n",
                                     "--config=configs/best_of_n_sim.py:tiny", "--config.n=4"]


def _run_in_order(cmds, scratch: Path) -> list[tuple[str, float, float]]:
    """Run `cmds` in order through `run_tiny` in one scratch dir; (where, wall s, CPU s)."""
    out = []
    for cmd in cmds:
        t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = docs.run_tiny(cmd, scratch)
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime
        out.append((cmd.where, round(time.perf_counter() - t0, 1), round(cpu, 1)))
        assert proc.returncode == 0, f"{cmd.where}: {cmd}\n{proc.stderr[-3000:]}"
    print("\nREADME commands at a tiny size (where, wall s, CPU s):", out)
    return out


def _readme_runnable():
    return [c for c in docs.commands([ROOT / "README.md"])
            if docs.runnable(c) and c.module not in NOT_RUN_HERE]


# In CI: the chain SFT -> RM -> best-of-n (reads both) and the export (reads SFT); the other
# README stages (PPO, DPO, RLOO, one weak-to-strong trial) run in the slow test below, and each
# has its own smoke test in CI.
CI_MODULES = ("rlhf_jax.sft", "rlhf_jax.rm", "experiments.best_of_n", "rlhf_jax.convert")


def test_the_readme_chain_runs_in_order_at_a_tiny_size(tmp_path):
    cmds = [c for c in _readme_runnable() if c.module in CI_MODULES]
    assert [c.module for c in cmds] == list(CI_MODULES)
    assert cmds[1].flag("config.init_from") == "runs/sft_sim"  # each reads the one before
    _run_in_order(cmds, tmp_path)
    assert (tmp_path / "runs" / "rm_sim" / "final").is_dir()
    assert (tmp_path / "runs" / "best_of_n" / "summary.json").is_file()
    assert (tmp_path / "exports" / "sft_hf" / "config.json").is_file()


@pytest.mark.slow  # ~4 CPU-minutes: eight stage processes
def test_every_runnable_readme_command_runs_in_order_at_a_tiny_size(tmp_path):
    cmds = _readme_runnable()
    assert [c.module for c in cmds][:6] == [
        "rlhf_jax.sft", "rlhf_jax.rm", "rlhf_jax.ppo", "rlhf_jax.dpo", "rlhf_jax.pg",
        "experiments.best_of_n"]
    _run_in_order(cmds, tmp_path)
    for stage in ("sft_sim", "rm_sim", "ppo_sim", "dpo_sim", "rloo_sim"):
        assert (tmp_path / "runs" / stage / "final").is_dir(), stage
