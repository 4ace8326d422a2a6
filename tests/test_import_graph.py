"""The package's import graph, read from the source with `ast` (function-level imports too):
no cycles, and nothing in rlhf_jax/ imports configs/ or experiments/ (DESIGN.md: arrows point
down; configs and experiments sit on top)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("configs", "experiments")


def _module_name(path: Path, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph(package_dir: Path) -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """({module: modules of the package it imports}, [(module, forbidden import)])."""
    base = package_dir.parent
    pkg = package_dir.name
    modules = {_module_name(p, base): p for p in package_dir.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    forbidden = []
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    parent = mod.split(".")[: len(mod.split(".")) - node.level + is_pkg]
                    stem = ".".join(parent + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                names = [stem] + [f"{stem}.{a.name}" for a in node.names]
            for name in names:
                if name.split(".")[0] in FORBIDDEN:
                    forbidden.append((mod, name))
                # The longest known module a dotted name starts with (`from a import b` may name
                # module a.b or a symbol of a).
                parts = name.split(".")
                for k in range(len(parts), 0, -1):
                    target = ".".join(parts[:k])
                    if target in modules and target.split(".")[0] == pkg:
                        if target != mod:
                            graph[mod].add(target)
                        break
    return graph, forbidden


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path [a, b, ..., a], or None. A package's `__init__` counts:
    importing a.b runs a/__init__.py first."""
    edges = {m: set(t) for m, t in graph.items()}
    for m in graph:  # a submodule import also imports its parent packages
        for t in list(edges[m]):
            parts = t.split(".")
            for k in range(1, len(parts)):
                parent = ".".join(parts[:k])
                if parent in graph and parent != m and not m.startswith(parent + "."):
                    edges[m].add(parent)
    color, stack = {}, []

    def visit(m):
        color[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if color.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if not color.get(t):
                found = visit(t)
                if found:
                    return found
        color[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if not color.get(m):
            found = visit(m)
            if found:
                return found
    return None


def test_the_checker_finds_cycles_and_forbidden_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.sub import c\n")  # function-level import
    (pkg / "sub" / "c.py").write_text("from ..a import x\nimport configs.thing\n")
    graph, forbidden = import_graph(pkg)
    assert graph["pkg.sub.c"] == {"pkg.a"} and graph["pkg.b"] == {"pkg.sub", "pkg.sub.c"}
    cycle = find_cycle(graph)
    assert cycle is not None and set(cycle) == {"pkg.a", "pkg.b", "pkg.sub.c"}
    assert forbidden == [("pkg.sub.c", "configs.thing")]
    (pkg / "sub" / "c.py").write_text("import numpy\n")
    assert find_cycle(import_graph(pkg)[0]) is None


def test_rlhf_jax_has_no_cycles_and_no_upward_imports():
    graph, forbidden = import_graph(ROOT / "rlhf_jax")
    assert len(graph) > 30 and sum(map(len, graph.values())) > 100  # the real package was read
    assert forbidden == [], f"rlhf_jax imports configs/experiments: {forbidden}"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# The modules that are methods (a stage a user runs: `python -m rlhf_jax.<method>`). A method
# imports parts (ops, rollout, onpolicy, pref_losses, trainer, ...), never another method; what
# two methods share lives in a part.
METHOD_MODULES = ("sft", "rm", "ppo", "pg", "dpo", "kto", "online_dpo", "w2s", "bon")


def method_imports(graph: dict[str, set[str]], pkg: str = "rlhf_jax") -> list[tuple[str, str]]:
    """(method, method it imports) pairs of the package's import graph."""
    methods = {f"{pkg}.{m}" for m in METHOD_MODULES} & set(graph)
    return sorted((m, t) for m in methods for t in graph[m] if t in methods)


def test_the_method_check_sees_a_method_importing_a_method(tmp_path):
    pkg = tmp_path / "rlhf_jax"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "ops.py").write_text("")
    (pkg / "ppo.py").write_text("from rlhf_jax import ops\n")
    (pkg / "pg.py").write_text("def f():\n    from rlhf_jax.ppo import minibatch_indices\n")
    assert method_imports(import_graph(pkg)[0]) == [("rlhf_jax.pg", "rlhf_jax.ppo")]


def test_no_method_module_imports_another_method_module():
    graph, _ = import_graph(ROOT / "rlhf_jax")
    present = [m for m in METHOD_MODULES if f"rlhf_jax.{m}" in graph]
    assert {"sft", "rm", "ppo", "pg", "dpo", "online_dpo"} <= set(present), present
    assert method_imports(graph) == [], "a method imports another method"
