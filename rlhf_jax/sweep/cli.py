"""`python -m rlhf_jax.sweep`: run a config file's `get_sweep` locally, on SLURM or on TPU pods.

    python -m rlhf_jax.sweep --config=configs/ppo_sim.py[:arg] [--config.a.b=v ...] --workers=2
    python -m rlhf_jax.sweep --config=... --backend=slurm --partition=gpu --gpus-per-node=1 [--wait]
    python -m rlhf_jax.sweep --config=... --backend=tpu-pod --tpu=my-v4-32 --zone=us-central2-b \\
        --workdir=/mnt/shared/sweeps/kl
    python -m rlhf_jax.sweep --config=... --dry-run     # print what would be launched
    python -m rlhf_jax.sweep --config=... --collect     # only gather the results table

`--config.a.b=v` flags go to every trial unchanged. Trials run in `<workdir>/<trial name>`
(default workdir: runs/sweeps/<config name>[-<arg>]); results go to `<workdir>/results.csv` and
`results.jsonl`. Rerunning the same command skips finished trials and resumes the others.
Exit status: 0 when every trial finished, 1 when some did not, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import ast
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from rlhf_jax import errors
from rlhf_jax.errors import UserError
from rlhf_jax.sweep import define, local, slurm, tpu


def _parser() -> argparse.ArgumentParser:
    p = errors.ArgumentParser(prog="python -m rlhf_jax.sweep", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              allow_abbrev=False)
    p.add_argument("--config", required=True, metavar="FILE.py[:ARG]",
                   help="config file with get_config(arg) and get_sweep(arg)")
    p.add_argument("--workdir", help="sweep directory (default runs/sweeps/<config>[-<arg>])")
    p.add_argument("--entry", help="program per trial: a module (rlhf_jax.ppo) or a .py script "
                                   "(default: the config file's ENTRY)")
    p.add_argument("--backend", choices=("local", "slurm", "tpu-pod"), default="local")
    p.add_argument("--workers", type=int, help="trials at once (local: default 1 on CPU, one "
                   "per --per-trial accelerators; slurm: the array's parallelism)")
    p.add_argument("--dry-run", action="store_true", help="print what would be launched; run "
                                                          "and write nothing")
    p.add_argument("--collect", action="store_true", help="write the results table from the "
                                                          "trial dirs; run nothing")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    g = p.add_argument_group("local backend")
    g.add_argument("--devices", default="auto", choices=("auto", "cpu", "gpu", "tpu"),
                   help="what workers are pinned to (auto: GPUs, else TPU chips, else cores)")
    g.add_argument("--per-trial", type=int, help="GPUs or TPU chips per trial (default 1)")
    g.add_argument("--no-pin", dest="pin", action="store_false",
                   help="on CPU, do not give each worker its own cores")
    g = p.add_argument_group("slurm backend (submitit)")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--time", type=int, default=240, help="minutes per trial (default 240)")
    g.add_argument("--nodes", type=int, default=1, help="nodes per trial (multi-host trials)")
    g.add_argument("--tasks-per-node", type=int, default=1, help="processes per node per trial")
    g.add_argument("--cpus-per-task", type=int)
    g.add_argument("--gpus-per-node", type=int)
    g.add_argument("--mem-gb", type=float)
    g.add_argument("--slurm-setup", action="append", default=[], metavar="SHELL_LINE",
                   help="line run before the trial (repeatable), e.g. 'module load cuda'")
    g.add_argument("--slurm-param", action="append", default=[], metavar="KEY=VALUE",
                   help="any other SlurmExecutor parameter (repeatable), e.g. constraint=a100")
    g.add_argument("--wait", action="store_true",
                   help="wait for the array and write the results table (default: submit, exit)")
    g = p.add_argument_group("tpu-pod backend")
    g.add_argument("--tpu", default="", help="TPU name(s), comma-separated: one trial per pod "
                                             "at a time")
    g.add_argument("--zone")
    g.add_argument("--project")
    g.add_argument("--remote-dir", default="rlhf_jax",
                   help="repository checkout on every worker, relative to the ssh home "
                        "(default rlhf_jax)")
    g.add_argument("--remote-python", default="python3")
    return p


def _split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Own flags vs `--config.a.b=v` overrides, which pass through to every trial."""
    own, overrides = [], []
    for a in argv:
        (overrides if a.startswith("--config.") else own).append(a)
    return own, overrides


def default_workdir(config_file: str, arg: str | None) -> str:
    name = Path(config_file).stem
    if arg:
        name += "-" + re.sub(r"[^A-Za-z0-9._=,+-]", "_", arg)[:40]
    return str(Path("runs") / "sweeps" / name)


def _slurm_extra(items: Sequence[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--slurm-param={item}", "is not KEY=VALUE", "e.g. constraint=a100")
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def _print_status(rows: Sequence[dict], sweep_dir: str, out) -> int:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(f"[sweep] {len(rows)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items())
          + f"; table: {Path(sweep_dir) / 'results.csv'} (and results.jsonl)", file=out)
    bad = [r for r in rows if r["status"] not in local.OK_STATUSES]
    for r in bad:
        print(local.describe(r), file=out)
    return 1 if bad else 0


def _dry_run_local(trials, slots, out) -> None:
    print(f"# {len(trials)} trials on {len(slots)} worker(s); each trial takes the next free "
          "worker (shown round-robin)", file=out)
    for t in trials:
        slot = slots[t.index % len(slots)]
        skip = "  # finished: would be skipped" if local.finished(t) else ""
        print(f"# trial {t.index}: {t.name}{skip}", file=out)
        env = " ".join(f"{k}={v}" for k, v in sorted(slot.env.items()))
        pin = f"[cores {','.join(map(str, slot.cpus))}] " if slot.cpus else ""
        print(f"{pin}{env + ' ' if env else ''}{shlex.join(slot.command(t))}", file=out)


def run(argv: Sequence[str], out=None, slurm_executor=None) -> int:
    """The CLI without `sys.exit`; `slurm_executor` lets tests substitute submitit's local one."""
    out = sys.stdout if out is None else out
    own, base_args = _split_argv(argv)
    args = _parser().parse_args(own)
    config_file, arg = define.split_config_flag(args.config)
    sweep_dir = args.workdir or default_workdir(config_file, arg)
    trials = define.expand(config_file, arg, workdir=sweep_dir, entry=args.entry,
                           base_args=base_args)
    if args.collect:
        rows = local.collect(trials)
        local.write_table(rows, sweep_dir)
        return _print_status(rows, sweep_dir, out)

    if args.backend == "local":
        slots = local.local_slots(args.workers, args.devices, args.per_trial, args.pin)
        if args.dry_run:
            _dry_run_local(trials, slots, out)
            return 0
        rows = local.run_pool(trials, slots, sweep_dir, progress=args.progress)
        return _print_status(rows, sweep_dir, out)

    if args.backend == "tpu-pod":
        slots = tpu.pod_slots(args.tpu.split(","), args.zone, project=args.project,
                              remote_dir=args.remote_dir, python=args.remote_python)
        tpu.check_sweep_dir(sweep_dir, here=not args.dry_run)
        if args.dry_run:
            pods = ", ".join(s.name for s in slots)
            print(f"# {len(trials)} trials, one at a time per pod ({pods})", file=out)
            for t in trials:
                skip = "  # finished: would be skipped" if local.finished(t) else ""
                print(f"# trial {t.index}: {t.name}{skip}", file=out)
                print(shlex.join(slots[t.index % len(slots)].command(t)), file=out)
            return 0
        rows = local.run_pool(trials, slots, sweep_dir, progress=args.progress)
        return _print_status(rows, sweep_dir, out)

    params = slurm.parameters(
        job_name=f"sweep-{Path(sweep_dir).name}", workers=args.workers, time_min=args.time,
        partition=args.partition, account=args.account, qos=args.qos, nodes=args.nodes,
        tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task,
        gpus_per_node=args.gpus_per_node, mem_gb=args.mem_gb, setup=args.slurm_setup,
        extra=_slurm_extra(args.slurm_param))
    if args.dry_run:
        todo = [t for t in trials if not local.finished(t)]
        print(slurm.sbatch_script(len(todo), sweep_dir, params), file=out)
        print(f"# array of {len(todo)} trials ({len(trials) - len(todo)} finished, skipped); "
              "array task i runs:", file=out)
        for i, t in enumerate(todo):
            print(f"#   [{i}] {t.name}: {shlex.join(t.command())}", file=out)
        return 0
    jobs, todo, skipped = slurm.submit(trials, sweep_dir, params, executor=slurm_executor)
    if not jobs:
        local.write_table(skipped, sweep_dir)
        return _print_status(skipped, sweep_dir, out)
    print(f"[sweep] submitted job array {jobs[0].job_id.split('_')[0]} with {len(jobs)} trials "
          f"({len(skipped)} finished earlier); submitit logs: {slurm.folder(sweep_dir).parent}",
          file=out)
    if not args.wait:
        print("[sweep] rerun with --collect for the results table once the array is done",
              file=out)
        return 0
    rows = {r["trial"]: r for r in skipped}
    rows.update({r["trial"]: r for r in slurm.wait(jobs, todo, progress=args.progress)})
    table = [rows[t.name] for t in trials]
    local.write_table(table, sweep_dir)
    return _print_status(table, sweep_dir, out)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        print(f"error: {e.line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
