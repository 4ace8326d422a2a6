"""A method file holds only what is its own (issue 21): every method's `run()` is 40 lines or
fewer (the stage skeleton lives in the drivers), and the methods added on the drivers, KTO and
online DPO, are 150 lines or fewer including their losses' glue and docstrings."""

import ast
from pathlib import Path

from rlhf_jax import registry

ROOT = Path(__file__).resolve().parents[1]
METHOD_FILES = sorted({m.module for m in [*registry.METHODS.values(), *registry.STAGES.values()]
                       if m.module} | {"rlhf_jax.w2s"})


def _run_lines(path: Path) -> int:
    tree = ast.parse(path.read_text())
    runs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run"]
    assert runs, f"{path} has no run()"
    return runs[0].end_lineno - runs[0].lineno + 1


def test_every_method_run_is_short():
    long = {m: n for m in METHOD_FILES
            if (n := _run_lines(ROOT / (m.replace(".", "/") + ".py"))) > 40}
    assert not long, f"run() longer than 40 lines: {long}"


def test_new_methods_are_one_short_file():
    for name in ("kto", "online_dpo"):
        lines = len((ROOT / "rlhf_jax" / f"{name}.py").read_text().splitlines())
        assert lines <= 150, f"rlhf_jax/{name}.py has {lines} lines"
