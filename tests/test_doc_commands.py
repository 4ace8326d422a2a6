"""The documented commands are tests (issue 26).

Every command of every ```bash / ```sh block in README.md and docs/**/*.md is checked statically
(scripts/check_doc_commands.py: the module exists, the config parses with its preset and
overrides as the entry point parses it, a stage that needs an input gets one, and blocks chain:
what a command reads an earlier documented command writes; a dir a block's command writes with
`--config.workdir=` is read by the block's next commands). Every runnable command of the
README's step-by-step guide then runs, in order, at a tiny size through one helper
(`run_tiny`: a size preset, a scratch working directory, nothing else), so each stage reads the
previous stage's output exactly as the README says.

Not run here (each has its own tiny test): `experiments.pipeline` (tests/test_pipeline.py),
`experiments.weak_to_strong` (tests/test_w2s.py), `rlhf_jax.sweep` (tests/test_sweep.py); the
docs/ pages' variants of the README commands are checked statically only; commands needing
external models or data (`hf:/models/...`, `/data/...`, `path/to/...`) are checked statically.
`scripts/check_doc_commands.py --run` runs every runnable command of every page.
"""

from __future__ import annotations

import importlib.util
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


def test_the_readme_guide_runs_in_order_at_a_tiny_size(tmp_path):
    cmds = [c for c in docs.commands([ROOT / "README.md"])
            if docs.runnable(c) and c.module not in NOT_RUN_HERE]
    assert [c.module for c in cmds][:4] == ["rlhf_jax.sft", "rlhf_jax.rm", "rlhf_jax.ppo",
                                            "rlhf_jax.dpo"]
    times = []
    for cmd in cmds:
        t0 = time.perf_counter()
        proc = docs.run_tiny(cmd, tmp_path)
        times.append((cmd.where, round(time.perf_counter() - t0, 1)))
        assert proc.returncode == 0, f"{cmd.where}: {cmd}\n{proc.stderr[-3000:]}"
    print("README commands at tiny size (s):", times)
    assert (tmp_path / "runs" / "sft_sim" / "final").is_dir()
    assert (tmp_path / "exports" / "sft_hf" / "config.json").is_file()
